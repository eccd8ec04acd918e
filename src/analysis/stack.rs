//! The residual stream through the transformer blocks: where the hidden states enter and leave each
//! block, found from graph structure (step caches such as MagCache and FirstBlockCache cache the
//! difference between two points of it).
//!
//! A block's output is the residual `Add` after its feed-forward network: the first `Add` downstream
//! of the FFN's result (through gating `Mul`s, casts and reshapes) whose other operand the FFN itself
//! depends on (the stream `h` of `h + gate * ffn(norm(h))`). Its input is found by walking back from
//! the output along the skip operand of each residual `Add` (the operand the other one depends on)
//! until the value no longer depends on any of the block's attention sites. The blocks form one stack
//! when each block's input is the previous block's output, or is computed from it by layout ops and
//! constant additions only ([`is_link`]: Latte's spatial and temporal blocks read the stream reshaped
//! and transposed between `[batch x frames, tokens, channels]` and `[batch x tokens, frames,
//! channels]`, plus a positional embedding before the first temporal block). The stack's output is
//! then the last block's output carried by layout ops back to the input's shape (Latte's final
//! reshape), so `output - input` is the whole stack's residual element by element.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};

use super::DitMap;
use crate::ir::{Graph, TypeMap};

/// Where one block's hidden states enter and leave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpan {
    /// The block's index in the DiT map.
    pub block: usize,
    pub input: String,
    pub output: String,
}

/// The whole stack of transformer blocks on the hidden-states stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub blocks: Vec<BlockSpan>,
    /// Shape of the stream at the stack's input and output.
    pub shape: Vec<i64>,
    /// The hidden states leaving the stack, in the input's layout: the last block's output, or the
    /// value layout ops carry it to (Latte).
    pub exit: String,
    /// Whether every block reads the previous block's output itself (one layout throughout, as Wan);
    /// false where blocks are linked by [`is_link`] ops (Latte).
    pub one_layout: bool,
}

impl Stack {
    /// The hidden states entering the first block.
    pub fn input(&self) -> &str {
        &self.blocks[0].input
    }

    /// The hidden states leaving the stack, in the input's layout.
    pub fn output(&self) -> &str {
        &self.exit
    }
}

/// Ops that may carry the last block's output back to the input's layout.
const LAYOUT: &[&str] = &[
    "Reshape",
    "Transpose",
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
];

/// Whether an op may link one block's output to the next block's input: a layout change
/// ([`LAYOUT`]), or an `Add` of a constant (a positional embedding).
fn is_link(op: &str) -> bool {
    LAYOUT.contains(&op) || op == "Add"
}

/// Ops allowed between an FFN's result and the residual `Add` that closes its block.
const TO_RESIDUAL: &[&str] = &[
    "Mul",
    "Add",
    "Cast",
    "Identity",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
];

/// Find the block stack of `graph` (whose DiT map is `map`), or say why there is none.
pub fn find_stack(graph: &Graph, map: &DitMap, types: &TypeMap) -> Result<Stack> {
    if map.blocks.is_empty() {
        bail!("no transformer blocks were found (no attention site closed by a feed-forward network), so there is no block stack to cache");
    }
    let index = Index::new(graph);
    let mut blocks: Vec<BlockSpan> = Vec::with_capacity(map.blocks.len());
    let mut one_layout = true;
    for b in &map.blocks {
        let what = format!("block {} ({})", b.index, b.name);
        let ffn = b.ffn_output.as_deref().with_context(|| {
            format!("{what} has no feed-forward network closing it, so its output cannot be found")
        })?;
        let anchors: Vec<&str> = b
            .attention
            .iter()
            .filter_map(|&id| index.output_of_node(&map.attention[id].anchor))
            .collect();
        let output = index
            .residual_after(ffn)
            .with_context(|| format!("{what}: no residual Add after its feed-forward network"))?;
        let input = index
            .stream_input(&output, &anchors)
            .with_context(|| format!("{what}: cannot follow its residual stream back"))?;
        if let Some(previous) = blocks.last() {
            if previous.output != input && index.linked(&previous.output, &input) {
                one_layout = false;
            } else if previous.output != input {
                bail!(
                    "{what} reads the hidden states '{input}', not block {}'s output '{}': the blocks do not form one residual stream",
                    previous.block,
                    previous.output
                );
            }
        }
        blocks.push(BlockSpan {
            block: b.index,
            input,
            output,
        });
    }
    let shape_of = |v: &str| types.get(v).and_then(|t| t.shape.clone());
    let (first, last) = (&blocks[0].input, &blocks.last().expect("non-empty").output);
    let (Some(a), Some(b)) = (shape_of(first), shape_of(last)) else {
        bail!("the shapes of the block stack's input '{first}' and output '{last}' are unknown");
    };
    let exit = if a == b {
        last.clone()
    } else {
        match index.back_to_shape(last, &a, types) {
            Some(exit) if !one_layout => exit,
            _ => bail!(
                "the block stack's input '{first}' {a:?} and output '{last}' {b:?} differ in shape"
            ),
        }
    };
    Ok(Stack {
        blocks,
        shape: a,
        exit,
        one_layout,
    })
}

