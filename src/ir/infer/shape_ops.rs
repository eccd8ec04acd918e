//! Shape-moving ops (Reshape, Transpose, Flatten, (Un)Squeeze, Concat, Split, Slice, Gather, Shape,
//! ConstantOfShape, Range, Pad): shapes, and the values of small integer tensors flowing through them.

use super::*;

pub(super) fn reshape(node: &Node, x: &TypeInfo, target: &TypeInfo) -> TypeInfo {
    let allow_zero = node.attr_int("allowzero").unwrap_or(0) != 0;
    let shape = match (&x.shape, &target.value) {
        (Some(input), Some(t)) => reshape_target(input, t, allow_zero),
        _ => None,
    };
    let value = match (&x.value, &shape) {
        (Some(v), Some(_)) => Some(v.clone()),
        _ => None,
    };
    TypeInfo {
        dtype: x.dtype,
        shape,
        value,
    }
}

/// Resolve a Reshape target (0 copies the input dim unless `allow_zero`; one -1 is inferred).
pub fn reshape_target(input: &[i64], target: &[i64], allow_zero: bool) -> Option<Vec<i64>> {
    let total: i64 = input.iter().product();
    let mut out: Vec<i64> = Vec::with_capacity(target.len());
    for (i, &t) in target.iter().enumerate() {
        out.push(if t == 0 && !allow_zero {
            *input.get(i)?
        } else {
            t
        });
    }
    let unknown: Vec<usize> = (0..out.len()).filter(|&i| out[i] == -1).collect();
    let known = out
        .iter()
        .filter(|&&d| d != -1)
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))?;
    match unknown.len() {
        0 if known == total => Some(out),
        1 if known > 0 && total % known == 0 => {
            out[unknown[0]] = total / known;
            Some(out)
        }
        _ => None,
    }
    .filter(|o| o.iter().all(|&d| d >= 0))
}

pub(super) fn transpose(node: &Node, x: &TypeInfo) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let perm: Vec<i64> = node
            .attr_ints("perm")
            .map(|p| p.to_vec())
            .unwrap_or_else(|| (0..s.len() as i64).rev().collect());
        (perm.len() == s.len())
            .then(|| perm.iter().map(|&p| s.get(p as usize).copied()).collect())
            .flatten()
    });
    TypeInfo::of(x.dtype, shape)
}

pub(super) fn flatten(node: &Node, x: &TypeInfo) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let axis = normalize_axis(node.attr_int("axis").unwrap_or(1), s.len() + 1)?;
        Some(vec![s[..axis].iter().product(), s[axis..].iter().product()])
    });
    TypeInfo::of(x.dtype, shape)
}

/// Map a possibly negative axis into `0..rank`.
pub fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

pub(super) fn axes_of(
    node: &Node,
    axes_input: &TypeInfo,
    opset: i64,
    attr_until: i64,
) -> Option<Vec<i64>> {
    if opset < attr_until {
        node.attr_ints("axes").map(|a| a.to_vec())
    } else {
        axes_input.value.clone()
    }
}

pub(super) fn unsqueeze(node: &Node, x: &TypeInfo, axes: &TypeInfo, opset: i64) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let axes = axes_of(node, axes, opset, 13)?;
        let rank = s.len() + axes.len();
        let mut norm: Vec<usize> = axes
            .iter()
            .map(|&a| normalize_axis(a, rank))
            .collect::<Option<_>>()?;
        norm.sort_unstable();
        let mut out = s.clone();
        for a in norm {
            if a > out.len() {
                return None;
            }
            out.insert(a, 1);
        }
        Some(out)
    });
    TypeInfo {
        dtype: x.dtype,
        value: shape.as_ref().and(x.value.clone()),
        shape,
    }
}

pub(super) fn squeeze(node: &Node, x: &TypeInfo, axes: &TypeInfo, opset: i64) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let axes = if node.inputs.len() > 1 || opset < 13 {
            axes_of(node, axes, opset, 13)
        } else {
            None
        };
        let drop: Vec<usize> = match axes {
            Some(a) => a
                .iter()
                .map(|&a| normalize_axis(a, s.len()))
                .collect::<Option<_>>()?,
            None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
        };
        Some(
            s.iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, &d)| d)
                .collect(),
        )
    });
    TypeInfo {
        dtype: x.dtype,
        value: shape.as_ref().and(x.value.clone()),
        shape,
    }
}

