//! Axis provenance: for every dimension of every value, which axes of the model's inputs it spans.
//!
//! This is how attention sites are classified without looking at names. The latent input is tagged by
//! its layout (diffusers' convention: video `[B, C, F, H, W]`, image `[B, C, H, W]`), a rank-3 float
//! input is a condition sequence `[B, L, D]` (text tokens). An input whose doc_string declares
//! `ditc.layout=<letters>` (B batch, C channels, F frames, H height, W width, L text tokens; one letter
//! per axis, e.g. `ditc.layout=BFCHW` for CogVideoX's latent) is tagged by that instead. Tags then flow through layout ops: a
//! dimension is a list of *atoms* (tag set, size) in row-major order, so `Reshape` can split and merge
//! them, `Transpose` permutes them, `Conv` keeps spatial tags at the new size, `MatMul` takes rows from
//! its left operand and columns from its right, `Concat` unions tags. Anything without a rule gets
//! fresh channel atoms, which never look like a sequence axis.

use std::collections::HashMap;

use crate::ir::infer::{broadcast, normalize_axis};
use crate::ir::{DataType, Graph, Node, TypeInfo, TypeMap};

pub const BATCH: u8 = 1;
pub const FRAME: u8 = 2;
pub const HEIGHT: u8 = 4;
pub const WIDTH: u8 = 8;
pub const TEXT: u8 = 16;
pub const CHANNEL: u8 = 32;
pub const VIDEO: u8 = FRAME | HEIGHT | WIDTH;

/// A factor of a dimension: which input axes it comes from, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Atom {
    pub tags: u8,
    pub size: i64,
}

/// The atoms of one dimension (outer first); their sizes multiply to the dimension's size.
pub type DimAxes = Vec<Atom>;
/// Per-dimension atoms of one value.
pub type Axes = Vec<DimAxes>;

/// Union of the tags of one dimension.
pub fn tags_of(dim: &DimAxes) -> u8 {
    dim.iter().fold(0, |acc, a| acc | a.tags)
}

/// Human-readable names of a tag set, e.g. `["frame"]`.
pub fn tag_names(tags: u8) -> Vec<&'static str> {
    [
        (BATCH, "batch"),
        (FRAME, "frame"),
        (HEIGHT, "height"),
        (WIDTH, "width"),
        (TEXT, "text"),
        (CHANNEL, "channel"),
    ]
    .iter()
    .filter(|(t, _)| tags & t != 0)
    .map(|(_, n)| *n)
    .collect()
}

fn atom(tags: u8, size: i64) -> DimAxes {
    if size == 1 {
        vec![]
    } else {
        vec![Atom { tags, size }]
    }
}

/// A dimension with no traced origin is a channel dimension.
fn or_channel(tags: u8) -> u8 {
    if tags == 0 {
        CHANNEL
    } else {
        tags
    }
}

/// The axis tags an input declares in its doc_string (`ditc.layout=BFCHW`), if any.
pub fn declared_layout(doc: &str) -> Option<Vec<u8>> {
    let letters = doc
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ditc.layout="))?;
    letters
        .chars()
        .map(|c| match c {
            'B' => Some(BATCH),
            'C' => Some(CHANNEL),
            'F' => Some(FRAME),
            'H' => Some(HEIGHT),
            'W' => Some(WIDTH),
            'L' => Some(TEXT),
            _ => None,
        })
        .collect()
}

fn fresh(shape: &[i64]) -> Axes {
    shape.iter().map(|&d| atom(CHANNEL, d)).collect()
}

/// Tag the runtime inputs by layout convention and propagate through the graph.
pub fn propagate(graph: &Graph, types: &TypeMap) -> HashMap<String, Axes> {
    let mut axes: HashMap<String, Axes> = HashMap::new();
    for input in graph.runtime_inputs() {
        let Some(shape) = types.get(&input.name).and_then(|t| t.shape.clone()) else {
            continue;
        };
        let is_float = input.dtype().is_some_and(DataType::is_float);
        let declared = declared_layout(&input.doc_string).filter(|l| l.len() == shape.len());
        let layout: &[u8] = match (is_float, shape.len()) {
            _ if declared.is_some() => declared.as_deref().unwrap_or_default(),
            (true, 5) => &[BATCH, CHANNEL, FRAME, HEIGHT, WIDTH],
            (true, 4) => &[BATCH, CHANNEL, HEIGHT, WIDTH],
            (true, 3) => &[BATCH, TEXT, CHANNEL],
            _ => &[],
        };
        let tagged = if layout.is_empty() {
            fresh(&shape)
        } else {
            shape
                .iter()
                .zip(layout)
                .map(|(&d, &t)| atom(t, d))
                .collect()
        };
        axes.insert(input.name.clone(), tagged);
    }
    for node in &graph.nodes {
        let ins: Vec<Option<&Axes>> = node.inputs.iter().map(|n| axes.get(n)).collect();
        let in_types: Vec<TypeInfo> = node
            .inputs
            .iter()
            .map(|n| types.get(n).cloned().unwrap_or_default())
            .collect();
        let mut results = Vec::new();
        for (k, out) in node.outputs.iter().enumerate() {
            let Some(shape) = types.get(out).and_then(|t| t.shape.clone()) else {
                continue;
            };
            let derived = node_axes(node, k, &ins, &in_types, &shape)
                .filter(|a| consistent(a, &shape))
                .unwrap_or_else(|| fresh(&shape));
            results.push((out.clone(), derived));
        }
        axes.extend(results);
    }
    axes
}

