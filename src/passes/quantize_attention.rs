//! Pass `quantize-attention`: quantized attention, as TensorRT's FP8 MHA fusion takes it (`fp8`) or as
//! SageAttention2 computes it (`sage`).
//!
//! Sites: every attention site of the selected kinds (full, spatial, temporal; never cross) written
//! as `MatMul(Q, Kᵀ)` -> constant scalar scale -> `Softmax` -> `MatMul(P, V)`.
//!
//! `format = "fp8"`: per-tensor FLOAT8 E4M3FN `QuantizeLinear -> DequantizeLinear` on the four inputs
//! of the two products (Q, Kᵀ, the softmax output P, V), the pattern TensorRT fuses into its FP8 MHA
//! kernel (TensorRT Model Optimizer's FP8 MHA recipe quantizes the inputs of both BMMs). Scales are
//! `amax / 448` from calibration statistics (`calibration_stats`, written by `ditc calibrate` with
//! this pass in the recipe); a value the statistics lack is refused with its name. The model's opset is
//! raised to 19 (FP8 Q/DQ); tract runs the graph through the exact emulation of [`crate::fp8`].
//!
//! `format = "sage"`: each site becomes one node `SageAttention` (domain `ai.ditc`) whose attributes
//! carry SageAttention2's numerics (a TensorRT plugin implements it), plus an ONNX local function of
//! the same name whose body is the fake-quant emulation in standard ONNX ops ([`function`]):
//! - K smoothing: `K - mean over tokens of K` (per batch and head);
//! - INT8 Q and K with one scale per group, `max|x| / 127 (+ eps)`, rounded half away from zero
//!   (triton's `x + 0.5·sign(x)` then truncation). `granularity = "per_thread"` (SageAttention2's
//!   Hopper default, `sageattn_qk_int8_pv_fp8_cuda_sm90` + `triton/quant_per_thread.py` with
//!   `WARPQ = 16`, `WARPK = 128`): a Q group is the rows `r` of one 16-row warp block with the same
//!   `r % 8`; a K group the rows of one 128-row block with the same `(r % 8) / 2`; eps = 1e-7.
//!   `granularity = "per_block"` (`triton/quant_per_block.py`, `BLKQ = 128`, `BLKK = 64`): one scale
//!   per block of rows, Q multiplied by `scale · log2(e)` before it is quantized, no eps (an all-zero
//!   block gets scale 1 instead of 0/0: a deliberate difference);
//! - scores `S = (q8 · k8ᵀ) · q_scale · k_scale` (integers exact in f32), in the log2 domain
//!   (`· scale · 1.44269504` for per_thread; per_block folded it into Q);
//! - online softmax over tiles of `block_k` keys as the kernel iterates: per query row, `m_j` = the
//!   running max of the scores over tiles `0..=j`; `P = 2^(S - m_j + 8.807)` (SageAttention2's
//!   `S_FP8_OFFSET`: P·448 uses the FP8 range) rounded to E4M3 (nearest even); the row sum `l` is
//!   accumulated from the unrounded P (as the kernel's f32 `d`); tiles are rescaled by `2^(m_j - m)`;
//! - V in FP8 E4M3 per channel: `scale = max over tokens |V| / 448`;
//! - `O = Σ_j 2^(m_j - m) P8_j · V8_j / l · v_scale`.
//!
//! Composition: after `sparse-linear-attention`, `sage` turns the sparse nodes into SageSLA nodes
//! ([`super::sage_sparse_attention`]); `fp8` is refused there (its Q/DQ need the decomposed products),
//! and `sparse-linear-attention` after this pass is refused (the order is sparse, then quantize).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::quantize_w8a8::{quantize_activation, raise_opset_to_19, scale_for, Format};
use super::sparse_linear_attention::{
    install_op, plan_sites, plugin_node, plugin_requirement, retarget_site, Body, SitePlan,
    SlaOptions, DOMAIN, PLUGIN_VERSION,
};
use super::{Pass, PassContext};
use crate::analysis::{AttentionKind, AttentionSite, DitMap};
use crate::calibration::CalibrationStats;
use crate::ir::{infer_types, sort_topologically, AttrValue, DataType, Graph, Model, Node};
use crate::onnx::proto;