pub(super) fn concat(node: &Node, inputs: &[TypeInfo]) -> TypeInfo {
    let dtype = inputs.first().and_then(|t| t.dtype);
    let shapes: Option<Vec<&Vec<i64>>> = inputs.iter().map(|t| t.shape.as_ref()).collect();
    let shape = shapes.and_then(|shapes| {
        let first = shapes.first()?;
        let axis = normalize_axis(node.attr_int("axis")?, first.len())?;
        let mut out = (*first).clone();
        out[axis] = 0;
        for s in &shapes {
            if s.len() != out.len() {
                return None;
            }
            out[axis] += s[axis];
        }
        Some(out)
    });
    let value = if shape.as_ref().is_some_and(|s| s.len() == 1) {
        inputs
            .iter()
            .map(|t| t.value.clone())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat())
    } else {
        None
    };
    TypeInfo {
        dtype,
        shape,
        value,
    }
}

pub(super) fn split(node: &Node, x: &TypeInfo, sizes: &TypeInfo, opset: i64) -> Vec<TypeInfo> {
    let n = node.outputs.len();
    let unknown = vec![TypeInfo::of(x.dtype, None); n];
    let Some(s) = &x.shape else { return unknown };
    let Some(axis) = normalize_axis(node.attr_int("axis").unwrap_or(0), s.len()) else {
        return unknown;
    };
    let parts: Vec<i64> = if opset < 13 {
        node.attr_ints("split")
            .map(|v| v.to_vec())
            .unwrap_or_default()
    } else {
        sizes.value.clone().unwrap_or_default()
    };
    let parts = if parts.is_empty() {
        let each = (s[axis] + n as i64 - 1) / n as i64;
        (0..n as i64)
            .map(|i| each.min(s[axis] - i * each).max(0))
            .collect()
    } else {
        parts
    };
    if parts.len() != n {
        return unknown;
    }
    parts
        .iter()
        .map(|&p| {
            let mut o = s.clone();
            o[axis] = p;
            TypeInfo::of(x.dtype, Some(o))
        })
        .collect()
}

pub(super) fn slice(node: &Node, inputs: &[TypeInfo], opset: i64) -> TypeInfo {
    let x = inputs.first().cloned().unwrap_or_default();
    let get = |i: usize| inputs.get(i).and_then(|t| t.value.clone());
    let (starts, ends, axes, steps) = if opset < 10 {
        (
            node.attr_ints("starts").map(|v| v.to_vec()),
            node.attr_ints("ends").map(|v| v.to_vec()),
            node.attr_ints("axes").map(|v| v.to_vec()),
            None,
        )
    } else {
        let present = |i: usize| node.inputs.get(i).is_some_and(|n| !n.is_empty());
        (
            get(1),
            get(2),
            if present(3) { get(3) } else { None },
            if present(4) { get(4) } else { None },
        )
    };
    let (Some(shape), Some(starts), Some(ends)) = (x.shape.clone(), starts, ends) else {
        return TypeInfo::of(x.dtype, None);
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
        return TypeInfo::of(x.dtype, None);
    }
    let mut out = shape.clone();
    let mut ranges: Vec<(i64, i64, i64)> = shape.iter().map(|&d| (0, d, 1)).collect();
    for i in 0..axes.len() {
        let Some(a) = normalize_axis(axes[i], shape.len()) else {
            return TypeInfo::of(x.dtype, None);
        };
        let (d, step) = (shape[a], steps[i]);
        if step == 0 {
            return TypeInfo::of(x.dtype, None);
        }
        let clamp = |v: i64, lo: i64, hi: i64| {
            let v = if v < 0 { v.saturating_add(d) } else { v };
            v.clamp(lo, hi)
        };
        let (start, end) = if step > 0 {
            (clamp(starts[i], 0, d), clamp(ends[i], 0, d))
        } else {
            (clamp(starts[i], -1, d - 1), clamp(ends[i], -1, d - 1))
        };
        let (start128, end128, step128) = (start as i128, end as i128, step as i128);
        let len = if step > 0 {
            (end128 - start128 + step128 - 1).div_euclid(step128).max(0)
        } else {
            (start128 - end128 - step128 - 1)
                .div_euclid(-step128)
                .max(0)
        } as i64;
        out[a] = len;
        ranges[a] = (start, len, step);
    }
    let value = match (&x.value, shape.len()) {
        (Some(v), 1) => {
            let (start, len, step) = ranges[0];
            (0..len)
                .map(|k| {
                    let i = start as i128 + k as i128 * step as i128;
                    usize::try_from(i).ok().and_then(|i| v.get(i).copied())
                })
                .collect()
        }
        _ => None,
    };
    TypeInfo {
        dtype: x.dtype,
        shape: Some(out),
        value,
    }
}

