//! `ada-cache`: AdaCache with Motion Regularization (github AdaCache-DiT/AdaCache,
//! `opensora_base/opensora/models/stdit/stdit3.py`: `STDiT3Block.forward`, `compute_next_step`;
//! research spec §5), decided inside the graph.
//!
//! AdaCache computes every block at one step, then reuses every block's residuals for a number of
//! steps (the *rate*) read from a codebook of distances: the distance is the relative L1 change of one
//! block's residual between the last two computed steps, per elapsed step, scaled by the motion of
//! that residual over frames (MoReg). With `n = step + 1` (the reference's 1-based `fwd_id`), `N`
//! steps, per branch (state zeros before the first call):
//!
//! ```text
//! compute = n == 1 or n >= N - 1 or n == last + max(rate, 1)      (state only: before any block)
//! If(compute): the blocks run; r = the chosen block's residual      else: cached residuals added
//! if compute and a cached r_ref exists (last > 0):
//!     d = mean|r_ref - r| / mean|r_ref| / max(rate, 1)
//!     MoReg: m = mean|r[:, S:] - r[:, :-S]| / (mean|r[:, S:]| + mean|r[:, :-S]|)   if lo <= n <= hi
//!            m = (m / norm)^power                                                   (else m = 1)
//!            g = mograd_mul * (m - m_prev) / max(rate, 1);  m_prev = m;  d *= m + |g|
//!     rate = v_i for the first codebook key k_i with d < k_i, else the last value      (ditc.metric = d)
//! if compute: last = n; r_ref = r
//! ```
//!
//! `S` is the number of tokens per frame. `m_prev` starts at 1 and is updated only where a distance is
//! measured, as the reference's `prev_moreg` (never reset).
//!
//! Deliberate differences from the reference, and why:
//! - The reference caches two residuals per block (attention; cross-attention + MLP) but skips every
//!   block at the same steps with one global rate, so a skipped step adds the sum of all cached
//!   residuals to the first block's input: the whole stack's residual of the last computed step. ditc
//!   caches that one tensor ([`crate::passes::broadcast_adaptive::bake_stack`]) instead of 2 per block;
//!   the values agree up to the f32 rounding of the sum.
//! - Wan has no temporal attention, so the reference's `cache_res = 't-attn'` does not exist: the
//!   distance is measured on the chosen block's gated self-attention residual (`residual =
//!   "attention"`, the block's stream after its first residual `Add` minus its input), or on its
//!   cross-attention + MLP residual (`"cross-mlp"`: the block's output minus that value), spec §5.
//! - One block (`block`, default the middle one, `(blocks - 1) / 2`: 13 of 28 as the reference's
//!   `cache_loc = [13]`); MoReg over one frame stride (the reference's default `moreg_strides = [1]`).
//! - Open-Sora runs both guidance branches as one batch (one decision); ditc's runtime makes two calls,
//!   and each branch decides on its own state.
//! - Models whose blocks alternate layouts (Latte's spatial/temporal pairs) are refused: one block's
//!   residual is not a `[batch, frames x tokens, channels]` tensor there, and caching per block in
//!   other layouts is not implemented.
//!
//! `forecast = "taylor"` ([`crate::schedule::forecast`]): on a skipped step the cached stack residual
//! (the sum of every block's residuals, so this forecasts each and sums them: the forecast is linear)
//! is extrapolated from the last computed ones, with weights computed in the graph from the steps of
//! those calls (states `computed_calls`, `update_step`, ...).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::analysis::stack::{find_stack, Stack};
use crate::analysis::{AttentionKind, DitMap};
use crate::ir::{infer_types, sort_topologically, DataType, Graph, Model, Node};
use crate::manifest::{InGraphDecisions, Schedule};
use crate::passes::broadcast_adaptive::{bake_stack_with, IfExtra};
use crate::passes::{condition_name, PassContext, STEP_INPUT};
use crate::schedule::emitter::{declare_states, zero_state_bindings, Emitter};
use crate::schedule::first_block_cache::{DECISION, METRIC};
use crate::schedule::forecast::{self, Taylor};
use crate::schedule::Group;

