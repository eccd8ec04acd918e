//! SageSLA: block-sparse attention with SageAttention2's quantized numerics, as TurboDiffusion
//! composes them. `quantize-attention` with `format = "sage"` run after `sparse-linear-attention`
//! turns every `SparseLinearAttention` node of the selected kinds into one `SageSparseLinearAttention`
//! node (domain `ai.ditc`): the same inputs, outputs and attributes, plus SageAttention's
//! (`granularity`, `q_window`, ..., `v_max`), so one TensorRT plugin implements it.
//!
//! Its local function (the same name and domain) is the composition of the two portable bodies:
//! the sparse op's block selection (pooled scores after K smoothing, top-k or cumulative mass, dense
//! warm-up) decides which keys each query row sees; SageAttention2's emulation
//! ([`super::quantize_attention::sage_core`]) computes the attention over those keys only (INT8 Q·Kᵀ
//! with K smoothing, the running maxima over its key tiles from the kept scores alone, FP8 P, FP8 V per
//! channel; quantization groups and V's scale over every token, as the quantization kernels run
//! before the sparse one); SLA's linear branch and the `kept` count are the sparse op's.
//!
//! Invariants: only nodes the sparse pass wrote are rewritten (their site ids, anchors and `kept`
//! outputs stay); the manifest's sparse-attention entry and plugin requirement name the new op.
//! The other order (SageAttention nodes, then `sparse-linear-attention`) is refused by that pass.

use anyhow::{bail, Result};

use super::quantize_attention::{sage_attributes, sage_core, Granularity};
use super::sparse_linear_attention::{
    self as sla, install_op, linear_branch, plugin_node, select_blocks, Body, DOMAIN,
};
use super::PassContext;
use crate::analysis::AttentionKind;
use crate::ir::{Attribute, Model};
use crate::onnx::proto;

pub const OP: &str = "SageSparseLinearAttention";

/// Rewrite the sparse nodes of `kinds` into SageSLA nodes (see the module docs).
pub fn quantize_sparse_sites(
    model: &mut Model,
    cx: &mut PassContext,
    kinds: &[AttentionKind],
    granularity: Granularity,
) -> Result<()> {
    let Some(sparse) = cx.sparse_attention.as_mut() else {
        bail!("no sparse attention sites to quantize (a ditc bug)");
    };
    let chosen: Vec<String> = sparse
        .sites
        .iter()
        .filter(|s| kinds.iter().any(|k| k.as_str() == s.kind))
        .map(|s| s.node.clone())
        .collect();
    if chosen.len() != sparse.sites.len() {
        bail!(
            "quantize-attention after sparse-linear-attention must quantize every sparse site ({} of {} are of kinds {:?}): give it the same kinds",
            chosen.len(),
            sparse.sites.len(),
            kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>()
        );
    }
    let mut rewritten = Vec::new();
    for node in model.graph.nodes.iter_mut() {
        if node.domain != DOMAIN || node.op_type != sla::OP || !chosen.contains(&node.name) {
            continue;
        }
        let scale = node.attr_float("scale").unwrap_or(1.0);
        node.op_type = OP.into();
        for (name, value) in sage_attributes(scale, granularity) {
            if name != "scale" {
                node.attributes.push(Attribute {
                    name: name.into(),
                    value,
                });
            }
        }
        rewritten.push(plugin_node(node));
    }
    if rewritten.len() != chosen.len() {
        bail!(
            "{} of the manifest's {} sparse sites were found in the graph (a ditc bug)",
            rewritten.len(),
            chosen.len()
        );
    }
    sparse.op = OP.into();
    for plugin in cx.plugins.iter_mut().filter(|p| p.name == sla::OP) {
        plugin.name = OP.into();
        plugin.nodes = rewritten.clone();
    }
    // The sparse op's function is no longer used; install_op drops what nothing calls.
    model
        .functions
        .retain(|f| !(f.domain == DOMAIN && f.name == sla::OP));
    install_op(model, function(model.default_opset()))
}

/// Every attribute the op takes: the sparse op's and SageAttention's.
pub fn attributes() -> Vec<String> {
    let mut all: Vec<String> = sla::ATTRIBUTES.iter().map(|s| s.to_string()).collect();
    for a in super::quantize_attention::ATTRIBUTES {
        if !all.iter().any(|x| x == a) {
            all.push(a.to_string());
        }
    }
    all
}

/// The local function `ai.ditc.SageSparseLinearAttention` (see the module docs).
pub fn function(opset: i64) -> proto::FunctionProto {
    let mut b = Body { nodes: Vec::new() };
    let (q, k, v, step, w, bias) = ("Q", "K", "V", "step", "proj_weight", "proj_bias");
    let selection = select_blocks(&mut b, q, k, step);
    let token_mask = selection.token_mask(&mut b);
    let sparse = sage_core(&mut b, opset, q, k, v, Some(&token_mask));
    let projected = linear_branch(&mut b, q, k, v, w, bias);
    let out = b.bin("Add", &sparse, &projected);
    let kept = selection.kept_scores(&mut b);
    b.rename(&out, "O");
    b.rename(&kept, "kept");
    b.into_function(
        OP,
        (&[q, k, v, step, w, bias], &["O", "kept"]),
        attributes(),
        opset,
        "ditc's SageSparseLinearAttention: SparseLinearAttention's block selection and linear branch with SageAttention2's quantized attention over the kept keys; see ditc's README",
    )
}
