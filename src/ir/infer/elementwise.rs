//! Elementwise ops: numpy broadcasting of shapes, and integer arithmetic on tracked small tensors
//! (the `Shape -> Mul/Add/Div -> Concat` chains exporters build reshape targets from).

use super::*;

/// Numpy-style broadcast of two static shapes.
pub fn broadcast(a: &[i64], b: &[i64]) -> Option<Vec<i64>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

pub(super) fn elementwise(node: &Node, inputs: &[TypeInfo]) -> TypeInfo {
    let present: Vec<&TypeInfo> = node
        .inputs
        .iter()
        .zip(inputs)
        .filter(|(n, _)| !n.is_empty())
        .map(|(_, t)| t)
        .collect();
    let shape = present.iter().try_fold(Vec::new(), |acc, t| {
        t.shape.as_ref().and_then(|s| broadcast(&acc, s))
    });
    let dtype = match node.op_type.as_str() {
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            Some(DataType::Bool)
        }
        _ => present.first().and_then(|t| t.dtype),
    };
    let value = shape
        .as_ref()
        .and_then(|s| elementwise_values(node, &present, s));
    TypeInfo {
        dtype,
        shape,
        value,
    }
}

/// Integer arithmetic on tracked values (scalars broadcast; equal-length vectors elementwise).
pub(super) fn elementwise_values(
    node: &Node,
    inputs: &[&TypeInfo],
    shape: &[i64],
) -> Option<Vec<i64>> {
    let n: i64 = shape.iter().product();
    if n as usize > MAX_TRACKED_VALUES {
        return None;
    }
    let vals: Vec<&Vec<i64>> = inputs
        .iter()
        .map(|t| t.value.as_ref())
        .collect::<Option<_>>()?;
    let get = |v: &Vec<i64>, i: usize| if v.len() == 1 { v[0] } else { v[i] };
    if vals.iter().any(|v| v.len() != 1 && v.len() != n as usize) {
        return None;
    }
    let f = |a: i64, b: i64| -> Option<i64> {
        Some(match node.op_type.as_str() {
            "Add" | "Sum" => a.checked_add(b)?,
            "Sub" => a.checked_sub(b)?,
            "Mul" => a.checked_mul(b)?,
            "Div" => a.checked_div(b)?,
            "Mod" => a.checked_rem(b)?,
            "Max" => a.max(b),
            "Min" => a.min(b),
            "Equal" => (a == b) as i64,
            "Less" => (a < b) as i64,
            "Greater" => (a > b) as i64,
            _ => return None,
        })
    };
    if node.op_type == "Where" {
        let [c, a, b] = vals[..] else { return None };
        return Some(
            (0..n as usize)
                .map(|i| if get(c, i) != 0 { get(a, i) } else { get(b, i) })
                .collect(),
        );
    }
    if vals.len() != 2 {
        return None;
    }
    (0..n as usize)
        .map(|i| f(get(vals[0], i), get(vals[1], i)))
        .collect()
}
