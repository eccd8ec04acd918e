//! `first-block-cache`: diffusers' FirstBlockCache, generalised as cache-dit's DBCache, decided inside
//! the graph (research spec §1 and §11).
//!
//! The transformer blocks `0..N` of the DiT map are split into a head `[0, compute_first)` that always
//! runs, cached middle blocks `[compute_first, N - compute_last)`, and a tail `[N - compute_last, N)`
//! that always runs. With `S[k]` the residual stream entering block k (found from structure by
//! [`crate::analysis::stack`]), one call of the baked graph does:
//!
//! ```text
//! r      = S[compute_first] - S[0]                          (the head's residual)
//! metric = ReduceMean(|r - r_ref|) / ReduceMean(|r_ref|)    (f32 reductions; 0-D output `ditc.metric`)
//! compute = step < max(1, warmup_steps)                     (1: no reference yet; 2: warm-up)
//!        or cached_calls >= max_cached_steps                (3: budget of cached calls spent)
//!        or continuous >= max_continuous_cached_steps       (4: too many cached calls in a run)
//!        or metric > threshold                              (5: diffusers' rule; skip on <=, and on NaN)
//! If(compute):  M = middle blocks(S[compute_first]);  tail_residual = M - S[compute_first];  r_ref = r
//! else:         M = S[compute_first] + tail_residual;  tail_residual, r_ref unchanged
//! S[N - compute_last] = M, then the tail blocks and the rest of the model as before.
//! ```
//!
//! With `forecast = "taylor"` (order 1 or 2; [`crate::schedule::forecast`]) a skipped call adds the
//! forecast of the last `order + 1` computed tail residuals (states `tail_residual`, `.1`, `.2`) with
//! weights computed in the graph from the steps of those calls (states `computed_calls`,
//! `update_step`, ...) instead of the newest one alone; the decision is unchanged (the head always runs).
//!
//! `compute` is the 0-D bool output `ditc.decision`. `step` is the `ditc.step` input (the sampler's step
//! index, the same for both calls of a CFG step, as cache-dit's `executed_steps`). Every value carried
//! between calls is a state binding `ditc.state.fbc.<v>` / `ditc.state_out.fbc.<v>`, one set per CFG
//! branch (spec §0: diffusers keeps state per cache context), all zeros before the first call:
//! `head_residual` (r_ref), `tail_residual`, and, only when their limits are set, the int64 scalars
//! `cached_calls` (cached calls so far), `continuous` and `last_cached` (below).
//!
//! Rules, in the order of cache-dit's `can_cache` (first match wins; spec §11.3) where diffusers is
//! silent, diffusers' otherwise:
//! 1. A branch's first call (step 0) computes: there is no reference yet. `r_ref` is replaced only on
//!    computed calls, so the metric compares with the branch's last *computed* call (diffusers and
//!    cache-dit alike). The metric of the first call divides by zero and means nothing.
//! 2. `warmup_steps` (default 0, cache-dit's `max_warmup_steps` with interval 1): steps below it compute.
//! 3. `max_cached_steps` (default none): once the branch has skipped that many calls in this run, every
//!    later call computes (cache-dit's `len(cached_steps) >= max_cached_steps`).
//! 4. `max_continuous_cached_steps` (default none), cache-dit's counter exactly: `continuous` grows on a
//!    cached call by 1 for the run's first cached call, by 2 when the previous call was cached and the
//!    counter is 0, by 1 when the previous call was cached, and not at all when it was not; it is reset
//!    to 0 only when this rule forces a compute (`continuous >= max`, reached after rules 1-3 let the
//!    call through). A compute caused by the metric does not reset it, as in cache-dit.
//!    `last_cached` holds 1 + the step of the branch's last cached call (0: none yet).
//! 5. Otherwise the call computes iff `metric > threshold` (diffusers). cache-dit's `diff < threshold`
//!    caches, which differs at equality and in three cases where diffusers' rule is kept: a NaN metric
//!    (cache-dit computes, ditc skips), `threshold <= 0` (cache-dit always computes; ditc skips a
//!    metric of exactly 0) and `threshold >= 1` (cache-dit always caches). diffusers compares the f32 metric, as a Python float, with
//!    the f64 threshold; the graph compares with the largest f32 not above the threshold, which decides
//!    every f32 metric exactly as that f64 comparison does. A NaN metric skips, as in diffusers.
//!
//! The then-branch of the `If` holds the middle blocks and every node that serves only them (TensorRT
//! runs only the taken branch); the else-branch is one `Add` and two `Identity`s. On a skipped call the
//! head and tail blocks and the model's embedding and output layers still run.
//!
//! Refused: a threshold that is NaN, infinite or negative; `compute_first` 0 (the metric needs a head);
//! `compute_first + compute_last` not below the number of blocks (nothing left to cache); a model with
//! no detectable blocks, or whose blocks do not form one residual stream (`Add` nodes from each
//! block's input to its output); symbolic input shapes; a second schedule pass.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::analysis::stack::find_stack;
use crate::analysis::DitMap;
use crate::ir::{
    infer_types, sort_topologically, AttrValue, DataType, Dim, Graph, Model, Node, Tensor, TypeMap,
    ValueInfo,
};
use crate::manifest::{InGraphDecisions, Schedule};
use crate::passes::broadcast_adaptive::forecast_nodes;
use crate::passes::region::exclusive_region;
use crate::passes::{PassContext, STEP_INPUT};
use crate::schedule::emitter::{self, Emitter};
use crate::schedule::forecast::{self, Taylor};