/// The policy name in the manifest and in `broadcast-adaptive`'s `policy` option.
pub const POLICY: &str = "ada-cache";

/// The paper's codebooks (`{distance: steps to reuse}`, in the reference's order).
pub const CODEBOOK_100: &[(f64, u32)] = &[
    (0.03, 12),
    (0.05, 10),
    (0.07, 8),
    (0.09, 6),
    (0.11, 4),
    (1.00, 3),
];
pub const CODEBOOK_30_FAST: &[(f64, u32)] = &[
    (0.08, 6),
    (0.16, 5),
    (0.24, 4),
    (0.32, 3),
    (0.40, 2),
    (1.00, 1),
];
pub const CODEBOOK_30_SLOW: &[(f64, u32)] = &[
    (0.08, 3),
    (0.16, 2),
    (0.24, 1),
    (0.32, 1),
    (0.40, 1),
    (1.00, 1),
];

/// Which residual of the chosen block the distance is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Residual {
    /// The gated self-attention residual.
    Attention,
    /// The cross-attention + MLP residual (the reference's `ca-mlp`).
    CrossMlp,
}

/// A codebook: a preset name or `[[distance, steps], ...]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Codebook {
    Preset(String),
    Entries(Vec<(f64, u32)>),
}

/// Options of the `ada-cache` policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaCacheOptions {
    /// `"100-step"`, `"30-step-fast"`, `"30-step-slow"` or entries; default: `100-step` for runs of
    /// 65 steps or more, else `30-step-fast`.
    pub codebook: Option<Codebook>,
    /// The block (DiT-map index) whose residual is measured; default `(blocks - 1) / 2`.
    pub block: Option<usize>,
    pub residual: Residual,
    /// Motion regularization.
    pub moreg: bool,
    /// The 1-based steps `[lo, hi]` where MoReg measures motion; default `[10, 90]` scaled to the
    /// run (`[round(N / 10), round(9 N / 10)]`), `[4, 26]` for 30 steps (the reference's two).
    pub moreg_steps: Option<[usize; 2]>,
    /// `m = (m / moreg_norm)^moreg_power` (the reference's `moreg_hyp = (0.385, 8, 1)`).
    pub moreg_norm: f64,
    pub moreg_power: f64,
    pub mograd_mul: f64,
}

impl Default for AdaCacheOptions {
    fn default() -> Self {
        AdaCacheOptions {
            codebook: None,
            block: None,
            residual: Residual::Attention,
            moreg: true,
            moreg_steps: None,
            moreg_norm: 0.385,
            moreg_power: 8.0,
            mograd_mul: 10.0,
        }
    }
}

impl AdaCacheOptions {
    pub fn from_table(options: &toml::Table) -> Result<AdaCacheOptions> {
        let o: AdaCacheOptions = options.clone().try_into().context(
            "invalid ada-cache options (valid keys: codebook, block, residual = \"attention\" | \"cross-mlp\", moreg, moreg_steps, moreg_norm, moreg_power, mograd_mul)",
        )?;
        o.codebook_for(100)?;
        for (name, v) in [
            ("moreg_norm", o.moreg_norm),
            ("moreg_power", o.moreg_power),
            ("mograd_mul", o.mograd_mul),
        ] {
            if !v.is_finite() || v < 0.0 || (name == "moreg_norm" && v == 0.0) {
                bail!(
                    "ada-cache {name} must be a finite number > 0 (>= 0 for the others), got {v}"
                );
            }
        }
        if let Some([lo, hi]) = o.moreg_steps {
            if lo > hi {
                bail!("ada-cache moreg_steps [{lo}, {hi}] is inverted");
            }
        }
        Ok(o)
    }