fn consistent(axes: &Axes, shape: &[i64]) -> bool {
    axes.len() == shape.len()
        && axes
            .iter()
            .zip(shape)
            .all(|(d, &s)| d.iter().map(|a| a.size).product::<i64>() == s)
}

/// Axes of output `k` of `node`, or `None` for "no rule" (fresh channel atoms).
fn node_axes(
    node: &Node,
    k: usize,
    ins: &[Option<&Axes>],
    in_types: &[TypeInfo],
    out_shape: &[i64],
) -> Option<Axes> {
    let x = ins.first().copied().flatten();
    let shape_of = |i: usize| in_types.get(i).and_then(|t| t.shape.clone());
    match node.op_type.as_str() {
        "Transpose" => {
            let x = x?;
            let perm: Vec<i64> = node
                .attr_ints("perm")
                .map(|p| p.to_vec())
                .unwrap_or_else(|| (0..x.len() as i64).rev().collect());
            perm.iter().map(|&p| x.get(p as usize).cloned()).collect()
        }
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => regroup(x?, out_shape),
        "MatMul" => matmul(ins, in_types, out_shape),
        "Gemm" => {
            let (a, b) = (x?, ins.get(1).copied().flatten());
            let m = if node.attr_int("transA").unwrap_or(0) != 0 {
                a.get(1)
            } else {
                a.first()
            };
            let n = match b {
                Some(b) if node.attr_int("transB").unwrap_or(0) != 0 => b.first().cloned(),
                Some(b) => b.get(1).cloned(),
                None => None,
            };
            Some(vec![
                m?.clone(),
                n.unwrap_or_else(|| atom(CHANNEL, out_shape[1])),
            ])
        }
        "Conv" => {
            let x = x?;
            let mut out = vec![x.first()?.clone(), atom(CHANNEL, out_shape[1])];
            for (i, &size) in out_shape.iter().enumerate().skip(2) {
                out.push(atom(or_channel(tags_of(x.get(i)?)), size));
            }
            Some(out)
        }
        "Concat" => {
            let axis = normalize_axis(node.attr_int("axis")?, out_shape.len())?;
            let present: Vec<&Axes> = ins.iter().flatten().copied().collect();
            let mut out = elementwise(&present, out_shape);
            let union = present
                .iter()
                .filter_map(|a| a.get(axis))
                .fold(0, |acc, d| acc | tags_of(d));
            out[axis] = atom(if union == 0 { CHANNEL } else { union }, out_shape[axis]);
            Some(out)
        }
        "Gather" => {
            let x = x?;
            let axis = normalize_axis(node.attr_int("axis").unwrap_or(0), x.len())?;
            let idx_rank = shape_of(1)?.len();
            let idx_axes = ins.get(1).copied().flatten().cloned();
            let mut out: Axes = x[..axis].to_vec();
            match idx_axes {
                Some(ia) => out.extend(ia),
                None => out.extend(fresh(&out_shape[axis..axis + idx_rank])),
            }
            out.extend(x[axis + 1..].iter().cloned());
            Some(out)
        }
        "Einsum" => einsum(node, ins, out_shape),
        // Rotary embeddings write rotated halves into a fresh buffer: the updates carry the axes.
        "ScatterND" | "ScatterElements" => {
            let data = x?;
            match ins.get(2).copied().flatten() {
                Some(updates) if updates.len() == data.len() => {
                    Some(elementwise(&[data, updates], out_shape))
                }
                _ => Some(data.clone()),
            }
        }
        "Attention" if k == 0 => {
            let (q, v) = (x?, ins.get(2).copied().flatten());
            let mut out = q.clone();
            let last = out.len().checked_sub(1)?;
            out[last] = v
                .and_then(|v| v.last().cloned())
                .unwrap_or_else(|| atom(CHANNEL, out_shape[last]));
            Some(out)
        }
        "Where" | "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Equal" | "Less"
        | "Greater" | "And" | "Or" | "Mod" | "Sum" | "Expand" => {
            let operands: Vec<&Axes> = match node.op_type.as_str() {
                "Expand" => vec![x?],
                _ => ins.iter().flatten().copied().collect(),
            };
            Some(elementwise(&operands, out_shape))
        }
        _ => same_rank(x?, out_shape),
    }
}

/// Shape-preserving ops keep their input's axes; a resized dimension keeps its tags as one atom.
fn same_rank(x: &Axes, out_shape: &[i64]) -> Option<Axes> {
    if x.len() != out_shape.len() {
        return None;
    }
    Some(
        x.iter()
            .zip(out_shape)
            .map(|(d, &s)| {
                if d.iter().map(|a| a.size).product::<i64>() == s {
                    d.clone()
                } else {
                    atom(or_channel(tags_of(d)), s)
                }
            })
            .collect(),
    )
}

