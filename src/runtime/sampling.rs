//! The reference runtime of the manifest contract: a sampling loop over a bundle's graph.
//!
//! Each step feeds the latent, the sampler's timestep, the step index and the state inputs, reads the
//! prediction and the state outputs, feeds the state back at the next step, and advances the latent
//! with the sampler. With classifier-free guidance each step makes two calls, conditional then
//! unconditional (two sequential batch-1 calls; see the README for why not one batch-2 call), each
//! branch with its own state set (a copy of every state binding), and advances with `u + g * (c - u)`.
//! Static decisions: instead of running the graph's `If`s (which tract re-plans on every call) it plans
//! one specialised graph per distinct decision pattern and picks the one for each step (see
//! [`crate::schedule::specialize`]). Decisions computed in the graph (first-block-cache): the graph is
//! split at its `If` and only the taken outcome's plan runs ([`super::conditional`]); each call's
//! decision and metric are read from the graph's outputs and traced. Where the unconditional call
//! follows the conditional call's decision (EasyCache, `schedule.adaptive.follow`), the runtime feeds
//! the conditional call's decision of the step to the unconditional call: the calls of a step are
//! always made cond first, then uncond.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;

use super::conditional::{bool_scalar, call, Plan, StateSet};
use crate::integrity::Checks;
use crate::ir::{DataType, Model, Tensor};
use crate::manifest::{InGraphDecisions, Manifest, ModelIo, Schedule};
use crate::schedule::guidance::{branches, combine, Branch, Guidance, ZEROS};
use crate::schedule::specialize::{model_flops, specialize, specialize_without, Pattern};
use crate::schedule::split::inline_ifs;
use crate::schedule::Sampler;
use crate::schedule::{Decider, Group};

/// A bundle ready to sample: graph, manifest, sampler.
pub struct Bundle {
    pub manifest: Manifest,
    pub model: Model,
    pub io: ModelIo,
    pub sampler: Sampler,
}

impl Bundle {
    /// Open a bundle whose files all match the manifest (sizes and SHA-256).
    pub fn open(manifest_path: &Path) -> Result<Bundle> {
        Self::open_checked(manifest_path, &Checks::default())
    }

    /// Open a bundle after checking its manifest and files as `checks` says.
    pub fn open_checked(manifest_path: &Path, checks: &Checks) -> Result<Bundle> {
        let manifest = crate::integrity::read_verified(manifest_path, checks)?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let graph = manifest
            .files
            .first()
            .context("the manifest lists no graph file")?;
        let model = crate::onnx::read_model(&dir.join(&graph.path))?;
        let io = manifest
            .io
            .clone()
            .context("the manifest has no `io` section: the bundle cannot be sampled")?;
        let section = manifest
            .sampler
            .as_ref()
            .context("the bundle has no sampler: convert it with a recipe that has a [sampler]")?;
        let sampler = section.config.plan()?;
        let same = sampler.timesteps.len() == section.timesteps.len()
            && sampler
                .timesteps
                .iter()
                .zip(&section.timesteps)
                .all(|(a, b)| (a - b).abs() <= 1e-9 * a.abs().max(1.0));
        if !same {
            bail!("the manifest's timesteps do not match its sampler configuration");
        }
        if let Some(schedule) = &manifest.schedule {
            let tables = schedule
                .tables
                .iter()
                .map(|(g, t)| ("tables", g.as_str(), t));
            let uncond = schedule
                .uncond_tables
                .iter()
                .flatten()
                .map(|(g, t)| ("uncond_tables", g.as_str(), t));
            let blocks = schedule
                .block_tables
                .iter()
                .map(|b| ("block_tables", b.group.as_str(), &b.table));
            for (section, group, table) in tables.chain(uncond).chain(blocks) {
                if table.len() != sampler.steps() {
                    bail!(
                        "the manifest's schedule.{section}.{group} has {} entries for {} sampling steps",
                        table.len(),
                        sampler.steps()
                    );
                }
            }
        }
        Ok(Bundle {
            manifest,
            model,
            io,
            sampler,
        })
    }