/// The policy name in the manifest and in `broadcast-adaptive`'s `policy` option.
pub const POLICY: &str = "first-block-cache";
/// Graph output: this call's decision (0-D bool, true = the cached blocks computed).
pub const DECISION: &str = "ditc.decision";
/// Graph output: the metric the decision compared with the threshold (0-D f32).
pub const METRIC: &str = "ditc.metric";

/// Options of the `first-block-cache` policy; the defaults are diffusers' FirstBlockCache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FbcOptions {
    /// Compute the cached blocks iff the head residual's relative change exceeds this (diffusers 0.05).
    pub threshold: f64,
    /// Blocks that always run and feed the metric (cache-dit's `Fn_compute_blocks`; diffusers: 1).
    pub compute_first: usize,
    /// Trailing blocks that always run (cache-dit's `Bn_compute_blocks`; diffusers: 0).
    pub compute_last: usize,
    /// Steps below this always compute (cache-dit's `max_warmup_steps`; diffusers: 0).
    pub warmup_steps: usize,
    /// At most this many cached calls per branch and run (none: no limit).
    pub max_cached_steps: Option<usize>,
    /// Limit on cached calls in a row, with cache-dit's counter (none: no limit).
    pub max_continuous_cached_steps: Option<usize>,
}

impl Default for FbcOptions {
    fn default() -> Self {
        FbcOptions {
            threshold: 0.05,
            compute_first: 1,
            compute_last: 0,
            warmup_steps: 0,
            max_cached_steps: None,
            max_continuous_cached_steps: None,
        }
    }
}

impl FbcOptions {
    pub fn from_table(options: &toml::Table) -> Result<FbcOptions> {
        let options: FbcOptions = options.clone().try_into().context(
            "invalid first-block-cache options (valid keys: threshold, compute_first, compute_last, warmup_steps, max_cached_steps, max_continuous_cached_steps)",
        )?;
        options.validate()?;
        Ok(options)
    }

    /// Checks that need no model.
    pub fn validate(&self) -> Result<()> {
        if !self.threshold.is_finite() || self.threshold < 0.0 {
            bail!(
                "first-block-cache threshold must be a finite number >= 0 (got {})",
                self.threshold
            );
        }
        if self.compute_first < 1 {
            bail!("first-block-cache compute_first must be at least 1: the metric is the residual of the blocks that always run first");
        }
        Ok(())
    }

    /// Checks against the model's number of blocks.
    pub fn check_blocks(&self, blocks: usize) -> Result<()> {
        if self.compute_first + self.compute_last >= blocks {
            bail!(
                "first-block-cache compute_first ({}) + compute_last ({}) must be below the model's {blocks} blocks, or no block is left to cache",
                self.compute_first,
                self.compute_last
            );
        }
        Ok(())
    }
}

