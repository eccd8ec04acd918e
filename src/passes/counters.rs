//! Run-time counters through a schedule: graph outputs that report what a call computed (a
//! block-sparse site's `kept` scores, [`super::sparse_linear_attention`]) when a schedule pass moves
//! their producers into an `If` branch.
//!
//! A schedule pass isolates the nodes that only serve a cached value ([`super::region`]); a node
//! whose output is also a graph output never qualifies, so a counter would pin its site outside the
//! cached region. [`detach`] therefore takes the counters off the graph's outputs before the pass
//! bakes, and [`reattach`] puts them back afterwards: a counter still computed at the top level is
//! a graph output again as it was; one whose producer now sits in an `If` branch becomes an output
//! of that `If` (recursively through nested ones): the branch computing it returns it, the other
//! branch returns 0 (a skipped call computes no scores: the `Size` of an empty tensor), so every call still reports its count.
//!
//! Invariant: after [`reattach`] every detached counter is a graph output of type int64 scalar,
//! computed on every call.

use anyhow::{bail, Result};

use crate::ir::{AttrValue, DataType, Graph, Tensor, ValueInfo};

/// Prefix of every counter output (the sparse sites' `kept` outputs).
pub const COUNTER_PREFIX: &str = "ditc.sla.kept.";
/// An empty int64 tensor: its `Size` is the 0 a branch that skips a counter's producer returns.
const ZERO: &str = "ditc.counter.empty";

/// Remove the counters from the graph's outputs; returns their names (in output order).
pub fn detach(graph: &mut Graph) -> Vec<String> {
    let names: Vec<String> = graph
        .outputs
        .iter()
        .filter(|o| o.name.starts_with(COUNTER_PREFIX))
        .map(|o| o.name.clone())
        .collect();
    graph
        .outputs
        .retain(|o| !o.name.starts_with(COUNTER_PREFIX));
    names
}

/// Make every counter of `names` a graph output again (see the module docs).
pub fn reattach(graph: &mut Graph, names: &[String]) -> Result<()> {
    for name in names {
        if !lift(graph, name) {
            bail!(
                "counter '{name}' is no longer computed after the schedule was baked (a ditc bug)"
            );
        }
        graph
            .outputs
            .push(ValueInfo::tensor(name, DataType::I64, vec![]));
    }
    Ok(())
}

/// True if a node of `graph` itself produces `name`.
fn top_level_producer(graph: &Graph, name: &str) -> bool {
    graph
        .nodes
        .iter()
        .any(|n| n.outputs.iter().any(|o| o == name))
}

/// Make `name` produced by a node of `graph` itself: when an `If` branch computes it, that `If`
/// returns it (the other branch: 0). Returns false if nothing in `graph` computes it.
fn lift(graph: &mut Graph, name: &str) -> bool {
    if top_level_producer(graph, name) {
        return true;
    }
    let inner = format!("{name}.computed");
    let skipped = format!("{name}.skipped");
    let mut lifted = false;
    for node in graph.nodes.iter_mut().filter(|n| n.op_type == "If") {
        let mut branches: Vec<&mut Graph> = node
            .attributes
            .iter_mut()
            .filter_map(|a| match &mut a.value {
                AttrValue::Graph(g) => Some(g),
                _ => None,
            })
            .collect();
        let Some(at) = branches.iter_mut().position(|g| lift(g, name)) else {
            continue;
        };
        for (i, branch) in branches.into_iter().enumerate() {
            if i == at {
                rename_output_value(branch, name, &inner);
                branch
                    .outputs
                    .push(ValueInfo::tensor(&inner, DataType::I64, vec![]));
            } else {
                // The element count of an empty tensor: an int64 0 that tract, like a count
                // derived from shapes, types as a TDim (a plain int64 constant would not unify
                // with the computing branch's count in tract's If).
                branch
                    .nodes
                    .push(crate::ir::Node::new(&skipped, "Size", &[ZERO], &[&skipped]));
                branch
                    .outputs
                    .push(ValueInfo::tensor(&skipped, DataType::I64, vec![]));
            }
        }
        node.outputs.push(name.to_string());
        lifted = true;
        break;
    }
    if lifted && !graph.initializers.iter().any(|t| t.name == ZERO) {
        graph
            .initializers
            .push(Tensor::from_i64(ZERO, vec![0], &[]));
    }
    lifted
}

