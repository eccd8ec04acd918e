//! The reference runtime of the manifest contract: a sampling loop over a bundle's graph.
//!
//! Each step feeds the latent, the sampler's timestep, the step index and the state inputs, reads the
//! prediction and the state outputs, feeds the state back at the next step, and advances the latent
//! with the sampler. Static decisions: instead of running the graph's `If`s (which tract re-plans on
//! every call) it plans one specialised graph per distinct decision pattern and picks the one for each
//! step (see [`crate::schedule::specialize`]). Decisions computed in the graph (adaptive caches): the
//! graph is split at its `If` and only the taken outcome's plan runs ([`super::conditional`]); each
//! call's decision and metric are traced.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::conditional::{call, Plan, StateSet};
use crate::integrity::Checks;
use crate::ir::{DataType, Model, Tensor};
use crate::manifest::{InGraphDecisions, Manifest, ModelIo};
use crate::schedule::specialize::{
    model_flops, pattern_at, specialize, specialize_without, Pattern,
};
use crate::schedule::split::inline_ifs;
use crate::schedule::Group;
use crate::schedule::Sampler;

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
        Ok(Bundle {
            manifest,
            model,
            io,
            sampler,
        })
    }

    /// The unoptimised reference: for a bundle whose precision changed, the float source model (found
    /// at `source.path`) driven by the same sampler; otherwise the bundle itself with every site computing.
    pub fn reference(&self) -> Result<Option<Bundle>> {
        if self.manifest.precision.is_none() {
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

    /// Where an adaptive schedule's decisions come out of the graph, if it has one.
    pub fn adaptive(&self) -> Option<&InGraphDecisions> {
        self.manifest.schedule.as_ref()?.adaptive.as_ref()
    }

    fn tables(&self) -> BTreeMap<Group, Vec<bool>> {
        self.manifest
            .schedule
            .as_ref()
            .map(|s| s.tables.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindCalls {
    pub computed: usize,
    pub skipped: usize,
}

/// What a sampling run did and cost.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub steps: usize,
    pub wall_seconds: f64,
    /// Seconds spent preparing plans (once per distinct decision pattern).
    pub plan_seconds: f64,
    pub plans: usize,
    pub calls: BTreeMap<Group, KindCalls>,
    /// Per attention site id: computed (true) or reused at each step, as executed.
    pub decisions: BTreeMap<usize, Vec<bool>>,
    /// Per block whose MLP is scheduled: computed or reused at each step.
    pub mlp_decisions: BTreeMap<usize, Vec<bool>>,
    pub model_flops: u64,
    pub model_flops_full: u64,
    pub attention_flops: u64,
    pub attention_flops_full: u64,
    /// Adaptive schedules: every call's decision and metric, as the graph computed them.
    pub trace: Vec<CallTrace>,
}

/// One call of a graph that decides for itself.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CallTrace {
    pub step: usize,
    /// `cond` (the only branch without classifier-free guidance).
    pub branch: String,
    /// Whether the cached blocks computed.
    pub computed: bool,
    /// The metric the decision compared with its threshold (null where not finite: a first call).
    pub metric: Option<f32>,
}

/// Sample from `noise` with the other model inputs `extra` (e.g. `encoder_hidden_states`).
/// `force_full` runs every site at every step (the unscheduled model).
pub fn sample(
    bundle: &Bundle,
    noise: &Tensor,
    extra: &[Tensor],
    force_full: bool,
    progress: bool,
) -> Result<(Tensor, RunReport)> {
    let start = Instant::now();
    let steps = bundle.sampler.steps();
    let tables = if force_full {
        BTreeMap::new()
    } else {
        bundle.tables()
    };
    let all_compute: Pattern = bundle.tables().keys().map(|&k| (k, true)).collect();
    let mut inputs = base_inputs(bundle, noise, extra)?;
    let mut plans: BTreeMap<Vec<bool>, Plan> = BTreeMap::new();
    let mut plan_seconds = 0.0;
    let mut report = RunReport {
        steps,
        wall_seconds: 0.0,
        plan_seconds: 0.0,
        plans: 0,
        calls: BTreeMap::new(),
        decisions: BTreeMap::new(),
        mlp_decisions: BTreeMap::new(),
        model_flops: 0,
        model_flops_full: 0,
        attention_flops: 0,
        attention_flops_full: 0,
        trace: Vec::new(),
    };
    let site_cost = site_costs(&bundle.manifest);
    let full_flops = model_flops(&inline_ifs(
        &specialize(&bundle.model, &all_compute)?,
        true,
    )?);
    let mut state = StateSet::zeros(&bundle.model, &bundle.manifest.state)?;
    let adaptive = bundle.adaptive().filter(|_| !force_full);
    let mut x = noise.to_f32_vec().context("noise must be a float tensor")?;
    let bar = crate::progress::steps_bar(steps as u64, "sampling", progress);
    for i in 0..steps {
        let pattern = if tables.is_empty() {
            all_compute.clone()
        } else {
            pattern_at(&tables, i)
        };
        let key: Vec<bool> = pattern.values().copied().collect();
        set_step_inputs(bundle, &mut inputs, &x, noise, i)?;
        if !plans.contains_key(&key) {
            let t = Instant::now();
            // State outputs of values this step reuses equal their inputs: leave them out. A forced
            // full run needs no state at all, nor the decisions of an adaptive schedule.
            let mut unchanged: Vec<String> = bundle
                .manifest
                .state
                .iter()
                .filter(|b| force_full || !pattern.get(&b.group).copied().unwrap_or(true))
                .map(|b| b.output.clone())
                .collect();
            let specialised = if force_full {
                if let Some(a) = bundle.adaptive() {
                    unchanged.extend([a.decision.clone(), a.metric.clone()]);
                }
                inline_ifs(
                    &specialize_without(&bundle.model, &pattern, &unchanged)?,
                    true,
                )?
            } else {
                specialize_without(&bundle.model, &pattern, &unchanged)?
            };
            let example = [&inputs[..], state.tensors()].concat();
            plans.insert(key.clone(), Plan::new(&specialised, &example)?);
            plan_seconds += t.elapsed().as_secs_f64();
        }
        let result = call(&plans[&key], &inputs, &mut state, &bundle.manifest.state)
            .with_context(|| format!("step {i}"))?;
        let (outputs, flops) = (&result.outputs, &result.flops);
        let decision = match adaptive {
            Some(a) => Some(trace_call(&mut report, a, outputs, i)?),
            None => None,
        };
        let prediction = outputs
            .iter()
            .find(|t| t.name == bundle.io.prediction)
            .context("no prediction output")?;
        let pred = prediction_for(prediction, noise)?;
        bundle.sampler.step(i, &mut x, &pred);
        record(
            &mut report,
            bundle,
            &pattern,
            decision,
            &site_cost,
            *flops,
            full_flops,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.plans = plans.len();
    report.plan_seconds = plan_seconds;
    report.wall_seconds = start.elapsed().as_secs_f64();
    let out = Tensor::from_f32("sample", noise.dims.clone(), &x);
    Ok((out, report))
}

/// Record an adaptive call's decision and metric from its outputs; returns the decision.
fn trace_call(
    report: &mut RunReport,
    adaptive: &InGraphDecisions,
    outputs: &[Tensor],
    step: usize,
) -> Result<bool> {
    let output = |name: &str| {
        outputs
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("the graph did not output '{name}'"))
    };
    let computed = super::conditional::bool_scalar(output(&adaptive.decision)?)?;
    let metric = output(&adaptive.metric)?
        .to_f32_vec()
        .and_then(|v| v.first().copied())
        .with_context(|| format!("'{}' must be a float scalar", adaptive.metric))?;
    report.trace.push(CallTrace {
        step,
        branch: "cond".into(),
        computed,
        metric: metric.is_finite().then_some(metric),
    });
    Ok(computed)
}

/// An attention site as the report counts it.
struct SiteCost {
    kind: Group,
    /// Score/value products plus projections, per call.
    flops: u64,
    /// Whether the schedule drives this site (else it computes every step).
    scheduled: bool,
}

/// Every attention site of the manifest's DiT map, read once per run.
fn site_costs(m: &Manifest) -> BTreeMap<usize, SiteCost> {
    let scheduled: Vec<usize> = m
        .schedule
        .as_ref()
        .map(|s| {
            let adaptive = s.adaptive.iter().flat_map(|a| a.sites.iter());
            s.sites
                .values()
                .flatten()
                .chain(adaptive)
                .copied()
                .collect()
        })
        .unwrap_or_default();
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
                        scheduled: scheduled.contains(&id),
                    },
                );
            }
        }
    }
    out
}