pub const OP: &str = "SageAttention";
/// `S_FP8_OFFSET` of SageAttention2's kernels: `P = 2^(s - max + 8.807)`, i.e. P·448.
pub const P_OFFSET: f32 = 8.807;
/// log2(e): SageAttention's kernels write 1.44269504, the same f32.
pub const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Options of the pass (`[passes.options]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeAttentionOptions {
    /// `"fp8"` (per-tensor FP8 Q/DQ for TensorRT's FP8 MHA) or `"sage"` (SageAttention2).
    pub format: String,
    /// `sage` only: `"per_thread"` (default, SageAttention2 on Hopper) or `"per_block"`.
    #[serde(default)]
    pub granularity: Option<String>,
    /// `fp8` only (required there): statistics from `ditc calibrate` holding Q, Kᵀ, P and V of every site.
    #[serde(default)]
    pub calibration_stats: Option<PathBuf>,
    /// Which attention kinds (full, spatial, temporal; never cross).
    #[serde(default = "default_kinds")]
    pub kinds: Vec<AttentionKind>,
    /// `sage` only: mark each node for the TensorRT plugin (`plugin_namespace`, `plugin_version`).
    #[serde(default = "default_true")]
    pub plugin: bool,
}

fn default_kinds() -> Vec<AttentionKind> {
    vec![
        AttentionKind::Full,
        AttentionKind::Spatial,
        AttentionKind::Temporal,
    ]
}
fn default_true() -> bool {
    true
}

/// Quantization granularity of Q and K (`sage`), with the group geometry of SageAttention2's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    PerThread,
    PerBlock,
}

/// Group geometry: rows of `window` tokens split into `groups` groups by `(row % 8) / (8 / groups)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Groups {
    pub window: i64,
    pub groups: i64,
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Granularity::PerThread => "per_thread",
            Granularity::PerBlock => "per_block",
        }
    }

    /// Q's and K's groups: per_thread as `sageattn_qk_int8_pv_fp8_cuda_sm90` calls `per_thread_int8`
    /// (WARPQ 16, 8 groups by row % 8; WARPK 128, 4 groups by (row % 8) / 2); per_block as
    /// `per_block_int8` (BLKQ 128, BLKK 64, one group each).
    pub fn groups(self) -> (Groups, Groups) {
        match self {
            Granularity::PerThread => (
                Groups {
                    window: 16,
                    groups: 8,
                },
                Groups {
                    window: 128,
                    groups: 4,
                },
            ),
            Granularity::PerBlock => (
                Groups {
                    window: 128,
                    groups: 1,
                },
                Groups {
                    window: 64,
                    groups: 1,
                },
            ),
        }
    }

    /// The scale's eps (`max / 127 + eps`): per_thread's triton kernels add 1e-7, per_block's not.
    pub fn eps(self) -> f32 {
        match self {
            Granularity::PerThread => 1e-7,
            Granularity::PerBlock => 0.0,
        }
    }
}

/// The validated choice.
#[derive(Clone, Debug)]
pub enum Mode {
    Fp8 { stats: PathBuf },
    Sage { granularity: Granularity },
}

