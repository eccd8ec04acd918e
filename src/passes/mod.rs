//! Passes: named graph rewrites, run in the order a recipe lists them, with a graph check after each.
//!
//! A pass has a name (used by recipes, `--set` and `ditc passes`), options (a TOML table, validated
//! before any work), and a `run` that rewrites the model and records what a runtime needs in the
//! [`PassContext`] (schedule tables, state bindings).

pub mod broadcast_adaptive;
mod broadcast_static;
pub mod counters;
pub mod quantize_attention;
pub mod quantize_w8a8;
pub mod region;
pub mod sage_sparse_attention;
pub mod sla_weights;
pub mod smooth_quant;
pub mod sparse_linear_attention;

use anyhow::{bail, Context, Result};

use crate::analysis::DitMap;
use crate::ir::{check_graph, sort_topologically, Model};
use crate::manifest::{Schedule, StateBinding};
use crate::schedule::guidance::{branches, Branch, Guidance};
use crate::schedule::{Sampler, SamplerConfig};

pub use broadcast_static::{condition_name, BroadcastStatic, STEP_INPUT};

/// What passes read (the DiT map of the input, the sampler) and write (for the manifest).
pub struct PassContext {
    pub dit_map: DitMap,
    pub sampler: Option<(SamplerConfig, Sampler)>,
    /// Classifier-free guidance of the sampler: two calls per step, state per branch.
    pub guidance: Option<Guidance>,
    pub schedule: Option<Schedule>,
    pub state: Vec<StateBinding>,
    /// The graph input carrying the step index, once a schedule is baked.
    pub step_input: Option<String>,
    /// The graph input carrying the guidance branch, once decisions differ per branch.
    pub branch_input: Option<String>,
    /// What quantization did, for the manifest.
    pub precision: Option<crate::manifest::Precision>,
    /// The sites made sparse and how (`sparse-linear-attention`), for the manifest.
    pub sparse_attention: Option<crate::manifest::SparseAttention>,
    /// TensorRT plugins the graph's nodes need.
    pub plugins: Vec<crate::manifest::PluginRequirement>,
}

impl PassContext {
    /// A context for `model` with its DiT map, the sampler (and guidance) given, nothing baked yet.
    pub fn new(
        model: &Model,
        sampler: Option<(SamplerConfig, Sampler)>,
        guidance: Option<Guidance>,
    ) -> PassContext {
        PassContext {
            dit_map: crate::analysis::analyse(model),
            sampler,
            guidance,
            schedule: None,
            state: Vec::new(),
            step_input: None,
            branch_input: None,
            precision: None,
            sparse_attention: None,
            plugins: Vec::new(),
        }
    }

    /// The model calls per step: `cond`, and `uncond` with guidance.
    pub fn branches(&self) -> &'static [Branch] {
        branches(self.guidance.as_ref())
    }

    /// What every schedule pass needs before it bakes: a sampler (returned), no schedule baked by an
    /// earlier pass, and static input shapes (the state carried between steps is sized by them).
    pub fn schedule_sampler(&self, model: &Model) -> Result<&Sampler> {
        let Some((_, sampler)) = &self.sampler else {
            bail!("needs a sampler: add a [sampler] table to the recipe");
        };
        if let Some(other) = &self.schedule {
            bail!(
                "the graph already has a '{}' schedule from an earlier pass: a recipe bakes one schedule",
                other.policy
            );
        }
        if crate::analysis::has_symbolic_inputs(&model.graph) {
            bail!("needs static input shapes (the state carried between steps is sized by them): build the graph without --dynamic-batch");
        }
        Ok(sampler)
    }
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()>;
    /// Options that depend on the sampler (`steps`: its step count, None without one), checked
    /// before any model is read.
    fn check_sampler(&self, _steps: Option<usize>) -> Result<()> {
        Ok(())
    }
    /// True for the passes that bake a schedule (they move nodes into `If` branches): run-time
    /// counters are carried through their `If`s ([`counters`]).
    fn bakes_schedule(&self) -> bool {
        false
    }
}