/// Producers and consumers of the top-level graph's values.
struct Index<'a> {
    graph: &'a Graph,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Index<'a> {
    fn new(graph: &'a Graph) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.as_str(), i);
            }
            for v in n.present_inputs() {
                consumers.entry(v).or_default().push(i);
            }
        }
        Index {
            graph,
            producer,
            consumers,
        }
    }

    fn output_of_node(&self, name: &str) -> Option<&'a str> {
        let node = self.graph.nodes.iter().find(|n| n.name == name)?;
        node.outputs.first().map(String::as_str)
    }

    /// Every value `value` is computed from (not itself), through producers.
    fn ancestors(&self, value: &str) -> HashSet<&'a str> {
        let mut seen = HashSet::new();
        let mut todo = vec![value];
        while let Some(v) = todo.pop() {
            let Some(&i) = self.producer.get(v) else {
                continue;
            };
            for input in self.graph.nodes[i].present_inputs() {
                if seen.insert(input) {
                    todo.push(input);
                }
            }
        }
        seen
    }

    /// The residual `Add` after `ffn`: reached from it through [`TO_RESIDUAL`] ops, its other operand
    /// an ancestor of `ffn` (the stream the FFN read).
    fn residual_after(&self, ffn: &str) -> Option<String> {
        let upstream = self.ancestors(ffn);
        let mut frontier = vec![ffn.to_string()];
        for _ in 0..8 {
            let mut next = Vec::new();
            for v in &frontier {
                for &i in self.consumers.get(v.as_str()).into_iter().flatten() {
                    let node = &self.graph.nodes[i];
                    if !TO_RESIDUAL.contains(&node.op_type.as_str()) {
                        continue;
                    }
                    let other = node.present_inputs().find(|x| x != v);
                    let is_stream = other.is_some_and(|o| {
                        upstream.contains(o) && self.graph.initializer(o).is_none()
                    });
                    if node.op_type == "Add" && is_stream {
                        return node.outputs.first().cloned();
                    }
                    next.extend(node.outputs.iter().cloned());
                }
            }
            frontier = next;
        }
        None
    }

    /// Whether `to` is computed from `from` by [`is_link`] ops alone (each `Add`'s other operand a
    /// constant: an initializer or a `Constant` node's output).
    fn linked(&self, from: &str, to: &str) -> bool {
        let mut v = to;
        for _ in 0..16 {
            if v == from {
                return true;
            }
            let Some(&i) = self.producer.get(v) else {
                return false;
            };
            let node = &self.graph.nodes[i];
            if !is_link(&node.op_type) {
                return false;
            }
            let Some(stream) = node.inputs.first() else {
                return false;
            };
            if node.op_type == "Add" {
                let operands: Vec<&str> = node.present_inputs().collect();
                let [a, b] = operands[..] else {
                    return false;
                };
                let (stream, other) = if self.is_constant(b) { (a, b) } else { (b, a) };
                if !self.is_constant(other) {
                    return false;
                }
                v = stream;
            } else {
                v = stream;
            }
        }
        false
    }

    fn is_constant(&self, v: &str) -> bool {
        self.graph.initializer(v).is_some()
            || self
                .producer
                .get(v)
                .is_some_and(|&i| self.graph.nodes[i].op_type == "Constant")
    }

    /// The value of shape `shape` that [`LAYOUT`] ops carry `from` to (each value on the way read by
    /// one layout op only), if any within 8 ops.
    fn back_to_shape(&self, from: &str, shape: &[i64], types: &TypeMap) -> Option<String> {
        let mut v = from.to_string();
        for _ in 0..8 {
            let consumers = self.consumers.get(v.as_str())?;
            let [i] = consumers[..] else {
                return None;
            };
            let node = &self.graph.nodes[i];
            if !LAYOUT.contains(&node.op_type.as_str()) || node.inputs.first() != Some(&v) {
                return None;
            }
            v = node.outputs.first()?.clone();
            if types.get(&v).and_then(|t| t.shape.as_deref()) == Some(shape) {
                return Some(v);
            }
        }
        None
    }

    /// Walk back from a block's `output` along skip operands until the value depends on none of the
    /// block's attention `anchors`.
    fn stream_input(&self, output: &str, anchors: &[&str]) -> Result<String> {
        let mut v = output.to_string();
        loop {
            let upstream = self.ancestors(&v);
            let in_block = anchors.iter().any(|a| upstream.contains(a) || *a == v);
            if !in_block {
                return Ok(v);
            }
            let node = self
                .producer
                .get(v.as_str())
                .map(|&i| &self.graph.nodes[i])
                .with_context(|| format!("'{v}' has no producer"))?;
            let operands: Vec<&str> = node.present_inputs().collect();
            let [a, b] = operands[..] else {
                bail!(
                    "'{v}' comes from {} ({}), not from a residual Add",
                    node.label(),
                    node.op_type
                );
            };
            if node.op_type != "Add" {
                bail!(
                    "'{v}' comes from {} ({}), not from a residual Add",
                    node.label(),
                    node.op_type
                );
            }
            v = if self.ancestors(b).contains(a) {
                a.to_string()
            } else if self.ancestors(a).contains(b) {
                b.to_string()
            } else {
                bail!(
                    "neither operand of {} is the stream the other was computed from",
                    node.label()
                );
            };
        }
    }
}