/// The residual stream at every block boundary of the DiT map: entry `k` is the value entering block
/// `k`, entry `N` the stack's output (N + 1 values for N blocks; on Wan entry `k + 1` is block `k`'s
/// output, on Latte a temporal block's input is the spatial block's output in another layout), from
/// [`crate::analysis::stack::find_stack`].
pub fn residual_stream(graph: &Graph, map: &DitMap, types: &TypeMap) -> Result<Vec<String>> {
    let stack = find_stack(graph, map, types)?;
    Ok(stack
        .blocks
        .iter()
        .map(|b| b.input.clone())
        .chain(std::iter::once(stack.output().to_string()))
        .collect())
}

/// Names of the state values (`ditc.state.fbc.<v>` in, `ditc.state_out.fbc.<v>` out).
const HEAD_RESIDUAL: &str = "head_residual";
const TAIL_RESIDUAL: &str = "tail_residual";
const CACHED_CALLS: &str = "cached_calls";
const CONTINUOUS: &str = "continuous";
const LAST_CACHED: &str = "last_cached";
/// With a forecast: the tail residuals of the previous and the one before computed calls.
const OLDER_TAIL_RESIDUALS: [&str; 2] = ["tail_residual.1", "tail_residual.2"];

fn state_in(v: &str) -> String {
    format!("ditc.state.fbc.{v}")
}

fn state_out(v: &str) -> String {
    format!("ditc.state_out.fbc.{v}")
}

/// The largest f32 not above `x` (x >= 0): `f > x` for an f32 `f` iff `f > below(x)`.
fn f32_at_or_below(x: f64) -> f32 {
    let f = x as f32;
    if f as f64 > x {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    }
}