/// Rename the value `from` to `to` where a node of `graph` produces or reads it.
fn rename_output_value(graph: &mut Graph, from: &str, to: &str) {
    for node in &mut graph.nodes {
        for v in node.outputs.iter_mut().chain(node.inputs.iter_mut()) {
            if v == from {
                *v = to.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Node};

    fn scalar(name: &str) -> ValueInfo {
        ValueInfo::tensor(name, DataType::I64, vec![])
    }

    /// A graph whose counter `ditc.sla.kept.site0` is computed inside the then-branch of an If.
    fn graph_with_counter_in_branch() -> Graph {
        let then_branch = Graph {
            name: "then".into(),
            nodes: vec![
                Node::new("y", "Identity", &["x"], &["y.computed"]),
                Node::new("count", "Identity", &["n"], &["ditc.sla.kept.site0"]),
            ],
            outputs: vec![ValueInfo::tensor(
                "y.computed",
                DataType::F32,
                vec![Dim::Value(2)],
            )],
            ..Graph::default()
        };
        let else_branch = Graph {
            name: "else".into(),
            nodes: vec![Node::new("y", "Identity", &["cached"], &["y.reused"])],
            outputs: vec![ValueInfo::tensor(
                "y.reused",
                DataType::F32,
                vec![Dim::Value(2)],
            )],
            ..Graph::default()
        };
        Graph {
            name: "g".into(),
            nodes: vec![Node::new("if", "If", &["c"], &["y"])
                .with_attr("then_branch", AttrValue::Graph(then_branch))
                .with_attr("else_branch", AttrValue::Graph(else_branch))],
            outputs: vec![ValueInfo::tensor("y", DataType::F32, vec![Dim::Value(2)])],
            ..Graph::default()
        }
    }

    #[test]
    fn detach_takes_only_counters() {
        let mut g = Graph {
            outputs: vec![
                scalar("out"),
                scalar("ditc.sla.kept.site3"),
                scalar("ditc.state_out.x"),
            ],
            ..Graph::default()
        };
        assert_eq!(detach(&mut g), vec!["ditc.sla.kept.site3".to_string()]);
        let left: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(left, ["out", "ditc.state_out.x"]);
    }

    #[test]
    fn a_counter_in_a_branch_becomes_an_output_of_its_if() {
        let mut g = graph_with_counter_in_branch();
        reattach(&mut g, &["ditc.sla.kept.site0".to_string()]).unwrap();
        let if_node = &g.nodes[0];
        assert_eq!(if_node.outputs, ["y", "ditc.sla.kept.site0"]);
        let branches: Vec<&Graph> = if_node.subgraphs().collect();
        let then_out: Vec<&str> = branches[0]
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        assert_eq!(then_out, ["y.computed", "ditc.sla.kept.site0.computed"]);
        assert_eq!(
            branches[0].nodes[1].outputs,
            ["ditc.sla.kept.site0.computed"]
        );
        // The skipping branch returns the outer int64 zero.
        let skip = branches[1].nodes.last().unwrap();
        assert_eq!(skip.inputs, [ZERO]);
        assert_eq!(branches[1].outputs.len(), 2);
        assert_eq!(skip.op_type, "Size");
        let empty = g.initializers.iter().find(|t| t.name == ZERO).unwrap();
        assert_eq!(empty.dims, [0]);
        assert_eq!(g.outputs.last().unwrap().name, "ditc.sla.kept.site0");
    }

    #[test]
    fn a_counter_left_at_the_top_level_is_an_output_again() {
        let mut g = Graph {
            nodes: vec![Node::new(
                "count",
                "Identity",
                &["n"],
                &["ditc.sla.kept.site1"],
            )],
            ..Graph::default()
        };
        reattach(&mut g, &["ditc.sla.kept.site1".to_string()]).unwrap();
        assert_eq!(g.outputs[0].name, "ditc.sla.kept.site1");
        assert!(g.initializers.is_empty());
    }

    #[test]
    fn a_lost_counter_is_an_error() {
        let mut g = Graph::default();
        assert!(reattach(&mut g, &["ditc.sla.kept.site9".to_string()]).is_err());
    }
}