    /// The codebook for a run of `steps` steps, checked.
    pub fn codebook_for(&self, steps: usize) -> Result<Vec<(f64, u32)>> {
        let entries = match &self.codebook {
            None if steps >= 65 => CODEBOOK_100.to_vec(),
            None => CODEBOOK_30_FAST.to_vec(),
            Some(Codebook::Preset(name)) => match name.as_str() {
                "100-step" => CODEBOOK_100.to_vec(),
                "30-step-fast" => CODEBOOK_30_FAST.to_vec(),
                "30-step-slow" => CODEBOOK_30_SLOW.to_vec(),
                other => bail!("ada-cache codebook '{other}' is not a preset (100-step, 30-step-fast, 30-step-slow) nor a list of [distance, steps] pairs"),
            },
            Some(Codebook::Entries(e)) => e.clone(),
        };
        if entries.len() < 2 {
            bail!("ada-cache codebook needs at least two [distance, steps] entries");
        }
        if let Some(e) = entries
            .iter()
            .find(|e| !e.0.is_finite() || e.0 <= 0.0 || e.1 == 0)
        {
            bail!("ada-cache codebook entry [{}, {}]: the distance must be a finite number > 0 and the steps at least 1", e.0, e.1);
        }
        if let Some(w) = entries.windows(2).find(|w| w[0].0 >= w[1].0) {
            bail!(
                "ada-cache codebook distances must increase strictly ({} then {})",
                w[0].0,
                w[1].0
            );
        }
        Ok(entries)
    }

    /// The 1-based MoReg window for a run of `steps`.
    pub fn moreg_window(&self, steps: usize) -> [usize; 2] {
        match self.moreg_steps {
            Some(w) => w,
            None if steps == 30 => [4, 26],
            None => [
                (steps as f64 / 10.0).round() as usize,
                (steps as f64 * 0.9).round() as usize,
            ],
        }
    }
}

/// The codebook's rate for distance `d`: the first entry with `d < key`, else the last one's.
pub fn rate_for(codebook: &[(f64, u32)], d: f64) -> u32 {
    codebook[..codebook.len() - 1]
        .iter()
        .find(|(k, _)| d < *k)
        .map_or(codebook[codebook.len() - 1].1, |e| e.1)
}

/// The rule on one branch's measured scalars, in f64: [`Rule::decide`] per step; for a computed step
/// with a cached residual, [`Rule::measured`] with its distance and motion.
#[derive(Clone, Debug)]
pub struct Rule {
    pub codebook: Vec<(f64, u32)>,
    pub steps: usize,
    pub moreg: Option<([usize; 2], f64, f64, f64)>,
    pub rate: u32,
    /// 1-based step of the last computed step (0: none).
    pub last: usize,
    pub prev_moreg: f64,
}

impl Rule {
    pub fn new(o: &AdaCacheOptions, steps: usize) -> Result<Rule> {
        Ok(Rule {
            codebook: o.codebook_for(steps)?,
            steps,
            moreg: o.moreg.then(|| {
                (
                    o.moreg_window(steps),
                    o.moreg_norm,
                    o.moreg_power,
                    o.mograd_mul,
                )
            }),
            rate: 1,
            last: 0,
            prev_moreg: 1.0,
        })
    }

    /// Whether 0-based `step` computes, and whether it measures a distance.
    pub fn decide(&self, step: usize) -> (bool, bool) {
        let n = step + 1;
        let compute = n == 1 || n + 1 >= self.steps || n == self.last + self.rate as usize;
        (compute, compute && self.last > 0)
    }

    /// A computed step (0-based `step`): `distance = mean|r_ref - r| / mean|r_ref|`, `motion` the raw
    /// MoReg ratio (ignored without MoReg or outside its window), when a distance is measured.
    /// Returns the scaled distance the codebook saw.
    pub fn computed(&mut self, step: usize, measured: Option<(f64, f64)>) -> Option<f64> {
        let n = step + 1;
        let mut out = None;
        if let Some((distance, motion)) = measured {
            let rate = self.rate as f64;
            let mut d = distance / rate;
            if let Some(([lo, hi], norm, power, mul)) = self.moreg {
                let m = if lo <= n && n <= hi {
                    (motion / norm).powf(power)
                } else {
                    1.0
                };
                let g = mul * (m - self.prev_moreg) / rate;
                self.prev_moreg = m;
                d *= m + g.abs();
            }
            self.rate = rate_for(&self.codebook, d);
            out = Some(d);
        }
        self.last = n;
        out
    }
}