/// Rewrite `model` so that each call decides in the graph whether the cached blocks run (module doc).
/// `broadcast-adaptive` has checked what every schedule pass needs ([`PassContext::schedule_sampler`]).
pub fn bake(
    model: &mut Model,
    cx: &mut PassContext,
    options: &FbcOptions,
    forecast: Option<Taylor>,
) -> Result<()> {
    options.validate()?;
    let blocks = cx.dit_map.blocks.len();
    if blocks == 0 {
        bail!("no transformer blocks were found in the graph (runs of attention sites closed by a feed-forward network), so there is nothing to cache");
    }
    options.check_blocks(blocks)?;
    // Rewrite a copy (initializers share their bytes): a refusal leaves the model as it was.
    let mut rewritten = model.graph.clone();
    sort_topologically(&mut rewritten)?;
    // Constants stay constants in every part of a graph split at the If (Latte's export).
    emitter::constants_to_initializers(&mut rewritten);
    let opset = model.default_opset();
    let types = infer_types(&rewritten, opset);
    let stream = residual_stream(&rewritten, &cx.dit_map, &types)?;
    let (first, cached_end) = (options.compute_first, blocks - options.compute_last);
    let (head_in, head_out, middle_out) = (&stream[0], &stream[first], &stream[cached_end]);
    let info = types.get(head_out).cloned().unwrap_or_default();
    let (Some(dtype), Some(shape)) = (info.dtype, info.shape) else {
        bail!("the type of the residual stream '{head_out}' is unknown");
    };
    if !dtype.is_float() {
        bail!("the residual stream '{head_out}' is {dtype}, not a float tensor");
    }
    let same = |v: &str| {
        types
            .get(v)
            .is_some_and(|t| t.dtype == Some(dtype) && t.shape.as_ref() == Some(&shape))
    };
    if !same(head_in) || !same(middle_out) {
        bail!("the residual stream changes type or shape between '{head_in}', '{head_out}' and '{middle_out}' (blocks in another layout, as Latte's temporal blocks: choose compute_first and compute_last so that the head and the tail end in the input's layout, e.g. compute_first = 2 on Latte)");
    }
    if forecast.is_some() && dtype != DataType::F32 {
        bail!("first-block-cache forecast = \"taylor\" needs a float32 residual stream ('{head_out}' is {dtype})");
    }
    let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Value(d)).collect();
    let scalar = |dtype| (dtype, Vec::<i64>::new());
    let mut states = vec![
        (HEAD_RESIDUAL, (dtype, shape.clone())),
        (TAIL_RESIDUAL, (dtype, shape.clone())),
    ];
    if options.max_cached_steps.is_some() {
        states.push((CACHED_CALLS, scalar(DataType::I64)));
    }
    if options.max_continuous_cached_steps.is_some() {
        states.push((CONTINUOUS, scalar(DataType::I64)));
        states.push((LAST_CACHED, scalar(DataType::I64)));
    }
    let older = forecast.map_or(0, |t| t.order);
    if let Some(t) = forecast {
        // The older computed tail residuals (newest first after `tail_residual`), the count of
        // computed calls and their steps, for the forecast's weights.
        for name in &OLDER_TAIL_RESIDUALS[..older] {
            states.push((*name, (dtype, shape.clone())));
        }
        states.push((forecast::COMPUTED_CALLS, scalar(DataType::I64)));
        states.extend(forecast::update_step_states(t.order));
    }

    let graph = &mut rewritten;
    if !graph.inputs.iter().any(|i| i.name == STEP_INPUT) {
        graph
            .inputs
            .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
    }
    for (v, (dtype, shape)) in &states {
        let dims = shape.iter().map(|&d| Dim::Value(d)).collect();
        graph
            .inputs
            .push(ValueInfo::tensor(&state_in(v), *dtype, dims));
    }
    let residual = decide(graph, options, head_in, head_out, shape.len(), dtype, opset);
    let mut reuse_nodes = Vec::new();
    let estimate = match forecast {
        None => state_in(TAIL_RESIDUAL),
        Some(t) => {
            let mut e = Emitter::new("fbc", opset);
            let calls = state_in(forecast::COMPUTED_CALLS);
            forecast::emit_weights(&mut e, t.order, &calls, state_in, state_out);
            forecast::emit_call_count(&mut e, &calls, &state_out(forecast::COMPUTED_CALLS));
            graph.nodes.extend(e.nodes);
            graph.initializers.extend(e.constants);
            forecast_nodes(graph, &mut reuse_nodes, older, &|j| state_in(tail_state(j)))
        }
    };

    let region = exclusive_region(graph, middle_out, &HashSet::new())
        .with_context(|| format!("cannot isolate the nodes computing '{middle_out}'"))?;
    check_region(graph, &region, &cx.dit_map, first..cached_end)?;
    let reuse = Reuse {
        nodes: reuse_nodes,
        estimate,
        older,
    };
    let if_node = cached_blocks_if(
        graph, &region, middle_out, head_out, &residual, dtype, &dims, reuse,
    );
    let in_region: HashSet<usize> = region.iter().copied().collect();
    let kept: Vec<Node> = std::mem::take(&mut graph.nodes)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !in_region.contains(i))
        .map(|(_, n)| n)
        .collect();
    graph.nodes = kept;
    graph.nodes.push(if_node);
    for (v, (dtype, shape)) in &states {
        let dims = shape.iter().map(|&d| Dim::Value(d)).collect();
        graph
            .outputs
            .push(ValueInfo::tensor(&state_out(v), *dtype, dims));
    }
    graph
        .outputs
        .push(ValueInfo::tensor(METRIC, DataType::F32, vec![]));
    graph
        .outputs
        .push(ValueInfo::tensor(DECISION, DataType::Bool, vec![]));
    sort_topologically(graph)?;
    crate::ir::check_graph(graph).context("the baked graph is invalid (a ditc bug)")?;
    model.graph = rewritten;

    cx.step_input = Some(STEP_INPUT.to_string());
    cx.state
        .extend(emitter::zero_state_bindings(&states, state_in, state_out));
    let cached: Vec<usize> = (first..cached_end).collect();
    let sites: Vec<usize> = cx.dit_map.blocks[first..cached_end]
        .iter()
        .flat_map(|b| b.attention.iter().copied())
        .collect();
    cx.schedule = Some(Schedule {
        policy: POLICY.into(),
        options: {
            let mut o = serde_json::to_value(options)?;
            o["policy"] = POLICY.into();
            if let Some(t) = forecast {
                o["forecast"] = "taylor".into();
                o["order"] = t.order.into();
            }
            o
        },
        tables: Default::default(),
        uncond_tables: None,
        metrics: None,
        sites: Default::default(),
        blocks: cached.clone(),
        calls: Default::default(),
        block_tables: Vec::new(),
        adaptive: Some(InGraphDecisions {
            decision: DECISION.into(),
            metric: METRIC.into(),
            head_blocks: (0..first).collect(),
            cached_blocks: cached,
            tail_blocks: (cached_end..blocks).collect(),
            sites,
            follow: None,
        }),
    });
    Ok(())
}

