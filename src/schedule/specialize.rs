//! Resolving a baked schedule for one decision pattern.
//!
//! A bundle's graph holds an `If` per scheduled site. For a given step the decisions are known in
//! advance (static tables), so the runtime inlines the taken branch of every `If` and plans the plain
//! graph that results, once per distinct pattern. tract would otherwise re-plan the taken branch on
//! every call. The same specialised graphs give the exact FLOPs of each step.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::analysis::flops::node_flops;
use crate::ir::{
    infer_types, remove_dead_nodes, remove_unused_inputs, AttrValue, Graph, Model, Node,
};
use crate::passes::condition_name;
use crate::schedule::Decider;

/// Compute (true) or reuse (false) per table (group, or one block's group).
pub type Pattern = BTreeMap<Decider, bool>;

/// `model` with every schedule `If` replaced by its taken branch, dead nodes and unused inputs removed.
pub fn specialize(model: &Model, pattern: &Pattern) -> Result<Model> {
    specialize_without(model, pattern, &[])
}

/// As [`specialize`], also dropping the graph outputs named in `drop` (state a step does not change)
/// and whatever only they needed.
pub fn specialize_without(model: &Model, pattern: &Pattern, drop: &[String]) -> Result<Model> {
    let conditions: BTreeMap<String, bool> = pattern
        .iter()
        .map(|(k, &c)| (condition_name(*k), c))
        .collect();
    let mut out = model.clone();
    let mut nodes = Vec::with_capacity(out.graph.nodes.len());
    for node in std::mem::take(&mut out.graph.nodes) {
        let decided = (node.op_type == "If")
            .then(|| node.inputs.first().and_then(|c| conditions.get(c)))
            .flatten();
        match decided {
            Some(&compute) => inline_branch(&node, compute, &mut nodes, &mut out.graph)?,
            None => nodes.push(node),
        }
    }
    out.graph.nodes = nodes;
    out.graph.outputs.retain(|o| !drop.contains(&o.name));
    remove_dead_nodes(&mut out.graph);
    remove_unused_inputs(&mut out.graph);
    Ok(out)
}

pub(crate) fn inline_branch(
    node: &Node,
    compute: bool,
    nodes: &mut Vec<Node>,
    graph: &mut Graph,
) -> Result<()> {
    let key = if compute {
        "then_branch"
    } else {
        "else_branch"
    };
    let Some(AttrValue::Graph(branch)) = node.attr(key) else {
        bail!("node {} has no {key}", node.label());
    };
    if branch.outputs.len() != node.outputs.len() {
        bail!(
            "node {}: {key} has {} outputs for {}",
            node.label(),
            branch.outputs.len(),
            node.outputs.len()
        );
    }
    graph
        .initializers
        .extend(branch.initializers.iter().cloned());
    nodes.extend(branch.nodes.iter().cloned());
    for (j, (inner, outer)) in branch.outputs.iter().zip(&node.outputs).enumerate() {
        // One name per output: `.out`, `.out1`, `.out2`, ...
        let suffix = if j == 0 { String::new() } else { j.to_string() };
        nodes.push(Node::new(
            &format!("{}.{key}.out{suffix}", node.name),
            "Identity",
            &[&inner.name],
            &[outer],
        ));
    }
    Ok(())
}

/// FLOPs of one call of `model` (after specialisation: only what runs).
pub fn model_flops(model: &Model) -> u64 {
    let types = infer_types(&model.graph, model.default_opset());
    model
        .graph
        .nodes
        .iter()
        .map(|n| node_flops(n, &types))
        .sum()
}
