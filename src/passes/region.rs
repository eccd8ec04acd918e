//! Isolating the nodes that compute one value, so a pass can move them into the branch of an `If`.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};

use crate::ir::Graph;

/// Indices (ascending) of the nodes that only contribute to `output`: its producer, and every
/// ancestor all of whose consumers are already in the region, except the producers of the values in
/// `keep` (and so their ancestors): those stay outside, readable from both branches of an `If`.
/// Nodes are in topological order.
pub fn exclusive_region(graph: &Graph, output: &str, keep: &HashSet<String>) -> Result<Vec<usize>> {
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for input in n.present_inputs() {
            consumers.entry(input.to_string()).or_default().push(i);
        }
        for v in n.subgraphs().flat_map(outer_reads) {
            consumers.entry(v).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    let Some(start) = graph
        .nodes
        .iter()
        .position(|n| n.outputs.iter().any(|o| o == output))
    else {
        bail!("no node produces '{output}'");
    };
    if graph_outputs.contains(output) {
        bail!("'{output}' is a graph output");
    }
    let mut in_region = vec![false; graph.nodes.len()];
    in_region[start] = true;
    for i in (0..start).rev() {
        let node = &graph.nodes[i];
        let exclusive = node.outputs.iter().filter(|o| !o.is_empty()).all(|o| {
            // (An output nothing reads, such as a counter a schedule pass detached, does not
            // keep its node outside.)
            !graph_outputs.contains(o.as_str())
                && consumers
                    .get(o)
                    .is_none_or(|c| c.iter().all(|&j| in_region[j]))
        });
        let kept = node.outputs.iter().any(|o| keep.contains(o));
        in_region[i] = exclusive && !kept && !node.outputs.is_empty();
    }
    Ok((0..graph.nodes.len()).filter(|&i| in_region[i]).collect())
}

/// Values a subgraph reads from enclosing scopes.
pub fn outer_reads(g: &Graph) -> Vec<String> {
    let local: HashSet<&str> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .chain(g.inputs.iter().map(|i| i.name.as_str()))
        .chain(g.initializers.iter().map(|t| t.name.as_str()))
        .collect();
    let mut reads: Vec<String> = g
        .nodes
        .iter()
        .flat_map(|n| n.present_inputs().map(str::to_string).collect::<Vec<_>>())
        .chain(
            g.nodes
                .iter()
                .flat_map(|n| n.subgraphs().flat_map(outer_reads).collect::<Vec<_>>()),
        )
        .filter(|v| !local.contains(v.as_str()))
        .collect();
    reads.extend(
        g.outputs
            .iter()
            .map(|o| o.name.clone())
            .filter(|o| !local.contains(o.as_str())),
    );
    reads
}