/// Append the metric, the decision (`ditc.decision`) and the counters' state outputs; returns the
/// head residual value.
fn decide(
    graph: &mut Graph,
    options: &FbcOptions,
    head_in: &str,
    head_out: &str,
    rank: usize,
    dtype: DataType,
    opset: i64,
) -> String {
    let mut e = Emitter::new("fbc", opset);
    let r_ref = state_in(HEAD_RESIDUAL);
    let residual = e.op("Sub", "head_residual", &[head_out, head_in]);
    let delta = e.op("Sub", "delta", &[&residual, &r_ref]);
    let delta_abs = e.op("Abs", "delta_abs", &[&delta]);
    let numerator = e.mean_all("delta_mean", &delta_abs, rank);
    let ref_abs = e.op("Abs", "reference_abs", &[&r_ref]);
    let denominator = e.mean_all("reference_mean", &ref_abs, rank);
    if dtype == DataType::F32 {
        e.named("Div", &[&numerator, &denominator], METRIC);
    } else {
        let ratio = e.op("Div", "metric_native", &[&numerator, &denominator]);
        e.nodes.push(
            Node::new(METRIC, "Cast", &[&ratio], &[METRIC])
                .with_attr("to", AttrValue::Int(DataType::F32.onnx_code() as i64)),
        );
    }
    let threshold = "ditc.fbc.threshold";
    e.constants.push(Tensor::from_f32(
        threshold,
        vec![],
        &[f32_at_or_below(options.threshold)],
    ));
    let changed = e.op("Greater", "changed", &[METRIC, threshold]);
    let always_before = e.i64("always_before", options.warmup_steps.max(1) as i64);
    let forced = e.op("Less", "forced", &[STEP_INPUT, &always_before]);
    let mut reasons = vec![forced.clone()];
    // Whether an earlier rule already decided (rule 4 resets its counter only when it decides itself).
    let mut decided = forced;
    if let Some(max) = options.max_cached_steps {
        let max = e.i64("max_cached_steps", max as i64);
        let spent = e.op(
            "GreaterOrEqual",
            "budget_spent",
            &[&state_in(CACHED_CALLS), &max],
        );
        decided = e.op("Or", "forced_or_spent", &[&decided, &spent]);
        reasons.push(spent);
    }
    let mut continuous_rule = None;
    if let Some(max) = options.max_continuous_cached_steps {
        let max = e.i64("max_continuous_cached_steps", max as i64);
        let long = e.op(
            "GreaterOrEqual",
            "run_too_long",
            &[&state_in(CONTINUOUS), &max],
        );
        let not_decided = e.op("Not", "not_decided_before_run_rule", &[&decided]);
        let resets = e.op("And", "run_rule_decides", &[&long, &not_decided]);
        reasons.push(long);
        continuous_rule = Some(resets);
    }
    reasons.push(changed);
    let mut decision = reasons[0].clone();
    for (k, r) in reasons.iter().enumerate().skip(1) {
        let name = if k + 1 == reasons.len() {
            DECISION.to_string()
        } else {
            format!("ditc.fbc.decision_{k}")
        };
        e.named("Or", &[&decision, r], &name);
        decision = name;
    }

    let (zero, one) = (e.i64("zero", 0), e.i64("one", 1));
    if options.max_cached_steps.is_some() {
        let cached = state_in(CACHED_CALLS);
        let plus_one = e.op("Add", "cached_calls_plus_one", &[&cached, &one]);
        e.named(
            "Where",
            &[DECISION, &cached, &plus_one],
            &state_out(CACHED_CALLS),
        );
    }
    if let Some(resets) = continuous_rule {
        let (run, last) = (state_in(CONTINUOUS), state_in(LAST_CACHED));
        let two = e.i64("two", 2);
        // cache-dit's add_cached_step: previous call cached (step == last cached step + 1)?
        let has_previous = e.op("Greater", "has_cached_before", &[&last, &zero]);
        let adjacent = e.op("Equal", "previous_call_cached", &[STEP_INPUT, &last]);
        let run_zero = e.op("Equal", "continuous_is_zero", &[&run, &zero]);
        let adjacent_step = e.op("Where", "adjacent_increment", &[&run_zero, &two, &one]);
        let with_previous = e.op(
            "Where",
            "increment_after_cached",
            &[&adjacent, &adjacent_step, &zero],
        );
        let increment = e.op("Where", "increment", &[&has_previous, &with_previous, &one]);
        let on_skip = e.op("Add", "continuous_on_skip", &[&run, &increment]);
        let on_compute = e.op("Where", "continuous_on_compute", &[&resets, &zero, &run]);
        e.named(
            "Where",
            &[DECISION, &on_compute, &on_skip],
            &state_out(CONTINUOUS),
        );
        let step_plus_one = e.op("Add", "step_plus_one", &[STEP_INPUT, &one]);
        e.named(
            "Where",
            &[DECISION, &last, &step_plus_one],
            &state_out(LAST_CACHED),
        );
    }
    graph.nodes.extend(e.nodes);
    graph.initializers.extend(e.constants);
    residual
}