impl QuantizeAttentionOptions {
    /// Option-level checks (before any model is read).
    pub fn mode(&self) -> Result<Mode> {
        if self.kinds.is_empty() {
            bail!("quantize-attention: kinds is empty (give some of full, spatial, temporal)");
        }
        if self.kinds.contains(&AttentionKind::Cross) {
            bail!("quantize-attention: kinds contains 'cross': only self-attention sites (full, spatial, temporal) are quantized");
        }
        match self.format.as_str() {
            "fp8" => {
                if self.granularity.is_some() {
                    bail!("quantize-attention: granularity applies to format = \"sage\" only (fp8 is per tensor)");
                }
                let Some(stats) = &self.calibration_stats else {
                    bail!("quantize-attention: format = \"fp8\" needs calibration_stats (or --calibration-stats): run `ditc calibrate` with this recipe to record the amax of Q, K, V and P of every attention site");
                };
                Ok(Mode::Fp8 {
                    stats: stats.clone(),
                })
            }
            "sage" => {
                if self.calibration_stats.is_some() {
                    bail!("quantize-attention: format = \"sage\" quantizes dynamically (its scales come from each call's values): calibration_stats does not apply");
                }
                let granularity = match self.granularity.as_deref() {
                    None | Some("per_thread") => Granularity::PerThread,
                    Some("per_block") => Granularity::PerBlock,
                    Some(other) => bail!(
                        "quantize-attention: granularity = \"{other}\": expected \"per_thread\" or \"per_block\""
                    ),
                };
                Ok(Mode::Sage { granularity })
            }
            other => {
                bail!("quantize-attention: format = \"{other}\": expected \"fp8\" or \"sage\"")
            }
        }
    }
}

pub struct QuantizeAttention {
    options: QuantizeAttentionOptions,
    mode: Mode,
}

impl QuantizeAttention {
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let options: QuantizeAttentionOptions = options.clone().try_into().context(
            "invalid quantize-attention options (valid keys: format, granularity, calibration_stats, kinds, plugin)",
        )?;
        let mode = options.mode()?;
        if let Mode::Fp8 { stats } = &mode {
            // Read now: a missing or malformed file fails before any model is read.
            CalibrationStats::read(stats)?;
        }
        Ok(QuantizeAttention { options, mode })
    }
}

/// The sites of `kinds` written as two products around a softmax.
fn selected_sites(map: &DitMap, kinds: &[AttentionKind]) -> Vec<AttentionSite> {
    map.attention
        .iter()
        .filter(|s| kinds.contains(&s.kind))
        .filter(|s| s.qk_matmul.is_some() && s.pv_matmul.is_some())
        .cloned()
        .collect()
}

/// The four values the `fp8` format quantizes at one site: the inputs of the score product (Q, Kᵀ)
/// and of the value product (P, V).
pub fn fp8_values(graph: &Graph, site: &AttentionSite) -> Option<[String; 4]> {
    let find = |name: &Option<String>| {
        let name = name.as_deref()?;
        graph.nodes.iter().find(|n| n.name == name)
    };
    let (qk, pv) = (find(&site.qk_matmul)?, find(&site.pv_matmul)?);
    Some([
        qk.inputs.first()?.clone(),
        qk.inputs.get(1)?.clone(),
        pv.inputs.first()?.clone(),
        pv.inputs.get(1)?.clone(),
    ])
}

/// The values `ditc calibrate` records for a recipe with `quantize-attention` in format `fp8`.
pub fn calibration_values(
    model: &Model,
    map: &DitMap,
    options: &toml::Table,
) -> Result<Vec<String>> {
    let o: QuantizeAttentionOptions = options
        .clone()
        .try_into()
        .context("invalid quantize-attention options")?;
    if o.format != "fp8" {
        return Ok(Vec::new());
    }
    Ok(selected_sites(map, &o.kinds)
        .iter()
        .filter_map(|s| fp8_values(&model.graph, s))
        .flatten()
        .collect())
}

/// True if `quantize-attention` already ran on `model`: a `SageAttention` node, or a site whose
/// softmax output is read through Q/DQ (only the `fp8` format quantizes P).
pub fn already_quantized(model: &Model, map: &DitMap) -> bool {
    let g = &model.graph;
    let sage = g
        .nodes
        .iter()
        .any(|n| n.domain == DOMAIN && n.op_type == OP);
    let p_quantized = map.attention.iter().any(|s| {
        let pv = s
            .pv_matmul
            .as_deref()
            .and_then(|name| g.nodes.iter().find(|n| n.name == name));
        pv.and_then(|n| n.inputs.first())
            .and_then(|p| g.nodes.iter().find(|n| n.outputs.contains(p)))
            .is_some_and(|n| n.op_type == "DequantizeLinear")
    });
    sage || p_quantized
}

