//! Multiply-accumulate FLOPs (2 per MAC) of the compute-heavy ops: MatMul, Gemm, Conv, Einsum and the
//! opset-23 Attention op. Elementwise ops, norms and softmax are not counted.

use std::collections::HashMap;

use crate::ir::{Node, TypeMap};

pub fn node_flops(node: &Node, types: &TypeMap) -> u64 {
    let shape = |i: usize| -> Option<Vec<i64>> { types.get(node.inputs.get(i)?)?.shape.clone() };
    let out = || -> Option<Vec<i64>> { types.get(node.outputs.first()?)?.shape.clone() };
    let product = |s: &[i64]| {
        s.iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d.max(0) as u64))
    };
    let flops = match node.op_type.as_str() {
        "MatMul" => (|| {
            let a = shape(0)?;
            Some(product(&[2, product(&out()?) as i64, *a.last()?]))
        })(),
        "Gemm" => (|| {
            let a = shape(0)?;
            let k = if node.attr_int("transA").unwrap_or(0) != 0 {
                a[0]
            } else {
                *a.last()?
            };
            Some(product(&out()?).saturating_mul(2 * k.max(0) as u64))
        })(),
        "Conv" => (|| {
            let w = shape(1)?;
            Some(
                product(&out()?)
                    .saturating_mul(product(&w[1..]))
                    .saturating_mul(2),
            )
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
            Some(2u64.saturating_mul(product(&sizes.values().copied().collect::<Vec<_>>())))
        })(),
        // ditc's SparseLinearAttention counts as the dense attention it computes at most.
        "Attention" | "SparseLinearAttention" | "SageAttention" | "SageSparseLinearAttention" => {
            (|| {
                let (q, k, v) = (shape(0)?, shape(1)?, shape(2)?);
                if q.len() != 4 || k.len() != 4 || v.len() != 4 {
                    return None;
                }
                Some(
                    product(&[2, q[0], q[1], q[2], k[2]])
                        .saturating_mul((q[3] + v[3]).max(0) as u64),
                )
            })()
        }
        _ => None,
    };
    flops.unwrap_or(0)
}
