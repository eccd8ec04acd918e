//! `easy-cache`: EasyCache (github H-EmbodVis/EasyCache, `EasyCache4Wan2.1/easycache_generate.py::
//! easycache_forward`; research spec §10), decided inside the graph at every call. No calibration:
//! the rule estimates the output's change from the input's change, scaled by the *transformation
//! rate* `k` measured between the last two computed calls.
//!
//! With `x` the latent input, `out` the model's prediction and `‖v‖ = mean(|v|)` over every element
//! (0-D f32), one call of branch `b` (its own state, zeros before its first call) does:
//!
//! ```text
//! forced  = step < warmup_steps or step >= steps - last_steps
//! acc     = E + k * (‖x - prev_in‖ / ‖prev_out‖)      (metric, output `ditc.metric`)
//! compute = forced or calls < 2 or not (acc < threshold)      (own rule; strict <, NaN computes)
//!         (default under CFG: the unconditional call takes the conditional call's decision instead)
//! E       = 0 if compute else acc
//! prev_in = x                                                   (every call)
//! If(compute): the block stack runs; its residual is cached     else: stack input + cached residual
//! on compute: if calls >= 1: k = ‖out - prev_out‖ / ‖x - computed_in‖
//!             prev_out = out; computed_in = x; calls += 1
//! ```
//!
//! `calls` counts the branch's computed calls: the reference's `k is None` is `calls < 2` (k is first
//! set at the second computed call, where a previous output and a previous computed input exist).
//! The reference leaves `E` alone when `k` is None instead of resetting it; `E` is 0 then anyway (it
//! only grows on skipped calls, which need `k`), so `E = 0 if compute` is the same rule.
//! `computed_in` is the reference's `prev_prev_raw_input_even`: at a computed call it is set to the
//! call's own input (its `previous_raw_input_even` was just set to `x`), so the next computed call's
//! `k` compares the inputs of the two computed calls.
//!
//! Classifier-free guidance. The reference makes its decision on the conditional call (even `cnt`)
//! and the unconditional call follows it; each branch has its own cached residual, and `k`, `E` and
//! the input history are the conditional branch's. ditc's runtime calls cond, then uncond, at every
//! step ([`crate::runtime::sampling`]); the default (`per_branch = false`) bakes the graph with two
//! more inputs: `ditc.branch` (int64, 0 cond / 1 uncond) and `ditc.cond_decision` (bool), which the
//! runtime feeds, on the unconditional call, with the conditional call's `ditc.decision` of the same
//! step (the manifest's `schedule.adaptive.follow`; ignored on the conditional call). The uncond
//! call's own metric is then not used (traced as null). `per_branch = true` lets each branch decide
//! on its own state (no extra inputs).
//!
//! `forecast = "taylor"` (order 1 or 2): on a skipped call the stack's residual is forecast from the
//! last `order + 1` computed ones, as [`crate::schedule::forecast`] does for the table policies; the
//! weights are computed in the graph from the steps of those calls ([`forecast::emit_weights`], state
//! `update_step`, `.1`, `.2`), since the steps are known only at run time.
//!
//! Deliberate differences from the reference: (1) the cached value is the whole block stack's residual
//! (`last block's output - first block's input`, [`crate::analysis::stack`]) where the reference
//! caches `prediction - latent` and skips the whole model: here the embeddings and the output layer
//! still run on a skipped call, so the head is modulated with the current timestep (the rule's inputs,
//! latent and prediction, are the reference's). (2) The norms are f32 means over the graph's f32
//! tensors (the reference's are in the model's output dtype). (3) `warmup_steps` and `last_steps` are
//! options (the reference hard-codes 10 steps, `cnt < 20`, and the last step, `cnt >= 2S - 2`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::analysis::stack::find_stack;
use crate::ir::{infer_types, sort_topologically, DataType, Model, TypeMap, ValueInfo};
use crate::manifest::{InGraphDecisions, Schedule};
use crate::passes::broadcast_adaptive::{bake_stack, BRANCH_INPUT};
use crate::passes::{condition_name, PassContext, STEP_INPUT};
use crate::schedule::emitter::{declare_states, zero_state_bindings, Emitter};
use crate::schedule::first_block_cache::{DECISION, METRIC};
use crate::schedule::forecast::{self, Taylor};
use crate::schedule::Group;

/// The policy name in the manifest and in `broadcast-adaptive`'s `policy` option.
pub const POLICY: &str = "easy-cache";
/// Graph input (bool scalar) of a graph whose unconditional call follows the conditional one: the
/// conditional call's `ditc.decision` at the same step.
pub const COND_DECISION: &str = "ditc.cond_decision";