    /// The unoptimised reference: for a bundle whose numerics changed (W8A8, quantized or block-sparse
    /// attention), the float source model (found at `source.path`) driven by the same sampler;
    /// otherwise the bundle itself with every site computing.
    pub fn reference(&self) -> Result<Option<Bundle>> {
        // Quantized (GEMMs or attention) or block-sparse bundles compute something else than the
        // source even with every site computing: the reference is the source model.
        let quantized_attention = self
            .manifest
            .provenance
            .passes
            .iter()
            .any(|p| p.name == "quantize-attention");
        if self.manifest.precision.is_none()
            && self.manifest.sparse_attention.is_none()
            && !quantized_attention
        {
            return Ok(None);
        }
        let source = Path::new(&self.manifest.source.path);
        let build = self.manifest.source.build.clone().unwrap_or_default();
        let model = crate::models::read_model_or_checkpoint(source, &build).with_context(|| {
            format!(
                "the float source model '{}' (needed to compare with the full computation)",
                source.display()
            )
        })?;
        Ok(Some(Bundle {
            manifest: self.manifest.clone(),
            model,
            io: self.io.clone(),
            sampler: self.sampler.clone(),
        }))
    }

    /// Where a schedule decided inside the graph puts its decisions, if the bundle has one.
    pub fn adaptive(&self) -> Option<&InGraphDecisions> {
        self.manifest.schedule.as_ref()?.adaptive.as_ref()
    }

    /// Every table of the schedule (none without one).
    fn deciders(&self) -> Vec<Decider> {
        self.manifest
            .schedule
            .as_ref()
            .map(|s| s.deciders_for(Branch::Cond).into_keys().collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindCalls {
    pub computed: usize,
    pub skipped: usize,
}

/// What one guidance branch (the only one without guidance: `cond`) did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BranchReport {
    /// Per group: values computed or reused over the run (per site, MLP or stack, per call).
    pub calls: BTreeMap<Group, KindCalls>,
    /// Model calls that computed something scheduled (`computed`) or reused every scheduled value
    /// (`skipped`); calls of a bundle without a schedule all compute.
    pub model_calls: KindCalls,
    /// Per attention site id: computed (true) or reused at each step, as executed.
    pub decisions: BTreeMap<usize, Vec<bool>>,
    /// Per block whose MLP is scheduled: computed or reused at each step.
    pub mlp_decisions: BTreeMap<usize, Vec<bool>>,
    /// The whole block stack (MagCache): computed or reused at each step; empty when not scheduled.
    pub stack_decisions: Vec<bool>,
}

/// What a sampling run did and cost.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub steps: usize,
    pub wall_seconds: f64,
    /// Seconds spent preparing plans (once per distinct decision pattern).
    pub plan_seconds: f64,
    pub plans: usize,
    /// Per group, summed over the branches.
    pub calls: BTreeMap<Group, KindCalls>,
    /// Per guidance branch: `cond` (and `uncond` with classifier-free guidance).
    pub branches: BTreeMap<Branch, BranchReport>,
    /// FLOPs of every call (two per step with guidance), as run and with everything computing.
    pub model_flops: u64,
    pub model_flops_full: u64,
    pub attention_flops: u64,
    pub attention_flops_full: u64,
    /// Score and value product FLOPs (projections not counted) over the run, all sites and calls:
    /// what ran (block-sparse sites: the kept blocks, counted by the graph at run time; sites a
    /// schedule skipped: nothing) over every site computing densely at every call.
    pub attention_flops_kept_fraction: f64,
    /// Per block-sparse site (`sparse-linear-attention`): scores computed over the run.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sparse_sites: BTreeMap<usize, SparseSiteRun>,
    /// Cost model (README "Compute accounting and the cost model"): estimated H100 milliseconds of
    /// each attention site's score and value products over the run (computed calls only; a
    /// block-sparse site at its measured kept fraction of each call), BF16.
    pub attention_h100_ms: BTreeMap<usize, f64>,
    /// FLOPs of every call outside the attention sites' score and value products (projections,
    /// FFNs, ...: what W8A8 quantizes), summed over the run.
    pub gemm_flops: u64,
    #[serde(skip)]
    score_flops_kept: f64,
    #[serde(skip)]
    score_flops_full: u64,
    /// Per step and branch: the decision, the policy's metric and the timestep (`ditc run --trace`).
    #[serde(skip)]
    pub trace: Vec<TraceStep>,
}

/// What one block-sparse site computed over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SparseSiteRun {
    /// (query, key) scores computed, summed over the calls, and the dense count for those calls.
    pub scores_kept: u64,
    pub scores_dense: u64,
    pub kept_fraction: f64,
    /// Cost model (README): estimated H100 milliseconds of the site over the run, at the measured
    /// kept fraction of each call, and dense.
    pub h100_ms_estimated: f64,
    pub h100_ms_dense: f64,
}

