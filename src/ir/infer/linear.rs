//! Output shapes of the compute ops: MatMul, Gemm, Conv, Einsum and the opset-23 Attention op.

use super::*;

pub(super) fn matmul_shape(a: &TypeInfo, b: &TypeInfo) -> Option<Vec<i64>> {
    let (mut a, mut b) = (a.shape.clone()?, b.shape.clone()?);
    let (a1, b1) = (a.len() == 1, b.len() == 1);
    if a1 {
        a.insert(0, 1);
    }
    if b1 {
        b.push(1);
    }
    if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
        return None;
    }
    let batch = broadcast(&a[..a.len() - 2], &b[..b.len() - 2])?;
    let mut out = batch;
    if !a1 {
        out.push(a[a.len() - 2]);
    }
    if !b1 {
        out.push(b[b.len() - 1]);
    }
    Some(out)
}

pub(super) fn gemm_shape(node: &Node, a: &TypeInfo, b: &TypeInfo) -> Option<Vec<i64>> {
    let (a, b) = (a.shape.as_ref()?, b.shape.as_ref()?);
    if a.len() != 2 || b.len() != 2 {
        return None;
    }
    let m = if node.attr_int("transA").unwrap_or(0) != 0 {
        a[1]
    } else {
        a[0]
    };
    let n = if node.attr_int("transB").unwrap_or(0) != 0 {
        b[0]
    } else {
        b[1]
    };
    Some(vec![m, n])
}

pub(super) fn conv_shape(node: &Node, x: &TypeInfo, w: &TypeInfo) -> Option<Vec<i64>> {
    let (x, w) = (x.shape.as_ref()?, w.shape.as_ref()?);
    let spatial = x.len().checked_sub(2)?;
    if w.len() != x.len() {
        return None;
    }
    let kernel = node
        .attr_ints("kernel_shape")
        .map(|k| k.to_vec())
        .unwrap_or_else(|| w[2..].to_vec());
    let strides = node
        .attr_ints("strides")
        .map(|s| s.to_vec())
        .unwrap_or(vec![1; spatial]);
    let dil = node
        .attr_ints("dilations")
        .map(|s| s.to_vec())
        .unwrap_or(vec![1; spatial]);
    let pads = node
        .attr_ints("pads")
        .map(|s| s.to_vec())
        .unwrap_or(vec![0; 2 * spatial]);
    let auto_pad = node.attr_string("auto_pad").unwrap_or_default();
    if kernel.len() != spatial
        || strides.len() != spatial
        || dil.len() != spatial
        || pads.len() != 2 * spatial
    {
        return None;
    }
    let mut out = vec![x[0], w[0]];
    for i in 0..spatial {
        // i128: attribute values come from the file and may be anything.
        let (input, stride) = (x[2 + i] as i128, strides[i] as i128);
        let span = dil[i] as i128 * (kernel[i] as i128 - 1) + 1;
        if stride <= 0 {
            return None;
        }
        let d = match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => (input + stride - 1) / stride,
            "VALID" => (input - span) / stride + 1,
            _ => (input + pads[i] as i128 + pads[i + spatial] as i128 - span) / stride + 1,
        };
        out.push(i64::try_from(d).ok().filter(|&d| d > 0)?);
    }
    Some(out)
}

pub(super) fn einsum_shape(node: &Node, inputs: &[TypeInfo]) -> Option<Vec<i64>> {
    let eq = node.attr_string("equation")?.replace(' ', "");
    let (lhs, rhs) = eq.split_once("->")?;
    if eq.contains("...") {
        return None;
    }
    let mut sizes: HashMap<char, i64> = HashMap::new();
    for (term, t) in lhs.split(',').zip(inputs) {
        let s = t.shape.as_ref()?;
        if term.len() != s.len() {
            return None;
        }
        for (c, &d) in term.chars().zip(s) {
            let e = sizes.entry(c).or_insert(d);
            if *e == 1 {
                *e = d;
            }
        }
    }
    rhs.chars().map(|c| sizes.get(&c).copied()).collect()
}

/// Opset-23 `Attention`: 4-D `[B, H, S, D]` or 3-D `[B, S, H*D]` inputs.
pub(super) fn attention(node: &Node, inputs: &[TypeInfo]) -> Vec<TypeInfo> {
    let q = inputs.first().cloned().unwrap_or_default();
    let v = inputs.get(2).cloned().unwrap_or_default();
    let shape = match (&q.shape, &v.shape) {
        (Some(qs), Some(vs)) if qs.len() == 4 && vs.len() == 4 => {
            Some(vec![qs[0], qs[1], qs[2], vs[3]])
        }
        (Some(qs), Some(vs)) if qs.len() == 3 && vs.len() == 3 => {
            let q_heads = node.attr_int("q_num_heads").unwrap_or(1);
            let kv_heads = node.attr_int("kv_num_heads").unwrap_or(1).max(1);
            q_heads
                .checked_mul(vs[2] / kv_heads)
                .map(|d| vec![qs[0], qs[1], d])
        }
        _ => None,
    };
    let mut out = vec![TypeInfo::of(q.dtype, shape)];
    out.resize(node.outputs.len().max(1), TypeInfo::default());
    out
}