/// Options of the `easy-cache` policy; the defaults are EasyCache4Wan2.1's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EasyCacheOptions {
    /// Reuse while the accumulated estimated change stays below this (the reference's `--thresh`).
    pub threshold: f64,
    /// Steps below this always compute (the reference: `ret_steps = 10 * 2` calls, 10 steps).
    pub warmup_steps: usize,
    /// The last this many steps always compute (the reference: the last step).
    pub last_steps: usize,
    /// Each guidance branch decides on its own state (the reference: the unconditional call follows
    /// the conditional call's decision).
    pub per_branch: bool,
}

impl Default for EasyCacheOptions {
    fn default() -> Self {
        EasyCacheOptions {
            threshold: 0.05,
            warmup_steps: 10,
            last_steps: 1,
            per_branch: false,
        }
    }
}

impl EasyCacheOptions {
    pub fn from_table(options: &toml::Table) -> Result<EasyCacheOptions> {
        let o: EasyCacheOptions = options.clone().try_into().context(
            "invalid easy-cache options (valid keys: threshold, warmup_steps, last_steps, per_branch)",
        )?;
        if !o.threshold.is_finite() || o.threshold < 0.0 {
            bail!(
                "easy-cache threshold must be a finite number >= 0 (got {})",
                o.threshold
            );
        }
        Ok(o)
    }

    /// Checks against the sampler's number of steps: some step must be free to skip.
    pub fn check_steps(&self, steps: usize) -> Result<()> {
        if self.warmup_steps + self.last_steps >= steps {
            bail!(
                "easy-cache warmup_steps ({}) + last_steps ({}) must be below the sampler's {steps} steps, or every step computes",
                self.warmup_steps,
                self.last_steps
            );
        }
        Ok(())
    }
}

/// The rule on one branch's measured scalars, in f64 (the graph computes the same in f32): what a
/// test or a person drives through a recorded sequence. Feed each call to [`Rule::decide`], then, if
/// it computed, its output change to [`Rule::computed`].
#[derive(Clone, Debug, Default)]
pub struct Rule {
    pub options: EasyCacheOptions,
    pub steps: usize,
    /// `E`, `k`, computed calls so far.
    pub accumulated: f64,
    pub k: f64,
    pub calls: usize,
}

impl Rule {
    pub fn new(options: EasyCacheOptions, steps: usize) -> Rule {
        Rule {
            options,
            steps,
            ..Default::default()
        }
    }

    /// Decide call `step` from `input_change = ‖x - prev_in‖` and `output_norm = ‖prev_out‖`; returns
    /// whether it computes and the accumulated value compared (none where the rule does not apply).
    pub fn decide(
        &mut self,
        step: usize,
        input_change: f64,
        output_norm: f64,
    ) -> (bool, Option<f64>) {
        let o = &self.options;
        let forced = step < o.warmup_steps || step + o.last_steps >= self.steps;
        if forced || self.calls < 2 {
            self.accumulated = 0.0;
            return (true, None);
        }
        let acc = self.accumulated + self.k * (input_change / output_norm);
        let skip = acc < o.threshold;
        self.accumulated = if skip { acc } else { 0.0 };
        (!skip, Some(acc))
    }

    /// A computed call's `output_change = ‖out - prev_out‖` and `input_change = ‖x - computed_in‖`.
    pub fn computed(&mut self, output_change: f64, input_change: f64) {
        if self.calls >= 1 {
            self.k = output_change / input_change;
        }
        self.calls += 1;
    }
}

/// Names of the state values (`ditc.state.easy.<v>` in, `ditc.state_out.easy.<v>` out).
const PREV_INPUT: &str = "prev_input";
const COMPUTED_INPUT: &str = "computed_input";
const PREV_OUTPUT: &str = "prev_output";
const RATE: &str = "k";
const ACCUMULATED: &str = "accumulated";
const CALLS: &str = "computed_calls";

fn state_in(v: &str) -> String {
    format!("ditc.state.easy.{v}")
}

fn state_out(v: &str) -> String {
    format!("ditc.state_out.easy.{v}")
}

/// A static f32 shape of `value`, or why not.
fn f32_shape(types: &TypeMap, value: &str, what: &str) -> Result<Vec<i64>> {
    let info = types.get(value).cloned().unwrap_or_default();
    match (info.dtype, info.shape) {
        (Some(DataType::F32), Some(shape)) => Ok(shape),
        (dtype, shape) => bail!(
            "easy-cache needs the {what} '{value}' as a float32 tensor of static shape (got {dtype:?} {shape:?})"
        ),
    }
}