/// One step of `ditc run --trace`.
#[derive(Debug, Clone, Serialize)]
pub struct TraceStep {
    pub step: usize,
    pub timestep: f64,
    #[serde(flatten)]
    pub branches: BTreeMap<Branch, TraceCall>,
}

/// One call of a traced step.
#[derive(Debug, Clone, Serialize)]
pub struct TraceCall {
    /// Whether the call computed anything scheduled (for a MagCache stack: the stack; for PAB: any
    /// site or MLP; true without a schedule).
    pub computed: bool,
    /// The policy's metric at this call (MagCache: the accumulated error), null where it has none.
    pub metric: Option<f64>,
    /// Per scheduled table (group, or `<group>.block<N>` for a block's own table): computed or
    /// reused (absent without a schedule).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<Decider, bool>,
}

/// Sample from `noise` with the other model inputs `extra` (e.g. `encoder_hidden_states`, and the
/// negative of classifier-free guidance). `force_full` runs every site at every step (the
/// unscheduled model). With guidance, each step calls the model on the conditional inputs, then on
/// the unconditional ones, each branch with its own state, and advances with `u + g * (c - u)`.
pub fn sample(
    bundle: &Bundle,
    noise: &Tensor,
    extra: &[Tensor],
    force_full: bool,
    progress: bool,
) -> Result<(Tensor, RunReport)> {
    let start = Instant::now();
    let steps = bundle.sampler.steps();
    let guidance = bundle.manifest.guidance();
    let branches = branches(guidance);
    let schedule = if force_full {
        None
    } else {
        bundle.manifest.schedule.as_ref()
    };
    let all_compute: Pattern = bundle.deciders().into_iter().map(|d| (d, true)).collect();
    let base = base_inputs(bundle, noise, extra)?;
    let mut inputs: Vec<Vec<Tensor>> = branches
        .iter()
        .map(|&b| branch_inputs(&base, guidance, b, extra))
        .collect::<Result<_>>()?;
    let zeros = StateSet::zeros(&bundle.model, &bundle.manifest.state)?;
    let mut states: Vec<StateSet> = vec![zeros; branches.len()];
    let adaptive = bundle.adaptive().filter(|_| !force_full);
    let mut plans: BTreeMap<Pattern, Plan> = BTreeMap::new();
    let mut plan_seconds = 0.0;
    let mut report = RunReport {
        steps,
        wall_seconds: 0.0,
        plan_seconds: 0.0,
        plans: 0,
        calls: BTreeMap::new(),
        branches: BTreeMap::new(),
        model_flops: 0,
        model_flops_full: 0,
        attention_flops: 0,
        attention_flops_full: 0,
        attention_flops_kept_fraction: 1.0,
        sparse_sites: BTreeMap::new(),
        attention_h100_ms: BTreeMap::new(),
        gemm_flops: 0,
        score_flops_kept: 0.0,
        score_flops_full: 0,
        trace: Vec::new(),
    };
    let site_cost = site_costs(&bundle.manifest);
    let full_flops = model_flops(&inline_ifs(
        &specialize(&bundle.model, &all_compute)?,
        true,
    )?);
    let mut x = noise.to_f32_vec().context("noise must be a float tensor")?;
    let bar = crate::progress::steps_bar(steps as u64, "sampling", progress);
    for i in 0..steps {
        let timestep = bundle.sampler.timesteps[i];
        let mut predictions = Vec::with_capacity(branches.len());
        let mut traced = BTreeMap::new();
        // The conditional call's decision at this step, for a graph whose unconditional call
        // follows it (EasyCache): the conditional call always runs first.
        let mut cond_decision = false;
        for ((&branch, inputs), state) in branches.iter().zip(&mut inputs).zip(&mut states) {
            let pattern = match schedule {
                Some(s) => s.pattern_at(branch, i),
                None => all_compute.clone(),
            };
            set_step_inputs(bundle, inputs, &x, noise, i, branch)?;
            if let Some(name) = bundle.adaptive().and_then(|a| a.follow.as_ref()) {
                set_input(inputs, bool_tensor(name, cond_decision));
            }
            if !plans.contains_key(&pattern) {
                let t = Instant::now();
                // State outputs of values this step reuses equal their inputs: leave them out. A
                // forced full run needs no state at all, nor the decisions of a graph that decides.
                let mut unchanged: Vec<String> = bundle
                    .manifest
                    .state
                    .iter()
                    .filter(|b| force_full || !pattern.get(&b.decider()).copied().unwrap_or(true))
                    .map(|b| b.output.clone())
                    .collect();
                let specialised = match bundle.adaptive().filter(|_| force_full) {
                    Some(a) => {
                        unchanged.extend([a.decision.clone(), a.metric.clone()]);
                        let s = specialize_without(&bundle.model, &pattern, &unchanged)?;
                        inline_ifs(&s, true)?
                    }
                    None => specialize_without(&bundle.model, &pattern, &unchanged)?,
                };
                let example = [&inputs[..], state.tensors()].concat();
                plans.insert(pattern.clone(), Plan::new(&specialised, &example)?);
                plan_seconds += t.elapsed().as_secs_f64();
            }
            let result = call(&plans[&pattern], inputs, state, &bundle.manifest.state)
                .with_context(|| format!("step {i}, {branch} call"))?;
            let outputs = &result.outputs;
            // A graph that decides: what it decided joins the pattern (group `blocks`).
            let (mut pattern, mut metric) = (pattern, None);
            if let Some(a) = adaptive {
                let (computed, m) = read_decision(a, outputs)?;
                pattern.insert(Group::Blocks.into(), computed);
                metric = m;
                if branch == Branch::Cond {
                    cond_decision = computed;
                }
            }
            let prediction = outputs
                .iter()
                .find(|t| t.name == bundle.io.prediction)
                .context("no prediction output")?;
            predictions.push(prediction_for(prediction, noise)?);
            let kept = sparse_kept(&bundle.manifest, outputs)?;
            let call = Call {
                pattern: &pattern,
                flops: result.flops,
                full: full_flops,
                kept: &kept,
            };
            record(&mut report, bundle, branch, &call, &site_cost)?;
            let mut traced_call = trace_call(schedule, branch, i, &pattern);
            traced_call.metric = traced_call.metric.or(metric);
            traced.insert(branch, traced_call);
        }
        let velocity = match (guidance, predictions.as_slice()) {
            (Some(g), [cond, uncond]) => combine(g.scale, cond, uncond),
            _ => predictions.swap_remove(0),
        };
        bundle.sampler.step(i, &mut x, &velocity);
        report.trace.push(TraceStep {
            step: i,
            timestep,
            branches: traced,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.attention_flops_kept_fraction =
        report.score_flops_kept / report.score_flops_full.max(1) as f64;
    for site in report.sparse_sites.values_mut() {
        site.kept_fraction = site.scores_kept as f64 / site.scores_dense.max(1) as f64;
    }
    report.plans = plans.len();
    report.plan_seconds = plan_seconds;
    report.wall_seconds = start.elapsed().as_secs_f64();
    let out = Tensor::from_f32("sample", noise.dims.clone(), &x);
    Ok((out, report))
}

/// The inputs of `branch`: the common ones, with the guided input replaced by the negative for the
/// unconditional branch (zeros of its shape and type, or the named tensor of the inputs file).
pub(crate) fn branch_inputs(
    base: &[Tensor],
    guidance: Option<&Guidance>,
    branch: Branch,
    extra: &[Tensor],
) -> Result<Vec<Tensor>> {
    let (Some(g), Branch::Uncond) = (guidance, branch) else {
        return Ok(base.to_vec());
    };
    let name = g
        .input
        .as_deref()
        .context("the manifest's sampler.guidance names no input to replace")?;
    let mut out = base.to_vec();
    let slot = out
        .iter_mut()
        .find(|t| t.name == name)
        .with_context(|| format!("sampler.guidance.input '{name}' is not an input of the graph"))?;
    let negative = if g.negative == ZEROS {
        Tensor::from_raw(
            name,
            slot.dtype,
            slot.dims.clone(),
            Bytes::from(vec![0u8; slot.byte_len() as usize]),
        )?
    } else {
        let t = extra.iter().find(|t| t.name == g.negative).with_context(|| {
            format!(
                "the inputs file has no tensor '{}' (sampler.guidance.negative: the unconditional branch's '{name}')",
                g.negative
            )
        })?;
        if t.dims != slot.dims || t.dtype != slot.dtype {
            bail!(
                "the negative '{}' is {} {:?}, the conditional '{name}' is {} {:?}: they must match",
                g.negative,
                t.dtype,
                t.dims,
                slot.dtype,
                slot.dims
            );
        }
        Tensor {
            name: name.to_string(),
            ..t.clone()
        }
    };
    *slot = negative;
    Ok(out)
}

/// A deciding graph's decision (true: the cached blocks computed) and metric (absent where not finite:
/// a branch's first call has no reference to compare with).
fn read_decision(a: &InGraphDecisions, outputs: &[Tensor]) -> Result<(bool, Option<f64>)> {
    let output = |name: &str| {
        outputs
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("the graph did not output '{name}'"))
    };
    let computed = bool_scalar(output(&a.decision)?)?;
    let metric = output(&a.metric)?
        .to_f32_vec()
        .and_then(|v| v.first().copied())
        .with_context(|| format!("'{}' must be a float scalar", a.metric))?;
    Ok((computed, metric.is_finite().then_some(metric as f64)))
}

/// The trace entry of one call: what it computed and the policy's metric.
fn trace_call(schedule: Option<&Schedule>, branch: Branch, step: usize, p: &Pattern) -> TraceCall {
    let stack = p.get(&Group::Stack.into()).copied().unwrap_or(true);
    let others: Vec<bool> = p
        .iter()
        .filter(|(g, _)| g.group != Group::Stack)
        .map(|(_, &c)| c)
        .collect();
    let metric = schedule
        .and_then(|s| s.metrics.as_ref())
        .and_then(|m| m.get(&branch))
        .and_then(|m| m.get(step).copied().flatten());
    TraceCall {
        computed: stack && (others.is_empty() || others.contains(&true)),
        metric,
        groups: p.clone(),
    }
}

/// An attention site as the report counts it.
struct SiteCost {
    kind: Group,
    /// Score/value products plus projections, per call.
    flops: u64,
    /// Score/value products alone, per call, and the site's key length (for the cost model).
    score_flops: u64,
    key_len: i64,
    /// The tables that drive this site (its block's or kind's, the stack's); empty: it always
    /// computes.
    groups: Vec<Decider>,
}

/// Every attention site of the manifest's DiT map, read once per run.
fn site_costs(m: &Manifest) -> BTreeMap<usize, SiteCost> {
    let driven_by = |id: usize| -> Vec<Decider> {
        m.schedule
            .as_ref()
            .map(|s| {
                let in_cached_blocks = s.adaptive.iter().filter(|a| a.sites.contains(&id));
                let mut out = s.site_deciders(id);
                out.extend(in_cached_blocks.map(|_| Decider::from(Group::Blocks)));
                out
            })
            .unwrap_or_default()
    };
    let mut out = BTreeMap::new();
    if let Some(sites) = m.dit_map.get("attention").and_then(|a| a.as_array()) {
        for s in sites {
            let id = s["id"].as_u64().unwrap_or(0) as usize;
            let kind: Option<Group> = serde_json::from_value(s["kind"].clone()).ok();
            let flops =
                s["flops"].as_u64().unwrap_or(0) + s["projection_flops"].as_u64().unwrap_or(0);
            if let Some(kind) = kind {
                out.insert(
                    id,
                    SiteCost {
                        kind,
                        flops,
                        score_flops: s["flops"].as_u64().unwrap_or(0),
                        key_len: s["key_len"].as_i64().unwrap_or(0),
                        groups: driven_by(id),
                    },
                );
            }
        }
    }
    out
}

/// One model call as the report counts it.
struct Call<'a> {
    pattern: &'a Pattern,
    /// FLOPs of the plan that ran, and of the call with everything computing.
    flops: u64,
    full: u64,
    /// Block-sparse sites of this call: (scores computed, scores of the dense site).
    kept: &'a BTreeMap<usize, (u64, u64)>,
}

/// The scores each block-sparse site computed in a call, read from its `kept` output (absent from
/// the outputs: the reference model, which has no sparse sites).
fn sparse_kept(m: &Manifest, outputs: &[Tensor]) -> Result<BTreeMap<usize, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for site in m.sparse_attention.iter().flat_map(|s| &s.sites) {
        let Some(t) = outputs.iter().find(|t| t.name == site.kept_output) else {
            continue;
        };
        let kept = match t.to_i64_vec().as_deref() {
            Some([k]) if *k >= 0 && *k as u64 <= site.scores_dense => *k as u64,
            _ => bail!(
                "'{}' must be an int64 scalar in 0..={} (the scores site {} computed)",
                site.kept_output,
                site.scores_dense,
                site.site
            ),
        };
        out.insert(site.site, (kept, site.scores_dense));
    }
    Ok(out)
}

