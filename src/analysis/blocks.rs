//! Transformer blocks, found from the residual structure rather than names.
//!
//! A block is a run of attention sites closed by a feed-forward network (FFN): two linear layers with
//! an activation (`Gelu`, `Erf`, `Tanh`, `Sigmoid`, `Relu`) between them, that depends on those sites'
//! outputs. Latte therefore has one block per spatial (self + cross + FFN) and temporal (self + FFN)
//! transformer block; MLPs that do not read any attention output (timestep embedders, caption
//! projections) close nothing. A single-stream block (HunyuanVideo) is closed by its output projection,
//! which reads the attention output and the activated MLP joined by a `Concat`. Sites after the last
//! FFN form a final block.

use std::collections::HashMap;

use serde::Serialize;

use super::attention::{AttentionKind, AttentionSite, Context};
use crate::ir::Node;

#[derive(Clone, Debug, Serialize)]
pub struct Block {
    pub index: usize,
    /// Longest common prefix of the block's node names (for reading only; never used to classify).
    pub name: String,
    /// Ids of the attention sites in this block.
    pub attention: Vec<usize>,
    pub kinds: Vec<AttentionKind>,
    /// The FFN's two linear layers, when the block has one.
    pub ffn: Option<[String; 2]>,
    /// The FFN's result (after the second linear layer and its bias), when found.
    pub ffn_output: Option<String>,
    /// Index among blocks whose first attention site has the same kind (Latte: spatial block 0..N and
    /// temporal block 0..N), the numbering PAB's MLP broadcast configs use.
    pub family_index: usize,
}

const ACTIVATIONS: &[&str] = &[
    "Gelu", "Erf", "Tanh", "Sigmoid", "Relu", "FastGelu", "BiasGelu",
];
const FFN_PATH: &[&str] = &[
    "Mul", "Add", "Div", "Pow", "Sub", "Cast", "Identity", "Gelu", "Erf", "Tanh", "Sigmoid",
    "Relu", "Split", "Slice", "Reshape", "Concat",
];

pub fn find_blocks(ctx: &Context, sites: &[AttentionSite], order: &[usize]) -> Vec<Block> {
    let last_site = latest_site_dependency(ctx, sites, order);
    let mut blocks = Vec::new();
    let mut next = 0usize;
    for &i in order {
        let node = &ctx.graph.nodes[i];
        if next >= sites.len() || !ctx.is_linear(node) {
            continue;
        }
        let Some(first) = ffn_first_linear(ctx, node) else {
            continue;
        };
        let Some(k) = last_site.get(node.inputs[0].as_str()).copied().flatten() else {
            continue;
        };
        if k < next {
            continue;
        }
        let ids: Vec<usize> = (next..=k).collect();
        let ffn = Some([first.name.clone(), node.name.clone()]);
        let mut block = make_block(blocks.len(), sites, ids, ffn);
        block.ffn_output = Some(ctx.bias_output(node));
        blocks.push(block);
        next = k + 1;
    }
    if next < sites.len() {
        let ids: Vec<usize> = (next..sites.len()).collect();
        blocks.push(make_block(blocks.len(), sites, ids, None));
    }
    let mut seen: HashMap<Option<AttentionKind>, usize> = HashMap::new();
    for b in &mut blocks {
        let counter = seen.entry(b.kinds.first().copied()).or_insert(0);
        b.family_index = *counter;
        *counter += 1;
    }
    blocks
}

/// For each value: the highest site id whose anchor it depends on.
fn latest_site_dependency<'a>(
    ctx: &Context<'a>,
    sites: &[AttentionSite],
    order: &[usize],
) -> HashMap<&'a str, Option<usize>> {
    let anchors: HashMap<&str, usize> = sites.iter().map(|s| (s.anchor.as_str(), s.id)).collect();
    let mut dep: HashMap<&str, Option<usize>> = HashMap::new();
    for &i in order {
        let node = &ctx.graph.nodes[i];
        let mut d = node
            .present_inputs()
            .filter_map(|v| dep.get(v).copied().flatten())
            .max();
        if let Some(&s) = anchors.get(node.name.as_str()) {
            d = d.max(Some(s));
        }
        for o in &node.outputs {
            dep.insert(o.as_str(), d);
        }
    }
    dep
}

/// If `second` is the down-projection of an FFN, the FFN's up-projection.
fn ffn_first_linear<'a>(ctx: &Context<'a>, second: &Node) -> Option<&'a Node> {
    let mut frontier = vec![second.inputs.first()?.clone()];
    let mut saw_activation = false;
    for _ in 0..12 {
        let mut next = Vec::new();
        for v in &frontier {
            let Some(node) = ctx.producer(v) else {
                continue;
            };
            if ctx.is_linear(node) {
                if saw_activation {
                    return Some(node);
                }
                continue;
            }
            if ACTIVATIONS.contains(&node.op_type.as_str()) {
                saw_activation = true;
            }
            if FFN_PATH.contains(&node.op_type.as_str()) {
                next.extend(node.present_inputs().map(str::to_string));
            }
        }
        if next.is_empty() {
            return None;
        }
        frontier = next;
    }
    None
}

fn make_block(
    index: usize,
    sites: &[AttentionSite],
    ids: Vec<usize>,
    ffn: Option<[String; 2]>,
) -> Block {
    let mut names: Vec<&str> = ids.iter().map(|&i| sites[i].anchor.as_str()).collect();
    if let Some([a, b]) = &ffn {
        names.push(a);
        names.push(b);
    }
    Block {
        index,
        name: common_prefix(&names),
        kinds: ids.iter().map(|&i| sites[i].kind).collect(),
        attention: ids,
        ffn,
        ffn_output: None,
        family_index: 0,
    }
}

fn common_prefix(names: &[&str]) -> String {
    let Some(first) = names.first() else {
        return String::new();
    };
    let mut len = first.len();
    for n in &names[1..] {
        len = first
            .bytes()
            .zip(n.bytes())
            .take_while(|(a, b)| a == b)
            .count()
            .min(len);
    }
    let prefix = &first[..len];
    // Cut at the last separator so the name reads as a module path.
    match prefix.rfind(['/', '.']) {
        Some(i) => prefix[..i].to_string(),
        None => prefix.to_string(),
    }
}
