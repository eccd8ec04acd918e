//! Graph validity: every value defined once, every use defined, no cycles, outputs produced.
//!
//! Run after reading a model and after every pass. Subgraphs are checked too; they may use values of
//! the enclosing scopes.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};

use super::{Graph, Node};

/// Check `graph` (and its subgraphs) and return the node order that is topological.
pub fn check_graph(graph: &Graph) -> Result<()> {
    check_scope(graph, &HashSet::new())?;
    topological_order(graph)?;
    Ok(())
}

fn check_scope(graph: &Graph, outer: &HashSet<String>) -> Result<()> {
    let mut defined: HashSet<String> = HashSet::new();
    // An initializer may also be listed as a graph input (it is then an overridable default).
    for t in &graph.initializers {
        if !defined.insert(t.name.clone()) {
            bail!("value '{}' is defined twice (two initializers)", t.name);
        }
    }
    for i in &graph.inputs {
        if i.name.is_empty() {
            bail!("a graph input has an empty name");
        }
        if !defined.insert(i.name.clone()) && graph.initializer(&i.name).is_none() {
            bail!("value '{}' is defined twice (graph input)", i.name);
        }
    }
    for node in &graph.nodes {
        for out in node.outputs.iter().filter(|o| !o.is_empty()) {
            if !defined.insert(out.clone()) {
                bail!(
                    "value '{out}' is defined twice (output of node {})",
                    node.label()
                );
            }
        }
    }
    let visible: HashSet<String> = defined.union(outer).cloned().collect();
    for node in &graph.nodes {
        for input in node.present_inputs() {
            if !visible.contains(input) {
                bail!(
                    "node {} uses '{input}', which nothing defines",
                    node.label()
                );
            }
        }
        for sub in node.subgraphs() {
            check_scope(sub, &visible)
                .map_err(|e| e.context(format!("in a subgraph of node {}", node.label())))?;
        }
    }
    for out in &graph.outputs {
        if !visible.contains(&out.name) {
            bail!("graph output '{}' is not produced by any node", out.name);
        }
    }
    Ok(())
}

/// Indices of `graph.nodes` in a topological order (stable: keeps file order where it is valid).
/// Fails, naming a node on the cycle, if the graph has one.
pub fn topological_order(graph: &Graph) -> Result<Vec<usize>> {
    let producer: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .filter(|(o, _)| !o.is_empty())
        .collect();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        for input in node_uses(node) {
            if let Some(&p) = producer.get(input.as_str()) {
                deps[i].push(p);
            }
        }
    }
    // Iterative DFS post-order, visiting nodes in file order.
    let mut state = vec![0u8; graph.nodes.len()]; // 0 new, 1 on stack, 2 done
    let mut order = Vec::with_capacity(graph.nodes.len());
    for root in 0..graph.nodes.len() {
        if state[root] != 0 {
            continue;
        }
        let mut stack = vec![(root, 0usize)];
        state[root] = 1;
        while let Some((n, k)) = stack.pop() {
            if k < deps[n].len() {
                stack.push((n, k + 1));
                let d = deps[n][k];
                match state[d] {
                    0 => {
                        state[d] = 1;
                        stack.push((d, 0));
                    }
                    1 => bail!(
                        "the graph has a cycle: {}",
                        describe_cycle(graph, &stack, d)
                    ),
                    _ => {}
                }
            } else {
                state[n] = 2;
                order.push(n);
            }
        }
    }
    Ok(order)
}

/// The cycle found when a node on the depth-first path `stack` (root first; each node depends on the
/// next) depends on `back`, which is on the path: in data-flow order `back` feeds the path's last node,
/// which feeds the one before it, and so on back to `back`. Long cycles are cut in the middle.
fn describe_cycle(graph: &Graph, stack: &[(usize, usize)], back: usize) -> String {
    let from = stack
        .iter()
        .position(|&(n, _)| n == back)
        .expect("a node in progress is on the path");
    let mut cycle = vec![back];
    cycle.extend(stack[from + 1..].iter().rev().map(|&(n, _)| n));
    cycle.push(back);
    let labels: Vec<String> = cycle.iter().map(|&n| graph.nodes[n].label()).collect();
    const SHOWN: usize = 8;
    if labels.len() <= 2 * SHOWN {
        return labels.join(" -> ");
    }
    format!(
        "{} -> ... ({} more) -> {}",
        labels[..SHOWN].join(" -> "),
        labels.len() - 2 * SHOWN,
        labels[labels.len() - SHOWN..].join(" -> ")
    )
}