fn record(
    report: &mut RunReport,
    bundle: &Bundle,
    branch: Branch,
    call: &Call,
    sites: &BTreeMap<usize, SiteCost>,
) -> Result<()> {
    let computes = |d: Decider| call.pattern.get(&d).copied().unwrap_or(true);
    let mut score_flops_computed = 0u64;
    let stack = computes(Group::Stack.into());
    let b = report.branches.entry(branch).or_default();
    for (&id, site) in sites {
        let computed = site.groups.iter().all(|&g| computes(g));
        b.decisions.entry(id).or_default().push(computed);
        count(&mut b.calls, site.kind, computed);
        count(&mut report.calls, site.kind, computed);
        if computed {
            report.attention_flops += site.flops;
        }
        report.attention_flops_full += site.flops;
        report.score_flops_full += site.score_flops;
        // A site a schedule skipped computed nothing (its counter reads 0): not a sparse call.
        if let Some(&(kept, _)) = call.kept.get(&id).filter(|_| !computed) {
            if kept != 0 {
                bail!("block-sparse site {id} reports {kept} scores at a call its schedule skipped (a ditc bug)");
            }
        }
        let kept_fraction = match call.kept.get(&id).filter(|_| computed) {
            Some(&(kept, dense)) => {
                let s = report.sparse_sites.entry(id).or_default();
                let fraction = kept as f64 / dense.max(1) as f64;
                s.scores_kept += kept;
                s.scores_dense += dense;
                s.h100_ms_dense += crate::analysis::gpu_cost::dense_ms(site.score_flops);
                s.h100_ms_estimated +=
                    crate::analysis::gpu_cost::sparse_ms(site.score_flops, fraction, site.key_len);
                fraction
            }
            None => 1.0,
        };
        let ms = report.attention_h100_ms.entry(id).or_default();
        if computed {
            report.score_flops_kept += site.score_flops as f64 * kept_fraction;
            score_flops_computed += site.score_flops;
            *ms += match call.kept.contains_key(&id) {
                true => crate::analysis::gpu_cost::sparse_ms(
                    site.score_flops,
                    kept_fraction,
                    site.key_len,
                ),
                false => crate::analysis::gpu_cost::dense_ms(site.score_flops),
            };
        }
    }
    if let Some(a) = bundle
        .manifest
        .schedule
        .as_ref()
        .and_then(|s| s.adaptive.as_ref())
    {
        let computed = computes(Group::Blocks.into());
        for _ in &a.cached_blocks {
            count(&mut b.calls, Group::Blocks, computed);
            count(&mut report.calls, Group::Blocks, computed);
        }
    }
    if let Some(schedule) = bundle
        .manifest
        .schedule
        .as_ref()
        .filter(|s| s.adaptive.is_none())
    {
        for (block, decider) in schedule.mlp_deciders() {
            let computed = computes(decider) && stack;
            b.mlp_decisions.entry(block).or_default().push(computed);
            count(&mut b.calls, Group::Mlp, computed);
            count(&mut report.calls, Group::Mlp, computed);
        }
        if schedule.tables.contains_key(&Group::Stack) {
            b.stack_decisions.push(stack);
            count(&mut b.calls, Group::Stack, stack);
            count(&mut report.calls, Group::Stack, stack);
        }
    }
    let any = call.pattern.is_empty() || call.pattern.values().any(|&c| c);
    if any && stack {
        b.model_calls.computed += 1;
    } else {
        b.model_calls.skipped += 1;
    }
    report.model_flops += call.flops;
    report.model_flops_full += call.full;
    report.gemm_flops += call.flops.saturating_sub(score_flops_computed);
    Ok(())
}