/// Count a step's calls and FLOPs; `decision` is an adaptive schedule's (it drives its sites).
fn record(
    report: &mut RunReport,
    bundle: &Bundle,
    pattern: &Pattern,
    decision: Option<bool>,
    sites: &BTreeMap<usize, SiteCost>,
    flops: u64,
    full: u64,
) {
    for (&id, site) in sites {
        let (kind, cost) = (site.kind, site.flops);
        let decided = decision.unwrap_or_else(|| pattern.get(&kind).copied().unwrap_or(true));
        let computed = !site.scheduled || decided;
        report.decisions.entry(id).or_default().push(computed);
        let calls = report.calls.entry(kind).or_default();
        if computed {
            calls.computed += 1;
            report.attention_flops += cost;
        } else {
            calls.skipped += 1;
        }
        report.attention_flops_full += cost;
    }
    if let (Some(computed), Some(a)) = (decision, bundle.adaptive()) {
        let calls = report.calls.entry(Group::Blocks).or_default();
        let n = a.cached_blocks.len();
        if computed {
            calls.computed += n;
        } else {
            calls.skipped += n;
        }
    }
    if let Some(schedule) = bundle
        .manifest
        .schedule
        .as_ref()
        .filter(|s| s.adaptive.is_none())
    {
        for &block in &schedule.blocks {
            let computed = pattern.get(&Group::Mlp).copied().unwrap_or(true);
            report
                .mlp_decisions
                .entry(block)
                .or_default()
                .push(computed);
            let calls = report.calls.entry(Group::Mlp).or_default();
            if computed {
                calls.computed += 1;
            } else {
                calls.skipped += 1;
            }
        }
    }
    report.model_flops += flops;
    report.model_flops_full += full;
}

/// The model inputs that do not change per step (extra inputs, zero states) plus placeholders.
fn base_inputs(bundle: &Bundle, noise: &Tensor, extra: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut inputs: Vec<Tensor> = Vec::new();
    for input in bundle.model.graph.runtime_inputs() {
        let name = &input.name;
        if *name == bundle.io.latent
            || *name == bundle.io.timestep
            || Some(name) == bundle.io.step.as_ref()
        {
            continue;
        }
        // State inputs come from the branch's state set.
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
    for t in fresh {
        match inputs.iter_mut().find(|s| s.name == t.name) {
            Some(slot) => *slot = t,
            None => inputs.push(t),
        }
    }
    Ok(())
}

/// The prediction as the sampler needs it: same shape as the latent. Models with learned variance
/// (DiT: twice the channels) give the first half of the channels.
fn prediction_for(prediction: &Tensor, noise: &Tensor) -> Result<Vec<f32>> {
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
