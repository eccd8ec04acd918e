//! Splitting a graph at an `If` whose condition is computed at run time, as TensorRT runs it.
//!
//! TensorRT copies an `If`'s 0-D condition to the host and launches only the taken branch. tract, in
//! contrast, re-plans the taken branch on every call. So the runtime splits the graph at the `If` into
//! a *prefix* (every node that does not depend on the `If`'s results: the condition, what the branches
//! read, and independent work) and one *part per outcome*: the taken branch inlined, followed by
//! everything that depends on the `If`. Each of the three is a plain graph planned once; a call runs the
//! prefix, reads the condition, and runs the matching part on the graph inputs plus the prefix's values.
//!
//! Invariants: the prefix and a part together compute exactly the original graph's outputs for that
//! outcome (the parts are built from the same nodes, in the same order); values cross from the prefix
//! to a part under their own names.

use std::collections::{BTreeSet, HashSet};

use anyhow::{bail, Result};

use crate::ir::{
    infer_types, remove_dead_nodes, remove_unused_inputs, sort_topologically, Graph, Model, Node,
    ValueInfo, ValueType,
};
use crate::schedule::specialize::inline_branch;

/// A graph split at one `If`.
pub struct Split {
    /// Everything that does not depend on the `If`'s results.
    pub prefix: Model,
    /// The `If`'s condition: an output of `prefix` or a graph input.
    pub condition: String,
    /// `[else, then]`: the branch inlined plus everything that depends on the `If`; its inputs are
    /// graph inputs and outputs of `prefix`.
    pub parts: [Model; 2],
    /// The original graph's outputs, in order.
    pub outputs: Vec<String>,
}

/// Index of the first top-level `If` (the graph in topological order).
pub fn first_if(model: &Model) -> Option<usize> {
    model.graph.nodes.iter().position(|n| n.op_type == "If")
}

/// `model` with every top-level `If` replaced by its then-branch (`take_then`) or else-branch.
pub fn inline_ifs(model: &Model, take_then: bool) -> Result<Model> {
    let mut out = model.clone();
    let mut nodes = Vec::with_capacity(out.graph.nodes.len());
    for node in std::mem::take(&mut out.graph.nodes) {
        if node.op_type == "If" {
            inline_branch(&node, take_then, &mut nodes, &mut out.graph)?;
        } else {
            nodes.push(node);
        }
    }
    out.graph.nodes = nodes;
    remove_dead_nodes(&mut out.graph);
    remove_unused_inputs(&mut out.graph);
    Ok(out)
}

/// Split `model` at its node `index`, an `If`.
pub fn split_at(model: &Model, index: usize) -> Result<Split> {
    let mut sorted = model.clone();
    let name = model.graph.nodes[index].name.clone();
    sort_topologically(&mut sorted.graph)?;
    let graph = &sorted.graph;
    let index = graph
        .nodes
        .iter()
        .position(|n| n.name == name && n.op_type == "If")
        .expect("the If is still there after sorting");
    let if_node = &graph.nodes[index];
    let Some(condition) = if_node.inputs.first().filter(|c| !c.is_empty()).cloned() else {
        bail!("node {} has no condition", if_node.label());
    };
    let dependent = dependents(graph, index);
    let prefix_nodes: Vec<Node> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !dependent[*i])
        .map(|(_, n)| n.clone())
        .collect();
    let rest: Vec<Node> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| dependent[*i] && *i != index)
        .map(|(_, n)| n.clone())
        .collect();
    let mut part_graphs = Vec::with_capacity(2);
    for take_then in [false, true] {
        let mut g = graph.clone();
        let mut nodes = Vec::with_capacity(rest.len() + 8);
        inline_branch(if_node, take_then, &mut nodes, &mut g)?;
        nodes.extend(rest.iter().cloned());
        g.nodes = nodes;
        part_graphs.push(g);
    }
    let produced_before: HashSet<String> = prefix_nodes
        .iter()
        .flat_map(|n| n.outputs.iter().cloned())
        .filter(|o| !o.is_empty())
        .collect();
    // What the prefix must hand over: values the parts read, graph outputs it computes, the condition.
    let mut handed: BTreeSet<String> = BTreeSet::new();
    for g in &part_graphs {
        for node in &g.nodes {
            for v in reads(node) {
                if produced_before.contains(&v) {
                    handed.insert(v);
                }
            }
        }
    }
    let outputs: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    for o in outputs.iter().chain([&condition]) {
        if produced_before.contains(o) {
            handed.insert(o.clone());
        }
    }
    let types = infer_types(graph, sorted.default_opset());
    let declare = |name: &str| -> ValueInfo {
        match types.get(name) {
            Some(t) => ValueInfo {
                name: name.to_string(),
                ty: ValueType::Tensor {
                    dtype: t.dtype,
                    shape: t
                        .shape
                        .as_ref()
                        .map(|s| s.iter().map(|&d| crate::ir::Dim::Value(d)).collect()),
                },
                doc_string: String::new(),
            },
            None => ValueInfo {
                name: name.to_string(),
                ty: ValueType::Tensor {
                    dtype: None,
                    shape: None,
                },
                doc_string: String::new(),
            },
        }
    };

    let mut prefix = sorted.clone();
    prefix.graph.nodes = prefix_nodes;
    prefix.graph.outputs = handed.iter().map(|v| declare(v)).collect();
    tidy(&mut prefix.graph);

    let mut parts = part_graphs.into_iter().map(|mut g| {
        g.outputs.retain(|o| !produced_before.contains(&o.name));
        g.inputs.extend(handed.iter().map(|v| declare(v)));
        tidy(&mut g);
        Model {
            graph: g,
            ..sorted.clone()
        }
    });
    let (Some(else_part), Some(then_part)) = (parts.next(), parts.next()) else {
        unreachable!("two outcomes");
    };
    Ok(Split {
        prefix,
        condition,
        parts: [else_part, then_part],
        outputs,
    })
}

