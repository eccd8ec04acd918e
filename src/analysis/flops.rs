//! Multiply-accumulate FLOPs (2 per MAC) of the compute-heavy ops: MatMul, Gemm, Conv, Einsum and the
//! opset-23 Attention op. Elementwise ops, norms and softmax are not counted.

use std::collections::HashMap;

use crate::ir::{Node, TypeMap};

pub fn node_flops(node: &Node, types: &TypeMap) -> u64 {
    let shape = |i: usize| -> Option<Vec<i64>> { types.get(node.inputs.get(i)?)?.shape.clone() };
    let out = || -> Option<Vec<i64>> { types.get(node.outputs.first()?)?.shape.clone() };
    let product = |s: &[i64]| s.iter().map(|&d| d.max(0) as u64).product::<u64>();
    let flops = match node.op_type.as_str() {
        "MatMul" => (|| {
            let a = shape(0)?;
            Some(2 * product(&out()?) * *a.last()? as u64)
        })(),
        "Gemm" => (|| {
            let a = shape(0)?;
            let k = if node.attr_int("transA").unwrap_or(0) != 0 {
                a[0]
            } else {
                *a.last()?
            };
            Some(2 * product(&out()?) * k as u64)
        })(),
        "Conv" => (|| {
            let w = shape(1)?;
            Some(2 * product(&out()?) * product(&w[1..]))
        })(),
        "Einsum" => (|| {
            let eq = node.attr_string("equation")?.replace(' ', "");
            let (lhs, _) = eq.split_once("->")?;
            let mut sizes: HashMap<char, i64> = HashMap::new();
            for (i, term) in lhs.split(',').enumerate() {
                for (c, d) in term.chars().zip(shape(i)?) {
                    sizes.insert(c, d);
                }
            }
            Some(2 * product(&sizes.values().copied().collect::<Vec<_>>()))
        })(),
        "Attention" => (|| {
            let (q, k, v) = (shape(0)?, shape(1)?, shape(2)?);
            if q.len() != 4 || k.len() != 4 || v.len() != 4 {
                return None;
            }
            let (lead, sq, sk) = (q[0] * q[1], q[2], k[2]);
            Some(2 * (lead * sq * sk * (q[3] + v[3])) as u64)
        })(),
        _ => None,
    };
    flops.unwrap_or(0)
}