/// Every registered pass: name and one line on what it does.
pub const REGISTRY: &[(&str, &str)] = &[
    (
        "quantize-w8a8",
        "INT8 weights (per output channel) and static INT8 activations as Q/DQ pairs TensorRT accepts, on the attention projections and FFNs",
    ),
    (
        "broadcast-static",
        "bake a static attention-broadcast schedule (PAB) into the graph: an If per scheduled attention site, driven by ditc.step",
    ),
    (
        "sparse-linear-attention",
        "block-sparse attention (SLA top-k or SpargeAttn cumulative mass, dense warm-up) plus SLA's linear branch: one ai.ditc SparseLinearAttention node per site (a TensorRT plugin) with its portable decomposition as an ONNX local function",
    ),
    (
        "quantize-attention",
        "quantized attention: format = \"fp8\" puts calibrated per-tensor FP8 Q/DQ on Q, K, V and the softmax output (TensorRT's FP8 MHA pattern); format = \"sage\" makes each site one ai.ditc SageAttention node (SageAttention2's INT8 Q·Kᵀ with K smoothing, FP8 P and V; a TensorRT plugin) with its fake-quant emulation as an ONNX local function",
    ),
    (
        "broadcast-adaptive",
        "bake a step cache that skips transformer blocks (policy = \"easy-cache\", the default: EasyCache's estimated output change decides inside the graph whether the block stack runs; policy = \"ada-cache\": AdaCache + MoReg, the steps to reuse from a codebook of one block's residual change; policy = \"mag-cache\": the whole block stack, a static table per step and branch; policy = \"first-block-cache\": the head blocks' residual change decides inside the graph, per call and branch, whether the other blocks run)",
    ),
];

/// Build a pass from its recipe name and options.
pub fn create(name: &str, options: &toml::Table) -> Result<Box<dyn Pass>> {
    match name {
        "broadcast-static" => Ok(Box::new(BroadcastStatic::from_options(options)?)),
        "broadcast-adaptive" => Ok(Box::new(
            broadcast_adaptive::BroadcastAdaptive::from_options(options)?,
        )),
        "quantize-w8a8" => Ok(Box::new(quantize_w8a8::QuantizeW8A8::from_options(
            options,
        )?)),
        "sparse-linear-attention" => Ok(Box::new(
            sparse_linear_attention::SparseLinearAttention::from_options(options)?,
        )),
        "quantize-attention" => Ok(Box::new(
            quantize_attention::QuantizeAttention::from_options(options)?,
        )),
        _ => {
            let known: Vec<&str> = REGISTRY.iter().map(|(n, _)| *n).collect();
            bail!("unknown pass '{name}' (known passes: {})", known.join(", "))
        }
    }
}

/// Run passes in order; the graph is checked (and re-sorted) after each one, errors name the pass.
pub fn run_pipeline(
    model: &mut Model,
    passes: &[Box<dyn Pass>],
    cx: &mut PassContext,
) -> Result<()> {
    run_pipeline_with(model, passes, cx, &mut |_, _| Ok(()))
}

/// As [`run_pipeline`], calling `after(pass name, model)` once each pass has run and been checked
/// (`ditc convert --dump-after` writes the graph there).
pub fn run_pipeline_with(
    model: &mut Model,
    passes: &[Box<dyn Pass>],
    cx: &mut PassContext,
    after: &mut dyn FnMut(&str, &Model) -> Result<()>,
) -> Result<()> {
    for pass in passes {
        let counters = match pass.bakes_schedule() {
            true => counters::detach(&mut model.graph),
            false => Vec::new(),
        };
        pass.run(model, cx)
            .and_then(|_| counters::reattach(&mut model.graph, &counters))
            .with_context(|| format!("pass '{}'", pass.name()))?;
        sort_topologically(&mut model.graph)
            .and_then(|_| check_graph(&model.graph))
            .with_context(|| {
                format!(
                    "the graph is invalid after pass '{}' (a ditc bug)",
                    pass.name()
                )
            })?;
        after(pass.name(), model)?;
    }
    Ok(())
}
