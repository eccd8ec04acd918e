//! Reduce ops: output shapes from `axes` (an attribute before opset 18, an input from then on).

use super::*;

pub(super) fn reduce_shape(s: &[i64], axes: &[i64], keep: bool) -> Option<Vec<i64>> {
    let axes: Vec<usize> = axes
        .iter()
        .map(|&a| normalize_axis(a, s.len()))
        .collect::<Option<_>>()?;
    Some(
        s.iter()
            .enumerate()
            .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
                (true, true) => Some(1),
                (true, false) => None,
                (false, _) => Some(d),
            })
            .collect(),
    )
}

pub(super) fn reduce(node: &Node, x: &TypeInfo, axes_input: &TypeInfo, opset: i64) -> TypeInfo {
    let keep = node.attr_int("keepdims").unwrap_or(1) != 0;
    let attr_until = if node.op_type == "ReduceSum" { 13 } else { 18 };
    let has_axes_input = node.inputs.get(1).is_some_and(|n| !n.is_empty());
    let shape = x.shape.as_ref().and_then(|s| {
        let axes = if opset < attr_until {
            node.attr_ints("axes").map(|a| a.to_vec())
        } else if has_axes_input {
            Some(axes_input.value.clone()?)
        } else {
            None
        };
        match axes {
            Some(a) if !a.is_empty() => reduce_shape(s, &a, keep),
            _ if node.attr_int("noop_with_empty_axes").unwrap_or(0) != 0 => Some(s.clone()),
            _ => reduce_shape(s, &(0..s.len() as i64).collect::<Vec<_>>(), keep),
        }
    });
    TypeInfo::of(x.dtype, shape)
}