/// Rewrite `model` so that each call decides in the graph whether the block stack runs (module doc).
pub fn bake(
    model: &mut Model,
    cx: &mut PassContext,
    o: &EasyCacheOptions,
    forecast: Option<Taylor>,
) -> Result<()> {
    let steps = cx.sampler.as_ref().expect("checked").1.steps();
    o.check_steps(steps)?;
    if o.per_branch && cx.guidance.is_none() {
        bail!("easy-cache per_branch needs classifier-free guidance ([sampler.guidance]): without it there is one branch");
    }
    let follow = cx.guidance.is_some() && !o.per_branch;
    let io = crate::manifest::detect_io(model)?;
    let mut graph = model.graph.clone();
    sort_topologically(&mut graph)?;
    // Constants stay constants in every part of a graph split at the If (Latte's export).
    crate::schedule::emitter::constants_to_initializers(&mut graph);
    let opset = model.default_opset();
    let types = infer_types(&graph, opset);
    let latent_shape = f32_shape(&types, &io.latent, "latent input")?;
    let prediction_shape = f32_shape(&types, &io.prediction, "prediction")?;
    let stack = find_stack(&graph, &cx.dit_map, &types)?;
    let sites: Vec<usize> = stack
        .blocks
        .iter()
        .flat_map(|b| cx.dit_map.blocks[b.block].attention.iter().copied())
        .collect();
    let anchors: Vec<String> = sites
        .iter()
        .map(|&id| cx.dit_map.attention[id].anchor.clone())
        .collect();
    let mut bindings = bake_stack(&mut graph, &stack, &anchors, &types, forecast)?;

    let f32_state = |shape: &[i64]| (DataType::F32, shape.to_vec());
    let mut states = vec![
        (PREV_INPUT, f32_state(&latent_shape)),
        (COMPUTED_INPUT, f32_state(&latent_shape)),
        (PREV_OUTPUT, f32_state(&prediction_shape)),
        (RATE, f32_state(&[])),
        (ACCUMULATED, f32_state(&[])),
        (CALLS, (DataType::I64, Vec::new())),
    ];
    if let Some(t) = forecast {
        // The steps of the last order + 1 computed calls (newest first), for the forecast's weights.
        states.extend(forecast::update_step_states(t.order));
    }
    declare_states(&mut graph, &states, state_in, state_out);
    if follow {
        graph
            .inputs
            .push(ValueInfo::tensor(BRANCH_INPUT, DataType::I64, vec![]));
        graph
            .inputs
            .push(ValueInfo::tensor(COND_DECISION, DataType::Bool, vec![]));
    }
    let mut e = Emitter::new("easy", opset);
    let ranks = (latent_shape.len(), prediction_shape.len());
    decide(&mut e, o, steps, &io.latent, ranks, follow);
    update(
        &mut e,
        &io.latent,
        &io.prediction,
        latent_shape.len(),
        prediction_shape.len(),
    );
    if let Some(t) = forecast {
        forecast::emit_weights(&mut e, t.order, &state_in(CALLS), state_in, state_out);
    }
    e.finish(&mut graph)?;
    model.graph = graph;

    for b in &mut bindings {
        b.group = Group::Blocks;
    }
    bindings.extend(zero_state_bindings(&states, state_in, state_out));
    cx.state.extend(bindings);
    cx.step_input = Some(STEP_INPUT.to_string());
    if follow {
        cx.branch_input = Some(BRANCH_INPUT.to_string());
    }
    let blocks: Vec<usize> = stack.blocks.iter().map(|b| b.block).collect();
    cx.schedule = Some(Schedule {
        policy: POLICY.into(),
        options: {
            let mut v = serde_json::to_value(o)?;
            v["policy"] = POLICY.into();
            if let Some(t) = forecast {
                v["forecast"] = "taylor".into();
                v["order"] = t.order.into();
            }
            v
        },
        tables: Default::default(),
        uncond_tables: None,
        metrics: None,
        sites: Default::default(),
        blocks: blocks.clone(),
        calls: Default::default(),
        block_tables: Vec::new(),
        adaptive: Some(InGraphDecisions {
            decision: DECISION.into(),
            metric: METRIC.into(),
            head_blocks: Vec::new(),
            cached_blocks: blocks,
            tail_blocks: Vec::new(),
            sites,
            follow: follow.then(|| COND_DECISION.to_string()),
        }),
    });
    Ok(())
}