/// The region must hold every attention site of the cached blocks and none of the others.
fn check_region(
    graph: &Graph,
    region: &[usize],
    map: &DitMap,
    cached: std::ops::Range<usize>,
) -> Result<()> {
    let moved: HashSet<&str> = region
        .iter()
        .map(|&i| graph.nodes[i].name.as_str())
        .collect();
    for block in &map.blocks {
        for &id in &block.attention {
            let Some(site) = map.attention.get(id) else {
                continue;
            };
            let inside = moved.contains(site.anchor.as_str());
            if inside != cached.contains(&block.index) {
                bail!(
                    "attention site {id} ('{}') of block {} would {} the conditional blocks: the cached blocks do not separate from the rest",
                    site.anchor,
                    block.index,
                    if inside { "move into" } else { "stay out of" }
                );
            }
        }
    }
    Ok(())
}

/// The `If` on `ditc.decision`: then runs the region (the cached blocks) and returns the new tail
/// residual and head reference; else adds the cached tail residual and keeps both states.
/// What a skipped call adds to the head's output: `estimate` (the newest tail residual, or the
/// forecast computed by `nodes` from it and the `older` older ones).
struct Reuse {
    nodes: Vec<Node>,
    estimate: String,
    older: usize,
}

/// The state holding the `j`-th newest computed tail residual.
fn tail_state(j: usize) -> &'static str {
    match j {
        0 => TAIL_RESIDUAL,
        j => OLDER_TAIL_RESIDUALS[j - 1],
    }
}

