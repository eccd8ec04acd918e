//! Structure analysis: the DiT map (transformer blocks, attention sites with kind and cost).

pub mod attention;
pub mod axes;
pub mod blocks;
pub mod flops;
pub mod gpu_cost;
pub mod stack;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

pub use attention::{AttentionKind, AttentionSite};
pub use blocks::Block;

use crate::ir::{infer_types, topological_order, Dim, Model, TypeMap, ValueType};

#[derive(Clone, Debug, Serialize)]
pub struct DitMap {
    pub blocks: Vec<Block>,
    pub attention: Vec<AttentionSite>,
    pub flops: FlopSummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlopSummary {
    /// MatMul/Gemm/Conv/Einsum/Attention FLOPs of one model call.
    pub total: u64,
    /// Score and value products of all attention sites.
    pub attention: u64,
    /// `attention`, split by site kind.
    pub attention_by_kind: BTreeMap<&'static str, u64>,
}

impl DitMap {
    pub fn count(&self, kind: AttentionKind) -> usize {
        self.attention.iter().filter(|s| s.kind == kind).count()
    }

    /// The transformer block holding attention site `site`.
    pub fn block_of(&self, site: usize) -> Option<&Block> {
        self.blocks.iter().find(|b| b.attention.contains(&site))
    }
}

/// Analyse a model with its declared input shapes.
pub fn analyse(model: &Model) -> DitMap {
    // Structure does not depend on the batch: symbolic input dims (a dynamic batch) are analysed as 1,
    // so geometry and FLOPs are reported per batch row.
    if has_symbolic_inputs(&model.graph) {
        let mut graph = model.graph.clone();
        for input in &mut graph.inputs {
            if let ValueType::Tensor {
                shape: Some(dims), ..
            } = &mut input.ty
            {
                for d in dims.iter_mut().filter(|d| d.value().is_none()) {
                    *d = Dim::Value(1);
                }
            }
        }
        let types = infer_types(&graph, model.default_opset());
        return analyse_with_types(model, &types);
    }
    let types = infer_types(&model.graph, model.default_opset());
    analyse_with_types(model, &types)
}

/// True when a runtime input has a symbolic or unknown dimension.
pub fn has_symbolic_inputs(graph: &crate::ir::Graph) -> bool {
    graph.runtime_inputs().any(|i| {
        i.shape()
            .is_some_and(|s| s.iter().any(|d| d.value().is_none()))
    })
}

pub fn analyse_with_types(model: &Model, types: &TypeMap) -> DitMap {
    let graph = &model.graph;
    let axes = axes::propagate(graph, types);
    let ctx = attention::Context::new(graph, types, &axes);
    let order = topological_order(graph).unwrap_or_else(|_| (0..graph.nodes.len()).collect());
    let position: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(pos, &i)| (graph.nodes[i].name.as_str(), pos))
        .collect();
    let sites = attention::find_sites(&ctx, &position);
    let blocks = blocks::find_blocks(&ctx, &sites, &order);
    let total = graph
        .nodes
        .iter()
        .map(|n| flops::node_flops(n, types))
        .sum();
    let mut by_kind = BTreeMap::new();
    for s in &sites {
        *by_kind.entry(s.kind.as_str()).or_insert(0) += s.flops;
    }
    DitMap {
        flops: FlopSummary {
            total,
            attention: sites.iter().map(|s| s.flops).sum(),
            attention_by_kind: by_kind,
        },
        blocks,
        attention: sites,
    }
}