/// The decision (`ditc.decision`, also the stack `If`'s condition), the metric and the accumulated
/// value's state output: everything that needs only the inputs and the state.
fn decide(
    e: &mut Emitter,
    o: &EasyCacheOptions,
    steps: usize,
    latent: &str,
    ranks: (usize, usize),
    follow: bool,
) {
    let input_change = e.mean_abs_diff("input_change", latent, &state_in(PREV_INPUT), ranks.0);
    let output_norm = e.mean_abs("output_norm", &state_in(PREV_OUTPUT), ranks.1);
    let ratio = e.op(
        "Div",
        "relative_input_change",
        &[&input_change, &output_norm],
    );
    let estimate = e.op("Mul", "estimated_change", &[&state_in(RATE), &ratio]);
    let acc = e.op("Add", "accumulated", &[&state_in(ACCUMULATED), &estimate]);
    // torch compares the 0-D f32 tensor with the Python float in f32.
    let threshold = e.f32("threshold", o.threshold as f32);
    let below = e.op("Less", "below_threshold", &[&acc, &threshold]);
    let warmup = e.i64("warmup_steps", o.warmup_steps as i64);
    let cutoff = e.i64("cutoff", (steps - o.last_steps) as i64);
    let early = e.op("Less", "in_warmup", &[STEP_INPUT, &warmup]);
    let late = e.op("GreaterOrEqual", "in_last_steps", &[STEP_INPUT, &cutoff]);
    let forced = e.op("Or", "forced", &[&early, &late]);
    let two = e.i64("two", 2);
    let has_rate = e.op("GreaterOrEqual", "has_rate", &[&state_in(CALLS), &two]);
    let not_forced = e.op("Not", "not_forced", &[&forced]);
    let applies = e.op("And", "rule_applies", &[&has_rate, &not_forced]);
    let skip = e.op("And", "skip", &[&applies, &below]);
    let own = e.op("Not", "own_decision", &[&skip]);
    let nan = e.f32("nan", f32::NAN);
    let own_metric = e.op("Where", "own_metric", &[&applies, &acc, &nan]);
    if follow {
        let one = e.i64("one", 1);
        let uncond = e.op("Equal", "is_uncond", &[BRANCH_INPUT, &one]);
        e.named("Where", &[&uncond, COND_DECISION, &own], DECISION);
        e.named("Where", &[&uncond, &nan, &own_metric], METRIC);
    } else {
        e.named("Identity", &[&own], DECISION);
        e.named("Identity", &[&own_metric], METRIC);
    }
    e.named("Identity", &[DECISION], &condition_name(Group::Stack));
    let zero = e.f32("zero", 0.0);
    e.named("Where", &[&own, &zero, &acc], &state_out(ACCUMULATED));
    e.named("Identity", &[latent], &state_out(PREV_INPUT));
}

/// The state updated from the call's prediction (after the stack's `If`): `k`, the last computed
/// output and input, the computed-call count.
fn update(
    e: &mut Emitter,
    latent: &str,
    prediction: &str,
    latent_rank: usize,
    prediction_rank: usize,
) {
    let output_change = e.mean_abs_diff(
        "output_change",
        prediction,
        &state_in(PREV_OUTPUT),
        prediction_rank,
    );
    let input_change = e.mean_abs_diff(
        "computed_input_change",
        latent,
        &state_in(COMPUTED_INPUT),
        latent_rank,
    );
    let rate = e.op("Div", "rate", &[&output_change, &input_change]);
    let one = e.i64("calls_one", 1);
    let has_previous = e.op("GreaterOrEqual", "has_previous", &[&state_in(CALLS), &one]);
    let measure = e.op("And", "measure_rate", &[DECISION, &has_previous]);
    e.named(
        "Where",
        &[&measure, &rate, &state_in(RATE)],
        &state_out(RATE),
    );
    e.named(
        "Where",
        &[DECISION, latent, &state_in(COMPUTED_INPUT)],
        &state_out(COMPUTED_INPUT),
    );
    e.named(
        "Where",
        &[DECISION, prediction, &state_in(PREV_OUTPUT)],
        &state_out(PREV_OUTPUT),
    );
    let plus_one = e.op("Add", "calls_plus_one", &[&state_in(CALLS), &one]);
    e.named(
        "Where",
        &[DECISION, &plus_one, &state_in(CALLS)],
        &state_out(CALLS),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn defaults_are_easycache4wan21() {
        let o = EasyCacheOptions::from_table(&table("")).unwrap();
        assert_eq!(o, EasyCacheOptions::default());
        assert_eq!((o.threshold, o.warmup_steps, o.last_steps), (0.05, 10, 1));
        assert!(!o.per_branch);
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let err = |text: &str| {
            format!(
                "{:#}",
                EasyCacheOptions::from_table(&table(text)).unwrap_err()
            )
        };
        for bad in ["threshold = nan", "threshold = -0.1", "threshold = inf"] {
            assert!(
                err(bad).contains("finite number >= 0"),
                "{bad}: {}",
                err(bad)
            );
        }
        assert!(err("thresh = 0.1").contains("unknown field"));
        assert!(err("warmup_steps = -1").contains("invalid easy-cache options"));
        let o = EasyCacheOptions::default();
        let e = o.check_steps(11).unwrap_err().to_string();
        assert!(e.contains("below the sampler's 11 steps"), "{e}");
        o.check_steps(12).unwrap();
    }
}