/// State values (`ditc.state.ada.<v>` / `ditc.state_out.ada.<v>`).
const REFERENCE: &str = "reference_residual";
const RATE: &str = "rate";
const LAST: &str = "last_computed";
const PREV_MOREG: &str = "prev_moreg";
const MOREG_SEEN: &str = "moreg_seen";

fn state_in(v: &str) -> String {
    format!("ditc.state.ada.{v}")
}

fn state_out(v: &str) -> String {
    format!("ditc.state_out.ada.{v}")
}

/// The chosen block's stream after its self-attention residual `Add`: the `Add` reading the block's
/// input whose other operand is computed from the block's first non-cross attention site.
fn after_attention(graph: &Graph, map: &DitMap, stack: &Stack, block: usize) -> Result<String> {
    let span = &stack.blocks[block];
    let b = &map.blocks[span.block];
    let site = b
        .attention
        .iter()
        .map(|&id| &map.attention[id])
        .find(|s| s.kind != AttentionKind::Cross)
        .with_context(|| {
            format!("ada-cache: block {block} has no self-attention site to measure")
        })?;
    let anchor_out = graph
        .nodes
        .iter()
        .find(|n| n.name == site.anchor)
        .and_then(|n| n.outputs.first().cloned())
        .with_context(|| format!("ada-cache: attention anchor '{}' not found", site.anchor))?;
    let producer: std::collections::HashMap<&str, &Node> = graph
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let depends_on_anchor = |value: &str| {
        let mut todo = vec![value];
        let mut seen = std::collections::HashSet::new();
        while let Some(v) = todo.pop() {
            if v == anchor_out {
                return true;
            }
            if let Some(n) = producer.get(v) {
                for i in n.present_inputs() {
                    if seen.insert(i) {
                        todo.push(i);
                    }
                }
            }
        }
        false
    };
    graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Add" && n.inputs.contains(&span.input))
        .find(|n| {
            n.present_inputs()
                .any(|i| i != span.input && depends_on_anchor(i))
        })
        .and_then(|n| n.outputs.first().cloned())
        .with_context(|| {
            format!(
                "ada-cache: no residual Add of block {block}'s self-attention onto its input '{}'",
                span.input
            )
        })
}