pub(super) fn gather(node: &Node, x: &TypeInfo, indices: &TypeInfo) -> TypeInfo {
    let (Some(s), Some(is)) = (&x.shape, &indices.shape) else {
        return TypeInfo::of(x.dtype, None);
    };
    let Some(axis) = normalize_axis(node.attr_int("axis").unwrap_or(0), s.len()) else {
        return TypeInfo::of(x.dtype, None);
    };
    let mut out = s[..axis].to_vec();
    out.extend(is);
    out.extend(&s[axis + 1..]);
    let value = match (&x.value, &indices.value, s.len()) {
        (Some(v), Some(idx), 1) => idx
            .iter()
            .map(|&i| {
                let i = if i < 0 { i + s[0] } else { i };
                v.get(i as usize).copied()
            })
            .collect(),
        _ => None,
    };
    TypeInfo {
        dtype: x.dtype,
        shape: Some(out),
        value,
    }
}

pub(super) fn shape_of(node: &Node, x: &TypeInfo) -> TypeInfo {
    let Some(s) = &x.shape else {
        return TypeInfo::of(Some(DataType::I64), x.rank().map(|r| vec![r as i64]));
    };
    let r = s.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(node.attr_int("start").unwrap_or(0));
    let end = clamp(node.attr_int("end").unwrap_or(r));
    let v: Vec<i64> = if start < end {
        s[start..end].to_vec()
    } else {
        vec![]
    };
    TypeInfo::with_value(Some(DataType::I64), vec![v.len() as i64], v)
}

pub(super) fn constant_of_shape(node: &Node, shape: &TypeInfo) -> TypeInfo {
    let fill = node.attr_tensor("value");
    let dtype = fill.map(|t| t.dtype).unwrap_or(DataType::F32);
    let Some(dims) = &shape.value else {
        return TypeInfo::of(Some(dtype), None);
    };
    let n = dims
        .iter()
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))
        .unwrap_or(i64::MAX);
    let value = fill
        .and_then(|t| t.to_i64_vec())
        .and_then(|v| v.first().copied())
        .filter(|_| dtype.is_integer() && n as usize <= MAX_TRACKED_VALUES)
        .map(|f| vec![f; n as usize]);
    TypeInfo {
        dtype: Some(dtype),
        shape: Some(dims.clone()),
        value,
    }
}

pub(super) fn range(inputs: &[TypeInfo]) -> TypeInfo {
    let dtype = inputs.first().and_then(|t| t.dtype);
    let scalar = |i: usize| inputs.get(i)?.value.as_ref()?.first().copied();
    match (scalar(0), scalar(1), scalar(2)) {
        (Some(start), Some(limit), Some(delta)) if delta != 0 => {
            let n = ((limit as f64 - start as f64) / delta as f64)
                .ceil()
                .max(0.0) as i64;
            let value = (n as usize <= MAX_TRACKED_VALUES).then(|| {
                (0..n)
                    .map(|k| start.wrapping_add(k.wrapping_mul(delta)))
                    .collect()
            });
            TypeInfo {
                dtype,
                shape: Some(vec![n]),
                value,
            }
        }
        _ => TypeInfo::of(dtype, None),
    }
}

pub(super) fn pad(node: &Node, x: &TypeInfo, pads: &TypeInfo) -> TypeInfo {
    let pads = node
        .attr_ints("pads")
        .map(|p| p.to_vec())
        .or_else(|| pads.value.clone());
    let has_axes = node.inputs.get(3).is_some_and(|n| !n.is_empty());
    let shape = match (&x.shape, pads) {
        (Some(s), Some(p)) if p.len() == 2 * s.len() && !has_axes => s
            .iter()
            .enumerate()
            .map(|(i, &d)| d.checked_add(p[i])?.checked_add(p[i + s.len()]))
            .collect::<Option<_>>(),
        _ => None,
    };
    TypeInfo::of(x.dtype, shape)
}
