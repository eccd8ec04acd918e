//! Dead-code elimination: drop nodes that no graph output depends on, and graph inputs nothing reads.

use std::collections::HashSet;

use super::{Graph, Node};

/// Remove nodes whose outputs reach no graph output (subgraph reads count as uses).
pub fn remove_dead_nodes(graph: &mut Graph) {
    let mut live: HashSet<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.nodes.len()];
    // Nodes are in topological order: one backward sweep finds everything live.
    for (i, node) in graph.nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(uses(node));
        }
    }
    let mut k = keep.iter();
    graph
        .nodes
        .retain(|_| *k.next().expect("one flag per node"));
}

/// Values some node (or a graph output) reads.
fn used_values(graph: &Graph) -> HashSet<String> {
    graph
        .nodes
        .iter()
        .flat_map(uses)
        .chain(graph.outputs.iter().map(|o| o.name.clone()))
        .collect()
}

/// Remove graph inputs (not outputs) that no node reads.
pub fn remove_unused_inputs(graph: &mut Graph) {
    let used = used_values(graph);
    graph.inputs.retain(|i| used.contains(&i.name));
    graph.initializers.retain(|t| used.contains(&t.name));
}

/// Remove initializers that no node (or graph output) reads, e.g. float weights replaced by INT8 ones.
pub fn remove_unused_initializers(graph: &mut Graph) {
    let used = used_values(graph);
    let inputs: HashSet<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
    let keep: Vec<bool> = graph
        .initializers
        .iter()
        .map(|t| used.contains(&t.name) || inputs.contains(t.name.as_str()))
        .collect();
    let mut k = keep.iter();
    graph
        .initializers
        .retain(|_| *k.next().expect("one flag per initializer"));
}

/// Every value a node reads, including outer-scope reads of its subgraphs.
fn uses(node: &Node) -> Vec<String> {
    let mut out: Vec<String> = node.present_inputs().map(str::to_string).collect();
    for g in node.subgraphs() {
        for n in &g.nodes {
            out.extend(uses(n));
        }
        out.extend(g.outputs.iter().map(|o| o.name.clone()));
    }
    out
}