fn count(calls: &mut BTreeMap<Group, KindCalls>, group: Group, computed: bool) {
    let c = calls.entry(group).or_default();
    if computed {
        c.computed += 1;
    } else {
        c.skipped += 1;
    }
}

/// The model inputs that do not change per step (extra inputs; not the state) plus placeholders.
fn base_inputs(bundle: &Bundle, noise: &Tensor, extra: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut inputs: Vec<Tensor> = Vec::new();
    for input in bundle.model.graph.runtime_inputs() {
        let name = &input.name;
        if *name == bundle.io.latent
            || *name == bundle.io.timestep
            || Some(name) == bundle.io.step.as_ref()
            || Some(name) == bundle.io.branch.as_ref()
            || Some(name) == bundle.adaptive().and_then(|a| a.follow.as_ref())
        {
            continue;
        }
        // State inputs come from each branch's state set.
        if bundle.manifest.state.iter().any(|b| &b.input == name) {
            continue;
        }
        let t = extra.iter().find(|t| &t.name == name).with_context(|| {
            let have: Vec<&str> = extra.iter().map(|t| t.name.as_str()).collect();
            format!("the inputs file has no tensor '{name}' (the model needs it; given: {have:?})")
        })?;
        inputs.push(t.clone());
    }
    let latent_shape: Option<Vec<i64>> = bundle
        .model
        .graph
        .inputs
        .iter()
        .find(|i| i.name == bundle.io.latent)
        .and_then(|i| i.shape()?.iter().map(|d| d.value()).collect());
    if let Some(shape) = latent_shape {
        if shape != noise.dims {
            bail!(
                "noise has shape {:?}, the model's '{}' needs {shape:?}",
                noise.dims,
                bundle.io.latent
            );
        }
    }
    Ok(inputs)
}