fn tidy(graph: &mut Graph) {
    remove_dead_nodes(graph);
    remove_unused_inputs(graph);
}

/// Which nodes depend (through inputs or subgraph reads) on the results of node `index`.
fn dependents(graph: &Graph, index: usize) -> Vec<bool> {
    let mut tainted: HashSet<String> = graph.nodes[index]
        .outputs
        .iter()
        .filter(|o| !o.is_empty())
        .cloned()
        .collect();
    let mut dependent = vec![false; graph.nodes.len()];
    dependent[index] = true;
    for (i, node) in graph.nodes.iter().enumerate().skip(index + 1) {
        if reads(node).iter().any(|v| tainted.contains(v)) {
            dependent[i] = true;
            tainted.extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    dependent
}

/// Values a node reads, its subgraphs' reads of enclosing scopes included.
fn reads(node: &Node) -> Vec<String> {
    let mut out: Vec<String> = node.present_inputs().map(str::to_string).collect();
    for g in node.subgraphs() {
        let local: HashSet<&str> = g
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(String::as_str))
            .chain(g.inputs.iter().map(|i| i.name.as_str()))
            .chain(g.initializers.iter().map(|t| t.name.as_str()))
            .collect();
        for n in &g.nodes {
            out.extend(reads(n).into_iter().filter(|v| !local.contains(v.as_str())));
        }
        out.extend(
            g.outputs
                .iter()
                .map(|o| o.name.clone())
                .filter(|o| !local.contains(o.as_str())),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{AttrValue, DataType, Dim};

    fn tensor(name: &str) -> ValueInfo {
        ValueInfo::tensor(name, DataType::F32, vec![Dim::Value(2)])
    }

    /// y = If(x.sum > 0, then: x * 2, else: x) + 1; z = Neg(x) (independent of the If).
    fn model() -> Model {
        let then_branch = Graph {
            nodes: vec![Node::new("double", "Add", &["x", "x"], &["t"])],
            outputs: vec![tensor("t")],
            ..Graph::default()
        };
        let else_branch = Graph {
            nodes: vec![Node::new("keep", "Identity", &["x"], &["e"])],
            outputs: vec![tensor("e")],
            ..Graph::default()
        };
        let graph = Graph {
            inputs: vec![tensor("x")],
            outputs: vec![tensor("y"), tensor("z"), tensor("c")],
            initializers: vec![crate::ir::Tensor::from_f32("one", vec![], &[1.0])],
            nodes: vec![
                Node::new("sum", "ReduceSum", &["x"], &["s"])
                    .with_attr("keepdims", AttrValue::Int(0)),
                Node::new("zero", "Sub", &["s", "s"], &["s0"]),
                Node::new("cond", "Greater", &["s", "s0"], &["c"]),
                Node::new("if", "If", &["c"], &["m"])
                    .with_attr("then_branch", AttrValue::Graph(then_branch))
                    .with_attr("else_branch", AttrValue::Graph(else_branch)),
                Node::new("plus", "Add", &["m", "one"], &["y"]),
                Node::new("neg", "Neg", &["x"], &["z"]),
            ],
            ..Graph::default()
        };
        Model::new(graph, 17)
    }

    #[test]
    fn parts_hold_what_depends_on_the_if() {
        let m = model();
        let split = split_at(&m, first_if(&m).unwrap()).unwrap();
        assert_eq!(split.condition, "c");
        let names =
            |g: &Graph| -> Vec<String> { g.nodes.iter().map(|n| n.op_type.clone()).collect() };
        assert_eq!(
            names(&split.prefix.graph),
            ["ReduceSum", "Sub", "Greater", "Neg"]
        );
        let outputs: Vec<&str> = split
            .prefix
            .graph
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        assert_eq!(outputs, ["c", "z"]);
        assert_eq!(names(&split.parts[1].graph), ["Add", "Identity", "Add"]);
        assert_eq!(
            names(&split.parts[0].graph),
            ["Identity", "Identity", "Add"]
        );
        for part in &split.parts {
            assert_eq!(part.graph.outputs.len(), 1);
            assert_eq!(part.graph.outputs[0].name, "y");
            crate::ir::check_graph(&part.graph).unwrap();
        }
        crate::ir::check_graph(&split.prefix.graph).unwrap();
        assert_eq!(split.outputs, ["y", "z", "c"]);
    }
}