/// Values a node reads, including the outer-scope values its subgraphs read.
fn node_uses(node: &Node) -> Vec<String> {
    let mut uses: Vec<String> = node.present_inputs().map(str::to_string).collect();
    for sub in node.subgraphs() {
        let local: HashSet<&str> = sub
            .inputs
            .iter()
            .map(|i| i.name.as_str())
            .chain(sub.initializers.iter().map(|t| t.name.as_str()))
            .chain(
                sub.nodes
                    .iter()
                    .flat_map(|n| n.outputs.iter().map(|s| s.as_str())),
            )
            .collect();
        for n in &sub.nodes {
            for u in node_uses(n) {
                if !local.contains(u.as_str()) {
                    uses.push(u);
                }
            }
        }
        for o in &sub.outputs {
            if !local.contains(o.name.as_str()) {
                uses.push(o.name.clone());
            }
        }
    }
    uses
}

/// Reorder `graph.nodes` topologically (recursively for subgraphs).
pub fn sort_topologically(graph: &mut Graph) -> Result<()> {
    let order = topological_order(graph)?;
    let mut nodes: Vec<Option<Node>> = std::mem::take(&mut graph.nodes)
        .into_iter()
        .map(Some)
        .collect();
    graph.nodes = order.into_iter().filter_map(|i| nodes[i].take()).collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Dim, Node, ValueInfo};

    fn graph(nodes: Vec<Node>) -> Graph {
        Graph {
            inputs: vec![ValueInfo::tensor("x", DataType::F32, vec![Dim::Value(1)])],
            outputs: vec![ValueInfo::tensor("y", DataType::F32, vec![Dim::Value(1)])],
            nodes,
            ..Graph::default()
        }
    }

    #[test]
    fn accepts_a_chain_and_sorts_it() {
        let mut g = graph(vec![
            Node::new("b", "Relu", &["t"], &["y"]),
            Node::new("a", "Relu", &["x"], &["t"]),
        ]);
        check_graph(&g).unwrap();
        sort_topologically(&mut g).unwrap();
        assert_eq!(g.nodes[0].name, "a");
    }

    #[test]
    fn rejects_cycles_duplicates_and_undefined_uses() {
        let cyclic = graph(vec![
            Node::new("a", "Add", &["x", "u"], &["t"]),
            Node::new("b", "Relu", &["t"], &["u"]),
            Node::new("c", "Relu", &["t"], &["y"]),
        ]);
        assert_eq!(
            check_graph(&cyclic).unwrap_err().to_string(),
            "the graph has a cycle: 'a' (Add) -> 'b' (Relu) -> 'a' (Add)"
        );
        // a feeds b feeds c feeds a, with c first in the file: named in data-flow order from where the
        // search found it.
        let three = graph(vec![
            Node::new("c", "Relu", &["t2"], &["t3"]),
            Node::new("a", "Add", &["x", "t3"], &["t1"]),
            Node::new("b", "Relu", &["t1"], &["t2"]),
            Node::new("d", "Relu", &["t1"], &["y"]),
        ]);
        assert_eq!(
            check_graph(&three).unwrap_err().to_string(),
            "the graph has a cycle: 'c' (Relu) -> 'a' (Add) -> 'b' (Relu) -> 'c' (Relu)"
        );
        let dup = graph(vec![
            Node::new("a", "Relu", &["x"], &["y"]),
            Node::new("b", "Relu", &["x"], &["y"]),
        ]);
        assert!(check_graph(&dup)
            .unwrap_err()
            .to_string()
            .contains("defined twice"));
        let undefined = graph(vec![Node::new("a", "Add", &["x", "nope"], &["y"])]);
        assert!(check_graph(&undefined)
            .unwrap_err()
            .to_string()
            .contains("'nope'"));
        let missing_out = graph(vec![Node::new("a", "Relu", &["x"], &["z"])]);
        assert!(check_graph(&missing_out).is_err());
    }
}