/// The sampler's timestep `t` as the model's timestep input takes it (its shape; i64 rounded, or f32).
pub fn timestep_tensor(model: &Model, name: &str, t: f64) -> Result<Tensor> {
    let info = model
        .graph
        .inputs
        .iter()
        .find(|i| i.name == name)
        .context("no timestep input")?;
    let shape: Vec<i64> = info
        .shape()
        .unwrap_or(&[])
        .iter()
        .map(|d| d.value().unwrap_or(1))
        .collect();
    Ok(match info.dtype() {
        Some(DataType::I64) => Tensor::from_i64(name, shape, &[t.round() as i64]),
        Some(DataType::F32) | None => Tensor::from_f32(name, shape, &[t as f32]),
        Some(other) => bail!("timestep input '{name}' has type {other}; ditc feeds i64 or f32"),
    })
}

fn set_step_inputs(
    bundle: &Bundle,
    inputs: &mut Vec<Tensor>,
    x: &[f32],
    noise: &Tensor,
    step: usize,
    branch: Branch,
) -> Result<()> {
    let latent = Tensor::from_f32(&bundle.io.latent, noise.dims.clone(), x);
    let timestep = timestep_tensor(
        &bundle.model,
        &bundle.io.timestep,
        bundle.sampler.timesteps[step],
    )?;
    let mut fresh = vec![latent, timestep];
    if let Some(step_name) = &bundle.io.step {
        fresh.push(Tensor::from_i64(step_name, vec![], &[step as i64]));
    }
    if let Some(branch_name) = &bundle.io.branch {
        fresh.push(Tensor::from_i64(branch_name, vec![], &[branch.index()]));
    }
    for t in fresh {
        set_input(inputs, t);
    }
    Ok(())
}