/// Rewrite `model` so that each call decides in the graph whether the block stack runs (module doc).
pub fn bake(
    model: &mut Model,
    cx: &mut PassContext,
    o: &AdaCacheOptions,
    forecast: Option<Taylor>,
) -> Result<()> {
    let steps = cx.sampler.as_ref().expect("checked").1.steps();
    let codebook = o.codebook_for(steps)?;
    if steps < 3 {
        bail!("ada-cache needs at least 3 steps (the first and the last two always compute)");
    }
    let io = crate::manifest::detect_io(model)?;
    let mut graph = model.graph.clone();
    sort_topologically(&mut graph)?;
    // Constants stay constants in every part of a graph split at the If (Latte's export).
    crate::schedule::emitter::constants_to_initializers(&mut graph);
    let opset = model.default_opset();
    let types = infer_types(&graph, opset);
    let stack = find_stack(&graph, &cx.dit_map, &types).map_err(|e| {
        e.context("ada-cache caches the block stack's residual (per-block caching for blocks that do not form one stream, such as Latte's, is not implemented)")
    })?;
    if !stack.one_layout {
        bail!("ada-cache measures one block's residual and its motion over frames on a [batch, frames x tokens, channels] stream; this model's blocks alternate layouts (Latte's spatial blocks see frames as the batch, its temporal blocks tokens as the batch), and per-block caching in other layouts is not implemented");
    }
    let blocks = stack.blocks.len();
    let block = o.block.unwrap_or((blocks - 1) / 2);
    if block >= blocks {
        bail!(
            "ada-cache block {block} does not exist: the model has {blocks} blocks (0 ..= {})",
            blocks - 1
        );
    }
    let dtype = types
        .get(stack.output())
        .and_then(|t| t.dtype)
        .unwrap_or(DataType::F32);
    if dtype != DataType::F32 {
        bail!("ada-cache needs a float32 residual stream (got {dtype})");
    }
    let shape = stack.shape.clone();
    if shape.len() != 3 {
        bail!(
            "ada-cache measures motion on a [batch, tokens, channels] stream; '{}' is {shape:?}",
            stack.output()
        );
    }
    let latent = types
        .get(&io.latent)
        .and_then(|t| t.shape.clone())
        .context("the latent's shape is unknown")?;
    let frames = if latent.len() == 5 { latent[2] } else { 1 };
    let tokens = shape[1];
    if o.moreg && (frames < 2 || tokens % frames != 0) {
        bail!("ada-cache moreg needs a video whose {tokens} tokens split into its {frames} frames (set moreg = false for images)");
    }
    let per_frame = tokens / frames.max(1);

    let after_attn = after_attention(&graph, &cx.dit_map, &stack, block)?;
    let span = &stack.blocks[block];
    let (a, b) = match o.residual {
        Residual::Attention => (after_attn.clone(), span.input.clone()),
        Residual::CrossMlp => (span.output.clone(), after_attn.clone()),
    };
    let measured = "ditc.ada.block_residual.computed".to_string();
    let latest = "ditc.ada.block_residual".to_string();
    let extra = IfExtra {
        nodes: vec![Node::new(&measured, "Sub", &[&a, &b], &[&measured])],
        then_value: measured.clone(),
        else_value: state_in(REFERENCE),
        output: latest.clone(),
        dtype,
        shape: shape.clone(),
    };
    let sites: Vec<usize> = stack
        .blocks
        .iter()
        .flat_map(|b| cx.dit_map.blocks[b.block].attention.iter().copied())
        .collect();
    let anchors: Vec<String> = sites
        .iter()
        .map(|&id| cx.dit_map.attention[id].anchor.clone())
        .collect();
    let mut bindings = bake_stack_with(&mut graph, &stack, &anchors, &types, forecast, &[extra])?;

    let mut states = vec![
        (REFERENCE, (DataType::F32, shape.clone())),
        (RATE, (DataType::I64, Vec::new())),
        (LAST, (DataType::I64, Vec::new())),
        (PREV_MOREG, (DataType::F32, Vec::new())),
        (MOREG_SEEN, (DataType::Bool, Vec::new())),
    ];
    if let Some(t) = forecast {
        states.push((forecast::COMPUTED_CALLS, (DataType::I64, Vec::new())));
        states.extend(forecast::update_step_states(t.order));
    }
    declare_states(&mut graph, &states, state_in, state_out);
    let mut e = Emitter::new("ada", opset);
    let rule = Rule::new(o, steps)?;
    emit(&mut e, &rule, &latest, per_frame, tokens);
    if let Some(t) = forecast {
        let calls = state_in(forecast::COMPUTED_CALLS);
        forecast::emit_weights(&mut e, t.order, &calls, state_in, state_out);
        forecast::emit_call_count(&mut e, &calls, &state_out(forecast::COMPUTED_CALLS));
    }
    e.finish(&mut graph)?;
    model.graph = graph;

    for b in &mut bindings {
        b.group = Group::Blocks;
    }
    bindings.extend(zero_state_bindings(&states, state_in, state_out));
    cx.state.extend(bindings);
    cx.step_input = Some(STEP_INPUT.to_string());
    let all: Vec<usize> = stack.blocks.iter().map(|b| b.block).collect();
    let mut options = serde_json::to_value(o)?;
    options["policy"] = POLICY.into();
    options["codebook"] = serde_json::to_value(&codebook)?;
    options["block"] = block.into();
    options["moreg_steps"] = serde_json::to_value(o.moreg_window(steps))?;
    if let Some(t) = forecast {
        options["forecast"] = "taylor".into();
        options["order"] = t.order.into();
    }
    cx.schedule = Some(Schedule {
        policy: POLICY.into(),
        options,
        tables: Default::default(),
        uncond_tables: None,
        metrics: None,
        sites: Default::default(),
        blocks: all.clone(),
        calls: Default::default(),
        block_tables: Vec::new(),
        adaptive: Some(InGraphDecisions {
            decision: DECISION.into(),
            metric: METRIC.into(),
            head_blocks: Vec::new(),
            cached_blocks: all,
            tail_blocks: Vec::new(),
            sites,
            follow: None,
        }),
    });
    Ok(())
}