impl Pass for QuantizeAttention {
    fn name(&self) -> &'static str {
        "quantize-attention"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        if already_quantized(model, &cx.dit_map) {
            bail!(
                "the attention sites are already quantized by an earlier quantize-attention pass"
            );
        }
        if cx.sparse_attention.is_some() {
            // SageSLA: the sparse nodes take SageAttention's numerics.
            return match &self.mode {
                Mode::Sage { granularity } => super::sage_sparse_attention::quantize_sparse_sites(
                    model,
                    cx,
                    &self.options.kinds,
                    *granularity,
                ),
                Mode::Fp8 { .. } => bail!(
                    "format = \"fp8\" puts Q/DQ on the products of a decomposed site, and sparse-linear-attention already fused the sites into one op: use format = \"sage\" (SageSLA) with sparse attention"
                ),
            };
        }
        if let Some(s) = &cx.schedule {
            bail!(
                "a '{}' schedule is already baked (it moved attention sites into If branches): quantized attention and a schedule pass cannot be combined yet",
                s.policy
            );
        }
        let sites = selected_sites(&cx.dit_map, &self.options.kinds);
        if sites.is_empty() {
            bail!(
                "no attention site of kinds {:?} written as MatMul -> Softmax -> MatMul was found",
                self.options
                    .kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
            );
        }
        match &self.mode {
            Mode::Fp8 { stats } => {
                let stats = CalibrationStats::read(stats)?;
                quantize_fp8(model, &sites, &stats)
            }
            Mode::Sage { granularity } => {
                rewrite_sage(model, cx, &sites, *granularity, self.options.plugin)
            }
        }
    }
}