#[allow(clippy::too_many_arguments)]
fn cached_blocks_if(
    graph: &Graph,
    region: &[usize],
    middle_out: &str,
    head_out: &str,
    residual: &str,
    dtype: DataType,
    dims: &[Dim],
    reuse: Reuse,
) -> Node {
    let computed = format!("{middle_out}.computed");
    let mut moved: Vec<Node> = region.iter().map(|&i| graph.nodes[i].clone()).collect();
    for node in &mut moved {
        for o in node.outputs.iter_mut().filter(|o| *o == middle_out) {
            *o = computed.clone();
        }
    }
    let tail_new = "ditc.fbc.tail_residual.computed";
    let reference_new = "ditc.fbc.head_residual.computed";
    moved.push(Node::new(
        tail_new,
        "Sub",
        &[&computed, head_out],
        &[tail_new],
    ));
    moved.push(Node::new(
        reference_new,
        "Identity",
        &[residual],
        &[reference_new],
    ));
    let tensor = |name: &str| ValueInfo::tensor(name, dtype, dims.to_vec());
    let mut then_outputs = vec![tensor(&computed), tensor(tail_new), tensor(reference_new)];
    let (reused, tail_kept, reference_kept) = (
        "ditc.fbc.middle.reused",
        "ditc.fbc.tail_residual.kept",
        "ditc.fbc.head_residual.kept",
    );
    let mut else_nodes = vec![
        Node::new(
            tail_kept,
            "Identity",
            &[&state_in(TAIL_RESIDUAL)],
            &[tail_kept],
        ),
        Node::new(
            reference_kept,
            "Identity",
            &[&state_in(HEAD_RESIDUAL)],
            &[reference_kept],
        ),
    ];
    else_nodes.extend(reuse.nodes);
    else_nodes.push(Node::new(
        reused,
        "Add",
        &[head_out, &reuse.estimate],
        &[reused],
    ));
    let mut else_outputs = vec![tensor(reused), tensor(tail_kept), tensor(reference_kept)];
    let mut if_outputs = vec![
        middle_out.to_string(),
        state_out(TAIL_RESIDUAL),
        state_out(HEAD_RESIDUAL),
    ];
    // With a forecast, a computed call shifts the older tail residuals by one.
    for j in 1..=reuse.older {
        let shifted = format!("ditc.fbc.{}.shifted", tail_state(j));
        moved.push(Node::new(
            &shifted,
            "Identity",
            &[&state_in(tail_state(j - 1))],
            &[&shifted],
        ));
        then_outputs.push(tensor(&shifted));
        let kept = format!("ditc.fbc.{}.kept", tail_state(j));
        else_nodes.push(Node::new(
            &kept,
            "Identity",
            &[&state_in(tail_state(j))],
            &[&kept],
        ));
        else_outputs.push(tensor(&kept));
        if_outputs.push(state_out(tail_state(j)));
    }
    let then_branch = Graph {
        name: "ditc.fbc.compute".into(),
        nodes: moved,
        outputs: then_outputs,
        ..Graph::default()
    };
    let else_branch = Graph {
        name: "ditc.fbc.reuse".into(),
        nodes: else_nodes,
        outputs: else_outputs,
        ..Graph::default()
    };
    let outputs: Vec<&str> = if_outputs.iter().map(String::as_str).collect();
    Node::new("ditc.fbc.cached_blocks", "If", &[DECISION], &outputs)
        .with_attr("then_branch", AttrValue::Graph(then_branch))
        .with_attr("else_branch", AttrValue::Graph(else_branch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn defaults_are_diffusers_first_block_cache() {
        let o = FbcOptions::from_table(&table("")).unwrap();
        assert_eq!(o, FbcOptions::default());
        assert_eq!((o.threshold, o.compute_first, o.compute_last), (0.05, 1, 0));
        assert_eq!(o.warmup_steps, 0);
        assert!(o.max_cached_steps.is_none() && o.max_continuous_cached_steps.is_none());
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let err = |text: &str| FbcOptions::from_table(&table(text)).unwrap_err();
        for bad in ["threshold = nan", "threshold = -0.1", "threshold = inf"] {
            let e = format!("{:#}", err(bad));
            assert!(e.contains("finite number >= 0"), "{bad}: {e}");
        }
        assert!(err("compute_first = 0")
            .to_string()
            .contains("compute_first must be at least 1"));
        assert!(format!("{:#}", err("thresold = 0.1")).contains("unknown field"));
        assert!(format!("{:#}", err("compute_last = -1")).contains("invalid"));
        let o = FbcOptions {
            compute_first: 4,
            compute_last: 2,
            ..Default::default()
        };
        let e = o.check_blocks(6).unwrap_err().to_string();
        assert!(e.contains("below the model's 6 blocks"), "{e}");
        o.check_blocks(7).unwrap();
    }

    /// The threshold constant decides every f32 metric as diffusers' f64 comparison does.
    #[test]
    fn f32_threshold_decides_as_the_f64_comparison() {
        for x in [0.05, 0.2, 0.1, 1.0 / 3.0, 0.0, 1e-30, 3.4e38, 1e300] {
            let t = f32_at_or_below(x);
            assert!(t as f64 <= x, "{x}");
            let around = [t, f32::from_bits(t.to_bits() + 1), x as f32];
            for f in around {
                assert_eq!(f > t, f as f64 > x, "x {x} f {f}");
            }
        }
    }
}