/// The decision from the state (before the stack), then, from the `If`'s `latest` block residual,
/// the distance, MoReg, the new rate and the state outputs.
fn emit(e: &mut Emitter, rule: &Rule, latest: &str, per_frame: i64, tokens: i64) {
    let one = e.i64("one", 1);
    let n = e.op("Add", "fwd_id", &[STEP_INPUT, &one]);
    let rate = e.op("Max", "rate", &[&state_in(RATE), &one]);
    let last = state_in(LAST);
    let due_at = e.op("Add", "due_at", &[&last, &rate]);
    let due = e.op("Equal", "due", &[&n, &due_at]);
    let first = e.op("Equal", "first_step", &[&n, &one]);
    let late_from = e.i64("late_from", rule.steps as i64 - 1);
    let late = e.op("GreaterOrEqual", "last_two_steps", &[&n, &late_from]);
    let forced = e.op("Or", "forced", &[&first, &late]);
    e.named("Or", &[&forced, &due], DECISION);
    e.named("Identity", &[DECISION], &condition_name(Group::Stack));

    // After the If: `latest` is this call's block residual when it computed.
    let zero = e.i64("zero", 0);
    let has_reference = e.op("Greater", "has_reference", &[&last, &zero]);
    let measures = e.op("And", "measures", &[DECISION, &has_reference]);
    let reference = state_in(REFERENCE);
    let diff = e.op("Sub", "change", &[&reference, latest]);
    let change = e.mean_abs("change_mean", &diff, 3);
    let size = e.mean_abs("reference_mean", &reference, 3);
    let relative = e.op("Div", "relative_change", &[&change, &size]);
    let rate_f = e.cast("rate_f32", &rate, DataType::F32);
    let mut distance = e.op("Div", "distance", &[&relative, &rate_f]);
    let seen = state_in(MOREG_SEEN);
    if let Some(([lo, hi], norm, power, mul)) = rule.moreg {
        let later = e.slice1("frames_later", latest, per_frame, tokens);
        let earlier = e.slice1("frames_earlier", latest, 0, tokens - per_frame);
        let motion_diff = e.op("Sub", "motion_diff", &[&later, &earlier]);
        let motion = e.mean_abs("motion_change", &motion_diff, 3);
        let later_size = e.mean_abs("later_mean", &later, 3);
        let earlier_size = e.mean_abs("earlier_mean", &earlier, 3);
        let sizes = e.op("Add", "motion_sizes", &[&later_size, &earlier_size]);
        let m_raw = e.op("Div", "motion", &[&motion, &sizes]);
        let norm = e.f32("moreg_norm", norm as f32);
        let scaled = e.op("Div", "motion_scaled", &[&m_raw, &norm]);
        let power = e.f32("moreg_power", power as f32);
        let powered = e.op("Pow", "motion_powered", &[&scaled, &power]);
        let (lo, hi) = (e.i64("moreg_from", lo as i64), e.i64("moreg_to", hi as i64));
        let from = e.op("GreaterOrEqual", "moreg_after", &[&n, &lo]);
        let to = e.op("LessOrEqual", "moreg_before", &[&n, &hi]);
        let window = e.op("And", "moreg_window", &[&from, &to]);
        let unit = e.f32("unit", 1.0);
        let m = e.op("Where", "moreg", &[&window, &powered, &unit]);
        let prev = e.op(
            "Where",
            "prev_moreg",
            &[&seen, &state_in(PREV_MOREG), &unit],
        );
        let step_change = e.op("Sub", "moreg_change", &[&m, &prev]);
        let mul = e.f32("mograd_mul", mul as f32);
        let scaled_change = e.op("Mul", "mograd_scaled", &[&mul, &step_change]);
        let grad = e.op("Div", "mograd", &[&scaled_change, &rate_f]);
        let grad_abs = e.op("Abs", "mograd_abs", &[&grad]);
        let factor = e.op("Add", "moreg_factor", &[&m, &grad_abs]);
        distance = e.op("Mul", "distance_moreg", &[&distance, &factor]);
        e.named(
            "Where",
            &[&measures, &m, &state_in(PREV_MOREG)],
            &state_out(PREV_MOREG),
        );
        e.named("Or", &[&seen, &measures], &state_out(MOREG_SEEN));
    } else {
        e.named("Identity", &[&state_in(PREV_MOREG)], &state_out(PREV_MOREG));
        e.named("Identity", &[&seen], &state_out(MOREG_SEEN));
    }
    // The codebook, from its last entry back: the first key with d < key wins.
    let (head, tail) = rule.codebook.split_at(rule.codebook.len() - 1);
    let mut new_rate = e.i64("rate_last", tail[0].1 as i64);
    for (i, &(key, steps)) in head.iter().enumerate().rev() {
        let key = e.f32(&format!("codebook_key_{i}"), key as f32);
        let below = e.op("Less", &format!("codebook_below_{i}"), &[&distance, &key]);
        let value = e.i64(&format!("codebook_rate_{i}"), steps as i64);
        new_rate = e.op(
            "Where",
            &format!("codebook_pick_{i}"),
            &[&below, &value, &new_rate],
        );
    }
    e.named(
        "Where",
        &[&measures, &new_rate, &state_in(RATE)],
        &state_out(RATE),
    );
    e.named("Where", &[DECISION, &n, &last], &state_out(LAST));
    e.named(
        "Where",
        &[DECISION, latest, &reference],
        &state_out(REFERENCE),
    );
    let nan = e.f32("nan", f32::NAN);
    e.named("Where", &[&measures, &distance, &nan], METRIC);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn codebooks_and_the_rate_rule() {
        // Strict <, in order; at or above the last-but-one key: the last value (as the reference,
        // which never compares the last key).
        assert_eq!(rate_for(CODEBOOK_100, 0.0299), 12);
        assert_eq!(rate_for(CODEBOOK_100, 0.03), 10);
        assert_eq!(rate_for(CODEBOOK_100, 0.109), 4);
        assert_eq!(rate_for(CODEBOOK_100, 0.11), 3);
        assert_eq!(rate_for(CODEBOOK_100, 5.0), 3);
        assert_eq!(rate_for(CODEBOOK_100, f64::NAN), 3);
        assert_eq!(rate_for(CODEBOOK_30_SLOW, 0.1), 2);
        let o = AdaCacheOptions::default();
        assert_eq!(o.codebook_for(100).unwrap(), CODEBOOK_100);
        assert_eq!(o.codebook_for(50).unwrap(), CODEBOOK_30_FAST);
        assert_eq!(o.moreg_window(100), [10, 90]);
        assert_eq!(o.moreg_window(30), [4, 26]);
        assert_eq!(o.moreg_window(50), [5, 45]);
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let err = |text: &str| {
            format!(
                "{:#}",
                AdaCacheOptions::from_table(&table(text)).unwrap_err()
            )
        };
        assert!(err("codebook = \"fast\"").contains("not a preset"));
        assert!(err("codebook = [[0.1, 2]]").contains("at least two"));
        assert!(err("codebook = [[0.2, 2], [0.1, 1]]").contains("increase strictly"));
        assert!(err("codebook = [[0.1, 0], [0.2, 1]]").contains("at least 1"));
        assert!(err("residual = \"t-attn\"").contains("invalid ada-cache options"));
        assert!(err("moreg_norm = 0.0").contains("moreg_norm"));
        assert!(err("moreg_steps = [20, 10]").contains("inverted"));
        assert!(err("cache_loc = [13]").contains("unknown field"));
        let o = AdaCacheOptions::from_table(&table(
            "codebook = [[0.1, 4], [0.2, 2], [1.0, 1]]\nresidual = \"cross-mlp\"",
        ))
        .unwrap();
        assert_eq!(o.codebook_for(50).unwrap(), [(0.1, 4), (0.2, 2), (1.0, 1)]);
        assert_eq!(o.residual, Residual::CrossMlp);
    }
}