/// `fp8`: Q/DQ on the four product inputs of every site (everything checked before the graph changes).
fn quantize_fp8(
    model: &mut Model,
    sites: &[AttentionSite],
    stats: &CalibrationStats,
) -> Result<()> {
    let mut plan = Vec::new();
    let mut missing = Vec::new();
    for s in sites {
        let values = fp8_values(&model.graph, s).with_context(|| {
            format!(
                "attention site {} ({}): its products are not in the graph (a ditc bug)",
                s.id, s.anchor
            )
        })?;
        for v in values {
            match stats.amax(&v) {
                Some(amax) => plan.push((s, v, amax)),
                None => missing.push(v),
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "the calibration stats have no amax for {} attention value(s) ({}{}): run `ditc calibrate` with quantize-attention (format = \"fp8\") in the recipe",
            missing.len(),
            missing.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
            if missing.len() > 4 { ", ..." } else { "" }
        );
    }
    raise_opset_to_19(model)?;
    let mut done: std::collections::HashMap<String, String> = Default::default();
    for (s, value, amax) in plan {
        let dq = match done.get(&value) {
            Some(dq) => dq.clone(),
            None => {
                let dq = quantize_activation(
                    &mut model.graph,
                    &value,
                    scale_for(amax, Format::Fp8),
                    Format::Fp8,
                );
                done.insert(value.clone(), dq.clone());
                dq
            }
        };
        // Only the attention products read the quantized value.
        for name in [&s.qk_matmul, &s.pv_matmul].into_iter().flatten() {
            let node = model
                .graph
                .nodes
                .iter_mut()
                .find(|n| &n.name == name)
                .expect("found above");
            for i in node.inputs.iter_mut().filter(|i| **i == value) {
                *i = dq.clone();
            }
        }
    }
    sort_topologically(&mut model.graph)?;
    Ok(())
}

/// Every attribute the `SageAttention` op takes (the local function declares them all).
pub const ATTRIBUTES: &[&str] = &[
    "scale",
    "granularity",
    "q_window",
    "q_groups",
    "k_window",
    "k_groups",
    "scale_eps",
    "q_prescale",
    "score_scale",
    "p_offset",
    "v_max",
    "plugin_namespace",
    "plugin_version",
];

/// The node attributes of one site (see the module docs and the README's op contract).
pub fn sage_attributes(scale: f32, g: Granularity) -> Vec<(&'static str, AttrValue)> {
    let (q, k) = g.groups();
    let (q_prescale, score_scale) = match g {
        Granularity::PerThread => (1.0, scale * LOG2E),
        Granularity::PerBlock => (scale * LOG2E, 1.0),
    };
    vec![
        ("scale", AttrValue::Float(scale)),
        (
            "granularity",
            AttrValue::String(g.name().as_bytes().to_vec().into()),
        ),
        ("q_window", AttrValue::Int(q.window)),
        ("q_groups", AttrValue::Int(q.groups)),
        ("k_window", AttrValue::Int(k.window)),
        ("k_groups", AttrValue::Int(k.groups)),
        ("scale_eps", AttrValue::Float(g.eps())),
        ("q_prescale", AttrValue::Float(q_prescale)),
        ("score_scale", AttrValue::Float(score_scale)),
        ("p_offset", AttrValue::Float(P_OFFSET)),
        ("v_max", AttrValue::Float(crate::fp8::E4M3_MAX)),
    ]
}

fn rewrite_sage(
    model: &mut Model,
    cx: &mut PassContext,
    sites: &[AttentionSite],
    granularity: Granularity,
    plugin: bool,
) -> Result<()> {
    if model.default_opset() < 13 {
        bail!(
            "the model's opset is {}: the op's portable body needs opset 13 or newer",
            model.default_opset()
        );
    }
    let types = infer_types(&model.graph, model.default_opset());
    let sla: SlaOptions = toml::Table::new().try_into().expect("defaults");
    let sites: Vec<&AttentionSite> = sites.iter().collect();
    let plans = plan_sites(&model.graph, &types, &sites, &sla, |_| None)?;
    let mut plugin_nodes = Vec::new();
    for plan in &plans {
        let node = replace_site(&mut model.graph, plan, granularity, plugin);
        retarget_site(cx, plan.id, &node.name);
        plugin_nodes.push(plugin_node(&node));
    }
    install_op(model, function(model.default_opset()))?;
    if plugin {
        cx.plugins.push(plugin_requirement(OP, plugin_nodes));
    }
    Ok(())
}

/// Replace one site by a `SageAttention` node (K transposed back from the Kᵀ the graph has).
fn replace_site(graph: &mut Graph, plan: &SitePlan, g: Granularity, plugin: bool) -> Node {
    let name = format!("ditc.sage.site{}", plan.id);
    let k = format!("{name}/k");
    let transpose = Node::new(
        &format!("{name}/k_transpose"),
        "Transpose",
        &[&plan.k_t],
        &[&k],
    )
    .with_attr("perm", AttrValue::Ints(vec![0, 1, 3, 2]));
    let mut node = Node::new(&name, OP, &[&plan.q, &k, &plan.v], &[&plan.out]);
    node.domain = DOMAIN.into();
    for (attr, value) in sage_attributes(plan.scale, g) {
        node = node.with_attr(attr, value);
    }
    if plugin {
        for (attr, value) in [
            ("plugin_namespace", DOMAIN),
            ("plugin_version", PLUGIN_VERSION),
        ] {
            node = node.with_attr(attr, AttrValue::String(value.as_bytes().to_vec().into()));
        }
    }
    let at = graph
        .nodes
        .iter()
        .position(|n| n.outputs.first() == Some(&plan.out))
        .expect("planned");
    graph.nodes[at] = node.clone();
    graph.nodes.insert(at, transpose);
    node
}

// ---- the portable body ---------------------------------------------------------------------------

/// `ReduceMax` over `axes` (an attribute before opset 18, an input from 18 on).
fn reduce_max(b: &mut Body, opset: i64, x: &str, axes: &[i64], keep: bool) -> String {
    let keep = ("keepdims", AttrValue::Int(keep as i64));
    if opset >= 18 {
        let axes = b.i64s(axes);
        b.op("ReduceMax", &[x, &axes], vec![keep])
    } else {
        b.op(
            "ReduceMax",
            &[x],
            vec![keep, ("axes", AttrValue::Ints(axes.to_vec()))],
        )
    }
}

/// The length of axis -2 of `x` (int64 scalar).
fn seq_len(b: &mut Body, x: &str) -> String {
    let shape = b.op("Shape", &[x], vec![]);
    let minus2 = b.i64(-2);
    b.op(
        "Gather",
        &[&shape, &minus2],
        vec![("axis", AttrValue::Int(0))],
    )
}

/// INT8 group quantization of `x` [B, H, L, D] along its rows: the rows of each `window` split into
/// `groups` groups by `(row % 8) / (8 / groups)`, one scale per group `max|x| / 127 + eps` (a zero
/// scale becomes 1: the group is all zeros). Returns the integers (as f32) and each row's scale
/// [B, H, L, 1].
fn quantize_int8(
    b: &mut Body,
    opset: i64,
    x: &str,
    window: &str,
    groups: &str,
    eps: &str,
) -> (String, String) {
    let (zero, one, eight) = (b.i64(0), b.i64(1), b.i64(8));
    let len = seq_len(b, x);
    let rows = b.op("Range", &[&zero, &len, &one], vec![]);
    // group(row) = (row / window) * groups + (row % 8) / (8 / groups)
    let block = b.bin("Div", &rows, window);
    let first = b.bin("Mul", &block, groups);
    let octet = b.bin("Div", &rows, &eight);
    let octet = b.bin("Mul", &octet, &eight);
    let lane = b.bin("Sub", &rows, &octet);
    let per_group = b.bin("Div", &eight, groups);
    let sub = b.bin("Div", &lane, &per_group);
    let group = b.bin("Add", &first, &sub);
    let window_minus_one = b.bin("Sub", window, &one);
    let padded = b.bin("Add", &len, &window_minus_one);
    let blocks = b.bin("Div", &padded, window);
    let count = b.bin("Mul", &blocks, groups);
    let ids = b.op("Range", &[&zero, &count, &one], vec![]);
    let ids = b.unsqueeze(&ids, &[1]);
    let per_row = b.unsqueeze(&group, &[0]);
    let onehot = b.bin("Equal", &ids, &per_row); // [G, L]
    let abs = b.op("Abs", &[x], vec![]);
    let row_max = reduce_max(b, opset, &abs, &[-1], false); // [B, H, L]
    let row_max = b.unsqueeze(&row_max, &[2]); // [B, H, 1, L]
    let zero_f = b.f32(0.0);
    let members = b.op("Where", &[&onehot, &row_max, &zero_f], vec![]); // [B, H, G, L]
    let group_max = reduce_max(b, opset, &members, &[-1], false); // [B, H, G]
    let row_group_max = b.op(
        "Gather",
        &[&group_max, &group],
        vec![("axis", AttrValue::Int(2))],
    );
    let row_group_max = b.unsqueeze(&row_group_max, &[3]); // [B, H, L, 1]
    let q_max = b.f32(127.0);
    let scale = b.bin("Div", &row_group_max, &q_max);
    let scale = b.bin("Add", &scale, eps);
    let is_zero = b.bin("Equal", &scale, &zero_f);
    let one_f = b.f32(1.0);
    let scale = b.op("Where", &[&is_zero, &one_f, &scale], vec![]);
    let v = b.bin("Div", x, &scale);
    // Round half away from zero: sign(v) * floor(|v| + 0.5) (triton's `v + 0.5·sign(v)`, truncated).
    let sign = b.op("Sign", &[&v], vec![]);
    let mag = b.op("Abs", &[&v], vec![]);
    let half = b.f32(0.5);
    let mag = b.bin("Add", &mag, &half);
    let mag = b.op("Floor", &[&mag], vec![]);
    let ints = b.bin("Mul", &sign, &mag);
    (ints, scale)
}

/// Round `x` to the nearest E4M3FN value (ties to even), saturating at ±448: the construction of
/// [`crate::fp8`]'s emulation (exponent from `Log`, corrected at powers of two; `Round` is
/// half-to-even).
fn round_e4m3(b: &mut Body, x: &str) -> String {
    let (ln2, two, one, minus6, three) = (
        b.f32(std::f32::consts::LN_2),
        b.f32(2.0),
        b.f32(1.0),
        b.f32(-6.0),
        b.f32(3.0),
    );
    let (lo, hi) = (b.f32(-crate::fp8::E4M3_MAX), b.f32(crate::fp8::E4M3_MAX));
    let a = b.op("Abs", &[x], vec![]);
    let ln = b.op("Log", &[&a], vec![]);
    let log2 = b.bin("Div", &ln, &ln2);
    let e0 = b.op("Floor", &[&log2], vec![]);
    let p0 = b.bin("Pow", &two, &e0);
    let e0p1 = b.bin("Add", &e0, &one);
    let p1 = b.bin("Pow", &two, &e0p1);
    let up = b.bin("LessOrEqual", &p1, &a);
    let up = b.cast(&up, DataType::F32);
    let down = b.bin("Greater", &p0, &a);
    let down = b.cast(&down, DataType::F32);
    let e = b.bin("Add", &e0, &up);
    let e = b.bin("Sub", &e, &down);
    let e = b.op("Max", &[&e, &minus6], vec![]);
    let eq = b.bin("Sub", &e, &three);
    let quantum = b.bin("Pow", &two, &eq);
    let steps = b.bin("Div", x, &quantum);
    let rounded = b.op("Round", &[&steps], vec![]);
    let r = b.bin("Mul", &rounded, &quantum);
    b.op("Clip", &[&r, &lo, &hi], vec![])
}

/// The local function `ai.ditc.SageAttention`: the op's fake-quant emulation in standard ONNX ops.
pub fn function(opset: i64) -> proto::FunctionProto {
    let mut b = Body { nodes: Vec::new() };
    let (q, k, v) = ("Q", "K", "V");
    let o = sage_core(&mut b, opset, q, k, v, None);
    b.rename(&o, "O");
    b.into_function(
        OP,
        (&[q, k, v], &["O"]),
        ATTRIBUTES.iter().map(|s| s.to_string()).collect(),
        opset,
        "ditc's SageAttention: SageAttention2's INT8 Q·Kᵀ (K smoothed), FP8 P and FP8 V per channel, as a fake-quant emulation; see ditc's README",
    )
}

/// SageAttention2's numerics (the module docs) on `q`, `k`, `v` from the op's attributes; returns O.
/// With `mask` ([B, H, Lq, Lk] bool, the block-sparse selection), only the kept keys take part:
/// their scores alone set the running maxima, the others' P is 0 (SpargeAttn's kernel skips them).
pub(crate) fn sage_core(
    b: &mut Body,
    opset: i64,
    q: &str,
    k: &str,
    v: &str,
    mask: Option<&str>,
) -> String {
    let q_window = b.attribute("q_window", true);
    let q_groups = b.attribute("q_groups", true);
    let k_window = b.attribute("k_window", true);
    let k_groups = b.attribute("k_groups", true);
    let eps = b.attribute("scale_eps", false);
    let q_prescale = b.attribute("q_prescale", false);
    let score_scale = b.attribute("score_scale", false);
    let p_offset = b.attribute("p_offset", false);
    let v_max = b.attribute("v_max", false);

    // K smoothing: subtract the mean over tokens.
    let k_sum = b.sum(k, &[-2], true);
    let k_len = seq_len(b, k);
    let k_len_f = b.cast(&k_len, DataType::F32);
    let k_mean = b.bin("Div", &k_sum, &k_len_f);
    let k_smooth = b.bin("Sub", k, &k_mean);

    // INT8 Q and K, scores in the log2 domain.
    let q_in = b.bin("Mul", q, &q_prescale);
    let (q8, q_scale) = quantize_int8(b, opset, &q_in, &q_window, &q_groups, &eps);
    let (k8, k_scale) = quantize_int8(b, opset, &k_smooth, &k_window, &k_groups, &eps);
    let k8_t = b.transpose_last(&k8);
    let s_int = b.bin("MatMul", &q8, &k8_t);
    let k_scale_t = b.transpose_last(&k_scale);
    let scales = b.bin("Mul", &q_scale, &k_scale_t);
    let s = b.bin("Mul", &s_int, &scales);
    let s = b.bin("Mul", &s, &score_scale); // [B, H, Lq, Lk]
    let minus_inf = b.f32(f32::NEG_INFINITY);
    let s = match mask {
        Some(mask) => b.op("Where", &[mask, &s, &minus_inf], vec![]),
        None => s,
    };

    // Running max over tiles of k_window keys (the kernel's iteration over key blocks).
    let (zero, one) = (b.i64(0), b.i64(1));
    let keys = b.op("Range", &[&zero, &k_len, &one], vec![]);
    let key_tile = b.bin("Div", &keys, &k_window);
    let window_minus_one = b.bin("Sub", &k_window, &one);
    let padded = b.bin("Add", &k_len, &window_minus_one);
    let tiles = b.bin("Div", &padded, &k_window);
    let tile_ids = b.op("Range", &[&zero, &tiles, &one], vec![]);
    let tile_col = b.unsqueeze(&tile_ids, &[1]);
    let key_row = b.unsqueeze(&key_tile, &[0]);
    let in_tile = b.bin("Equal", &tile_col, &key_row); // [T, Lk]
    let s5 = b.unsqueeze(&s, &[3]); // [B, H, Lq, 1, Lk]
    let tile_scores = b.op("Where", &[&in_tile, &s5, &minus_inf], vec![]); // [B, H, Lq, T, Lk]
    let tile_max = reduce_max(b, opset, &tile_scores, &[-1], false); // [B, H, Lq, T]
    let later = b.unsqueeze(&tile_ids, &[0]);
    let upto = b.bin("LessOrEqual", &later, &tile_col); // [T (j), T (j')]: j' <= j
    let tm5 = b.unsqueeze(&tile_max, &[3]); // [B, H, Lq, 1, T]
    let seen = b.op("Where", &[&upto, &tm5, &minus_inf], vec![]);
    let running = reduce_max(b, opset, &seen, &[-1], false); // [B, H, Lq, T]
    let row_max = reduce_max(b, opset, &tile_max, &[-1], true); // [B, H, Lq, 1]
    let m = b.op(
        "Gather",
        &[&running, &key_tile],
        vec![("axis", AttrValue::Int(3))],
    );

    // P = 2^(s - m_j + offset), rounded to FP8; l from the unrounded P; tiles rescaled to the row max.
    let ln2 = b.f32(std::f32::consts::LN_2);
    let exponent = b.bin("Sub", &s, &m);
    let exponent = b.bin("Add", &exponent, &p_offset);
    let exponent = b.bin("Mul", &exponent, &ln2);
    let p = b.op("Exp", &[&exponent], vec![]);
    // A skipped key's exponent is -inf - -inf before the first kept tile of its row: P is 0.
    let p = match mask {
        Some(mask) => {
            let zero = b.f32(0.0);
            b.op("Where", &[mask, &p, &zero], vec![])
        }
        None => p,
    };
    let p8 = round_e4m3(b, &p);
    let rescale = b.bin("Sub", &m, &row_max);
    let rescale = b.bin("Mul", &rescale, &ln2);
    let rescale = b.op("Exp", &[&rescale], vec![]);
    let p_rescaled = b.bin("Mul", &p, &rescale);
    let l = b.sum(&p_rescaled, &[-1], true);
    let p8_rescaled = b.bin("Mul", &p8, &rescale);

    // V: FP8 per channel, scale max over tokens / 448.
    let v_abs = b.op("Abs", &[v], vec![]);
    let v_amax = reduce_max(b, opset, &v_abs, &[-2], true); // [B, H, 1, Dv]
    let v_scale = b.bin("Div", &v_amax, &v_max);
    let zero_f = b.f32(0.0);
    let one_f = b.f32(1.0);
    let v_zero = b.bin("Equal", &v_scale, &zero_f);
    let v_scale = b.op("Where", &[&v_zero, &one_f, &v_scale], vec![]);
    let v_in = b.bin("Div", v, &v_scale);
    let v8 = round_e4m3(b, &v_in);

    let acc = b.bin("MatMul", &p8_rescaled, &v8);
    let o = b.bin("Div", &acc, &l);
    b.bin("Mul", &o, &v_scale)
}