/// Broadcasting: each output dimension takes the most informative operand dimension of its size.
fn elementwise(operands: &[&Axes], out_shape: &[i64]) -> Axes {
    let rank = out_shape.len();
    (0..rank)
        .map(|i| {
            let mut best: Option<&DimAxes> = None;
            for op in operands {
                if op.len() + i < rank {
                    continue;
                }
                let d = &op[i + op.len() - rank];
                let size: i64 = d.iter().map(|a| a.size).product();
                if size != out_shape[i] {
                    continue;
                }
                let informative = |d: &DimAxes| tags_of(d) & !CHANNEL != 0;
                if best.is_none() || (informative(d) && !informative(best.expect("set"))) {
                    best = Some(d);
                }
            }
            best.cloned().unwrap_or_else(|| atom(CHANNEL, out_shape[i]))
        })
        .collect()
}

fn matmul(ins: &[Option<&Axes>], in_types: &[TypeInfo], out_shape: &[i64]) -> Option<Axes> {
    let a = ins.first().copied().flatten()?;
    let a_shape = in_types.first()?.shape.clone()?;
    let b_shape = in_types.get(1)?.shape.clone()?;
    if a_shape.len() < 2 || b_shape.len() < 2 {
        return None;
    }
    let b_fresh = fresh(&b_shape);
    let b = ins.get(1).copied().flatten().unwrap_or(&b_fresh);
    broadcast(&a_shape[..a_shape.len() - 2], &b_shape[..b_shape.len() - 2])?;
    let batch_shape = &out_shape[..out_shape.len() - 2];
    let a_batch: Axes = a[..a.len() - 2].to_vec();
    let b_batch: Axes = b[..b.len() - 2].to_vec();
    let mut out = elementwise(&[&a_batch, &b_batch], batch_shape);
    out.push(a[a.len() - 2].clone());
    out.push(b[b.len() - 1].clone());
    Some(out)
}

fn einsum(node: &Node, ins: &[Option<&Axes>], out_shape: &[i64]) -> Option<Axes> {
    let eq = node.attr_string("equation")?.replace(' ', "");
    let (lhs, rhs) = eq.split_once("->")?;
    if eq.contains("...") {
        return None;
    }
    let mut by_letter: HashMap<char, DimAxes> = HashMap::new();
    for (term, a) in lhs.split(',').zip(ins) {
        let Some(a) = a else { continue };
        for (c, d) in term.chars().zip(a.iter()) {
            let e = by_letter.entry(c).or_insert_with(|| d.clone());
            if tags_of(e) & !CHANNEL == 0 && !d.is_empty() {
                *e = d.clone();
            }
        }
    }
    rhs.chars()
        .zip(out_shape)
        .map(|(c, &s)| {
            Some(
                by_letter
                    .get(&c)
                    .cloned()
                    .unwrap_or_else(|| atom(CHANNEL, s)),
            )
        })
        .collect()
}

/// Re-split the row-major atom sequence of `x` into `out_shape`.
pub fn regroup(x: &Axes, out_shape: &[i64]) -> Option<Axes> {
    let mut queue: std::collections::VecDeque<Atom> = x.iter().flatten().copied().collect();
    let mut out = Vec::with_capacity(out_shape.len());
    for &size in out_shape {
        if size <= 0 {
            return None; // empty tensors carry no sequence
        }
        let mut need = size;
        let mut dim = Vec::new();
        while need > 1 {
            let front = queue.front_mut()?;
            if front.size <= 0 {
                return None;
            }
            if front.size <= need && need % front.size == 0 {
                need /= front.size;
                dim.push(queue.pop_front()?);
            } else if front.size % need == 0 {
                dim.push(Atom {
                    tags: front.tags,
                    size: need,
                });
                front.size /= need;
                need = 1;
            } else {
                return None;
            }
        }
        out.push(dim);
    }
    queue.iter().all(|a| a.size == 1).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regroup_splits_and_merges() {
        // [F=8, (H=8, W=8)] viewed as [8, 4, 16] keeps F, splits the HW run into 4 x 16.
        let x: Axes = vec![
            vec![Atom {
                tags: FRAME,
                size: 8,
            }],
            vec![
                Atom {
                    tags: HEIGHT,
                    size: 8,
                },
                Atom {
                    tags: WIDTH,
                    size: 8,
                },
            ],
        ];
        let r = regroup(&x, &[8, 4, 16]).unwrap();
        assert_eq!(tags_of(&r[0]), FRAME);
        assert_eq!(tags_of(&r[1]), HEIGHT);
        assert_eq!(tags_of(&r[2]), HEIGHT | WIDTH);
        assert!(regroup(&x, &[3, 5]).is_none());
        // Zero-sized dimensions (found by fuzzing: a remainder by zero).
        let empty: Axes = vec![vec![Atom {
            tags: FRAME,
            size: 0,
        }]];
        assert!(regroup(&empty, &[2]).is_none());
        assert!(regroup(&x, &[0, 512]).is_none());
    }
}