/// Replace the input of `t`'s name by `t`, or add it.
fn set_input(inputs: &mut Vec<Tensor>, t: Tensor) {
    match inputs.iter_mut().find(|s| s.name == t.name) {
        Some(slot) => *slot = t,
        None => inputs.push(t),
    }
}

/// A 0-D bool tensor.
fn bool_tensor(name: &str, value: bool) -> Tensor {
    Tensor::from_raw(name, DataType::Bool, Vec::new(), vec![value as u8].into())
        .expect("one byte for one bool")
}

/// The prediction as the sampler needs it: same shape as the latent. Models with learned variance
/// (DiT: twice the channels) give the first half of the channels.
pub(crate) fn prediction_for(prediction: &Tensor, noise: &Tensor) -> Result<Vec<f32>> {
    let values = prediction
        .to_f32_vec()
        .context("the prediction must be a float tensor")?;
    if prediction.dims == noise.dims {
        return Ok(values);
    }
    let doubled = prediction.dims.len() == noise.dims.len()
        && prediction.dims.len() >= 2
        && prediction.dims[1] == 2 * noise.dims[1]
        && prediction.dims[0] == noise.dims[0]
        && prediction.dims[2..] == noise.dims[2..];
    if !doubled {
        bail!(
            "prediction shape {:?} does not match the latent {:?}",
            prediction.dims,
            noise.dims
        );
    }
    let per_batch = values.len() / noise.dims[0] as usize;
    let half = per_batch / 2;
    Ok(values
        .chunks(per_batch)
        .flat_map(|c| c[..half].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Graph, ValueInfo};

    fn model_with_timestep(dtype: DataType) -> Model {
        let mut graph = Graph::default();
        graph
            .inputs
            .push(ValueInfo::tensor("timestep", dtype, vec![Dim::Value(1)]));
        Model::new(graph, 17)
    }

    /// A float32 timestep input gets the sampler's timestep unrounded (diffusers' 993.12439 at step 1 of
    /// the shift-3 flow schedule), an int64 one the nearest integer.
    #[test]
    fn timesteps_are_fed_in_the_inputs_type() {
        let t = 993.1243896484375;
        let f = timestep_tensor(&model_with_timestep(DataType::F32), "timestep", t).unwrap();
        assert_eq!(f.dtype, DataType::F32);
        assert_eq!(f.to_f32_vec().unwrap()[0].to_bits(), 0x447847f6);
        let i = timestep_tensor(&model_with_timestep(DataType::I64), "timestep", t).unwrap();
        assert_eq!(i.to_i64_vec().unwrap(), [993]);
        assert!(timestep_tensor(&model_with_timestep(DataType::F16), "timestep", t).is_err());
    }
}
