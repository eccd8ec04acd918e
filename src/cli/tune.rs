//! `ditc tune MODEL --recipe BASE --inputs FILE --cases 0,1 --budget rel-l2=0.1 -o tuned.toml`: the
//! caching schedule with the fewest computed FLOPs whose final latent stays within a fidelity budget of
//! the full model's on every calibration case.
//!
//! Every candidate is a complete recipe (BASE's sampler and guidance plus one caching pass), converted
//! and sampled exactly as `ditc convert` and `ditc run` do, and compared with the full model's final
//! latent case by case (a case that misses the budget ends that candidate's run). The search is pruned
//! by measured drift, not swept: the full model's run with every call computing records, per step and
//! branch, the change each policy's metric measures (the first-block residual, EasyCache's estimated
//! output change, MagCache's magnitude ratios, TeaCache's rescaled embedding change). A threshold below
//! every step's drift computes every call and one above the drift accumulated over the run skips all it
//! may, so each policy's threshold is bisected (in log space) between those bounds: skipped calls grow
//! with the threshold and fidelity falls with it, so a candidate that meets the budget moves the lower
//! bound up and one that misses it moves the upper bound down. A policy's search stops as soon as a
//! candidate misses the budget while computing at least the FLOPs of the best candidate so far (every
//! smaller threshold computes more). Table policies (MagCache, TeaCache) know their decisions at
//! conversion: a table already tried is not run again, and one computing at least the best FLOPs is
//! not run at all. Everything is deterministic (fixed order, fixed bisection points).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::ir::Tensor;
use crate::manifest::Manifest;
use crate::metrics::{compare, Fidelity};
use crate::recipe::{PassSpec, Recipe};
use crate::runtime::{sample, Bundle, RunReport};
use crate::schedule::guidance::Branch;
use crate::schedule::pab::ExplicitTables;
use crate::schedule::Group;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  ditc tune examples/wan-small/ckpt --frames 8 --height 16 --width 16 --text-len 4 --recipe passes/wan-cfg.toml --inputs examples/wan-small/inputs.safetensors --cases 0 --budget rel-l2=0.1 -o tuned.toml"
)]
pub struct Args {
    /// The model, as `ditc convert` takes it (an .onnx file or a diffusers checkpoint folder).
    pub model: PathBuf,
    /// The base recipe: its sampler and guidance are kept; its passes are replaced by the tuned one.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a base recipe option (as for convert), e.g. `sampler.steps=10`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Safetensors file with `noise` and the model's condition inputs per case, as `<case>.<name>`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Calibration cases (comma-separated prefixes without the dot), e.g. `0,1`. Keep held-out cases
    /// out.
    #[arg(long, value_delimiter = ',', required = true)]
    pub cases: Vec<String>,
    /// The fidelity every calibration case must meet, final latent vs the full model's:
    /// `rel-l2=X` (at most X), `psnr=DB` (at least), `cosine=C` (at least).
    #[arg(long)]
    pub budget: String,
    /// Where to write the tuned recipe; the report of every candidate goes beside it (`.json`).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Policies to search (comma-separated): easy-cache, mag-cache, tea-cache, first-block-cache,
    /// ada-cache, pab, static-table (`broadcast-static` tables per group and per block built from
    /// the profiled drift of every attention and MLP output; opt-in: not in the default). Default:
    /// all the others.
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Tune to the budget's error scaled by this factor on the calibration cases (in (0, 1]; e.g.
    /// 0.8 tunes `rel-l2=0.15` to 0.12), a safety margin for held-out inputs.
    #[arg(long, default_value_t = 1.0)]
    pub margin: f64,
    /// Bisection points per policy threshold.
    #[arg(long, default_value_t = 6)]
    pub iterations: usize,
    /// Stop searching after this many seconds (the best candidate so far is written).
    #[arg(long, value_name = "SECONDS")]
    pub time_limit: Option<f64>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
    #[command(flatten)]
    pub threads: super::Threads,
}

/// The fidelity measure a budget bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    Psnr,
    Cosine,
    RelL2,
}

/// A fidelity budget: `rel-l2=0.1`, `psnr=30`, `cosine=0.99`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Budget {
    pub metric: Metric,
    pub bound: f64,
}

impl FromStr for Budget {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Budget> {
        let (name, value) = s.split_once('=').with_context(|| {
            format!("--budget '{s}': expected METRIC=VALUE (rel-l2=0.1, psnr=30 or cosine=0.99)")
        })?;
        let metric = match name.trim() {
            "psnr" => Metric::Psnr,
            "cosine" => Metric::Cosine,
            "rel-l2" => Metric::RelL2,
            other => {
                bail!("--budget '{s}': unknown metric '{other}' (expected psnr, cosine or rel-l2)")
            }
        };
        let bound: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .with_context(|| format!("--budget '{s}': '{value}' is not a finite number"))?;
        match metric {
            Metric::RelL2 if bound < 0.0 => bail!("--budget '{s}': rel-l2 must be >= 0"),
            Metric::Cosine if !(-1.0..=1.0).contains(&bound) => {
                bail!("--budget '{s}': cosine must be in [-1, 1]")
            }
            _ => Ok(Budget { metric, bound }),
        }
    }
}

impl Budget {
    /// The budget with its error scaled by `margin` (in (0, 1]): rel-L2 `X * margin`, PSNR
    /// `DB - 20 log10(margin)` (the same error ratio in decibels), cosine `1 - (1 - C) * margin^2`
    /// (`1 - cos` grows as the square of a small relative error). Tuning to it on the calibration
    /// cases leaves headroom for held-out inputs, whose trajectories differ.
    pub fn with_margin(&self, margin: f64) -> Budget {
        let bound = match self.metric {
            Metric::RelL2 => self.bound * margin,
            Metric::Psnr => self.bound - 20.0 * margin.log10(),
            Metric::Cosine => 1.0 - (1.0 - self.bound) * margin * margin,
        };
        Budget {
            metric: self.metric,
            bound,
        }
    }

    pub fn meets(&self, f: &Fidelity) -> bool {
        match self.metric {
            Metric::Psnr => f.psnr_db >= self.bound,
            Metric::Cosine => f.cosine >= self.bound,
            Metric::RelL2 => f.rel_l2 <= self.bound,
        }
    }
}

/// The worst value of each measure over `cases` (each measure on its own).
pub fn worst(cases: &[Fidelity]) -> Option<Fidelity> {
    let first = cases.first()?.clone();
    Some(cases.iter().skip(1).fold(first, |w, f| Fidelity {
        max_abs: w.max_abs.max(f.max_abs),
        max_rel: w.max_rel.max(f.max_rel),
        rel_l2: w.rel_l2.max(f.rel_l2),
        cosine: w.cosine.min(f.cosine),
        psnr_db: w.psnr_db.min(f.psnr_db),
    }))
}

/// The text of a complete recipe: `base`'s sampler and guidance, then `pass` (none: the full model).
pub fn recipe_toml(name: &str, base: &Recipe, pass: Option<&PassSpec>) -> Result<String> {
    let mut root = toml::Table::new();
    root.insert("name".into(), name.into());
    root.insert("version".into(), 1.into());
    let sampler = base
        .sampler
        .as_ref()
        .context("the base recipe has no [sampler]: tuning needs its sampling loop")?;
    let mut table = match toml::Value::try_from(sampler)? {
        toml::Value::Table(t) => t,
        _ => bail!("the sampler does not serialise as a table"),
    };
    if let Some(g) = &base.guidance {
        table.insert("guidance".into(), toml::Value::try_from(g)?);
    }
    root.insert("sampler".into(), table.into());
    if let Some(p) = pass {
        let mut spec = toml::Table::new();
        spec.insert("name".into(), p.name.clone().into());
        spec.insert("options".into(), p.options.clone().into());
        root.insert("passes".into(), toml::Value::Array(vec![spec.into()]));
    }
    Ok(toml::to_string(&root)?)
}

/// One candidate's result on the cases it ran.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// Computed FLOPs per run (both calls of every step with guidance), mean over the cases run.
    pub flops: f64,
    /// Model calls that ran the cached blocks or any scheduled value, per run (mean over the cases).
    pub calls_computed: f64,
    pub calls_total: usize,
    /// Final latent vs the full model's, per case run (in order; the run stops at a case that misses).
    pub fidelity: Vec<Fidelity>,
    pub seconds: f64,
}

/// Converts candidates and samples them on a fixed set of cases against the full model.
pub struct Evaluator {
    model: PathBuf,
    shapes: crate::models::BuildOptions,
    pub base: Recipe,
    work: PathBuf,
    cases: Vec<(String, Vec<Tensor>)>,
    full: Vec<Vec<f32>>,
    /// The full model's FLOPs per run.
    pub full_flops: u64,
    /// The full model's bundle (for the drift runs' io and sampler).
    full_manifest: PathBuf,
    full_blocks: usize,
    counter: usize,
}

impl Evaluator {
    /// Convert the full model with `base`'s sampler and sample it on every case of `inputs` named in
    /// `cases`, into `work` (created).
    pub fn new(
        model: &Path,
        shapes: &crate::models::BuildOptions,
        base: &Recipe,
        inputs: &Path,
        cases: &[String],
        work: &Path,
    ) -> Result<Evaluator> {
        if cases.is_empty() || cases.iter().any(|c| c.trim().is_empty()) {
            bail!("--cases: the list of calibration cases is empty (e.g. --cases 0,1)");
        }
        let all = crate::tensors::read_safetensors(inputs)?;
        let cases = cases
            .iter()
            .map(|c| {
                let t = super::select_prefixed(&all, &format!("{c}."));
                if t.is_empty() {
                    bail!(
                        "'{}' has no case '{c}' (no tensor named '{c}.<name>')",
                        inputs.display()
                    );
                }
                Ok((c.clone(), t))
            })
            .collect::<Result<Vec<_>>>()?;
        std::fs::create_dir_all(work)
            .with_context(|| format!("cannot create '{}'", work.display()))?;
        let mut e = Evaluator {
            model: model.to_path_buf(),
            shapes: shapes.clone(),
            base: base.clone(),
            work: work.to_path_buf(),
            cases,
            full: Vec::new(),
            full_flops: 0,
            full_manifest: PathBuf::new(),
            full_blocks: 0,
            counter: 0,
        };
        let (path, manifest) = e.convert(None)?;
        e.full_blocks = manifest.dit_map["blocks"].as_array().map_or(0, |b| b.len());
        let bundle = Bundle::open(&path)?;
        for (name, inputs) in &e.cases {
            let (latent, report) = run_case(&bundle, inputs, name)?;
            e.full_flops = report.model_flops;
            e.full.push(latent);
        }
        e.full_manifest = path;
        Ok(e)
    }

    /// Write the recipe of `pass` and convert the model with it; the manifest's path and content.
    pub fn convert(&mut self, pass: Option<&PassSpec>) -> Result<(PathBuf, Manifest)> {
        self.counter += 1;
        let dir = self.work.join(format!("c{}", self.counter));
        let recipe = self.work.join(format!("c{}.toml", self.counter));
        std::fs::write(&recipe, recipe_toml("candidate", &self.base, pass)?)?;
        let args = super::convert::Args {
            model: self.model.clone(),
            output: dir.clone(),
            recipe: Some(recipe),
            set: Vec::new(),
            calibration_stats: None,
            external_threshold: 1024,
            target: Default::default(),
            allow_lint_errors: false,
            dump_after: Vec::new(),
            no_progress: true,
            calibrate: Default::default(),
            shapes: self.shapes.clone(),
        };
        let manifest = super::convert::convert(&args)?;
        Ok((dir.join("manifest.json"), manifest))
    }

    /// Sample the bundle at `manifest` on the cases in order, stopping after the first case that
    /// misses `stop` (when given).
    pub fn run(&self, manifest: &Path, stop: Option<&Budget>) -> Result<Outcome> {
        let start = Instant::now();
        let bundle = Bundle::open(manifest)?;
        let (mut flops, mut calls, mut total, mut fidelity) = (0u64, 0usize, 0usize, Vec::new());
        for ((name, inputs), full) in self.cases.iter().zip(&self.full) {
            let (latent, report) = run_case(&bundle, inputs, name)?;
            flops += report.model_flops;
            for b in report.branches.values() {
                calls += b.model_calls.computed;
                total += b.model_calls.computed + b.model_calls.skipped;
            }
            let f = compare(&latent, full);
            let missed = stop.is_some_and(|b| !b.meets(&f));
            fidelity.push(f);
            if missed {
                break;
            }
        }
        let n = fidelity.len() as f64;
        Ok(Outcome {
            flops: flops as f64 / n,
            calls_computed: calls as f64 / n,
            calls_total: total / fidelity.len(),
            fidelity,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Convert `pass` and run it (see [`Evaluator::run`]).
    pub fn evaluate(&mut self, pass: Option<&PassSpec>, stop: Option<&Budget>) -> Result<Outcome> {
        let start = Instant::now();
        let (path, _) = self.convert(pass)?;
        let mut outcome = self.run(&path, stop)?;
        outcome.seconds = start.elapsed().as_secs_f64();
        Ok(outcome)
    }

    /// Per step, the largest traced metric over the branches and cases of a run of `pass` (which must
    /// compute every call), null where no call measured one.
    fn traced_drift(&mut self, pass: &PassSpec) -> Result<Vec<Option<f64>>> {
        let (path, _) = self.convert(Some(pass))?;
        let bundle = Bundle::open(&path)?;
        let mut drift = vec![None::<f64>; bundle.sampler.steps()];
        for (name, inputs) in &self.cases {
            let (_, report) = run_case(&bundle, inputs, name)?;
            for step in &report.trace {
                for call in step.branches.values() {
                    if let Some(m) = call.metric.filter(|m| m.is_finite()) {
                        let d = &mut drift[step.step];
                        *d = Some(d.map_or(m, |v| v.max(m)));
                    }
                }
            }
        }
        Ok(drift)
    }

    pub fn cases(&self) -> usize {
        self.cases.len()
    }

    /// The per-step drift of every value `broadcast-static` can table (each attention site's output,
    /// each block's MLP output) along the full model's run on the cases, per value (see
    /// [`value_drift`]) and per group (see [`group_drift`]).
    pub fn static_drift(&self) -> Result<StaticDrift> {
        use crate::calibration::profile::{find_quantities, profile, QuantityGroup};
        let bundle = Bundle::open(&self.full_manifest)?;
        let map = crate::analysis::analyse(&bundle.model);
        let (found, _) = find_quantities(&bundle.model, &bundle.io.prediction);
        let mut owners: BTreeMap<String, (usize, Group)> = BTreeMap::new();
        let mut quantities = Vec::new();
        for q in found {
            let owner = match q.group {
                QuantityGroup::Attention => q
                    .name
                    .strip_prefix("attention.")
                    .and_then(|id| id.parse::<usize>().ok())
                    .and_then(|id| {
                        let site = map.attention.iter().find(|s| s.id == id)?;
                        let block = map.block_of(id)?;
                        Some((block.index, Group::from(site.kind)))
                    }),
                QuantityGroup::Mlp => q
                    .name
                    .strip_prefix("mlp.")
                    .and_then(|b| b.parse::<usize>().ok())
                    .map(|b| (b, Group::Mlp)),
                _ => None,
            };
            if let Some(owner) = owner {
                owners.insert(q.name.clone(), owner);
                quantities.push(q);
            }
        }
        if quantities.is_empty() {
            return Ok(StaticDrift::default());
        }
        let calibration = full_run_calibration(&bundle);
        let cases: Vec<Vec<Tensor>> = self.cases.iter().map(|c| c.1.clone()).collect();
        let names: Vec<String> = self.cases.iter().map(|c| c.0.clone()).collect();
        let p = profile(&calibration, &quantities, Vec::new(), &cases, &names, false)?;
        let values: BTreeMap<String, ValueDrift> = owners
            .into_iter()
            .map(|(name, (block, group))| {
                let drift = value_drift(&p, &name);
                (
                    name,
                    ValueDrift {
                        block,
                        group,
                        drift,
                    },
                )
            })
            .collect();
        Ok(StaticDrift {
            groups: group_drift(&values),
            values,
        })
    }

    /// The number of transformer blocks of the model (from the full model's bundle).
    pub fn blocks(&self) -> usize {
        self.full_blocks
    }
}

/// Sample one case (its tensors `noise` and the condition inputs).
fn run_case(bundle: &Bundle, inputs: &[Tensor], name: &str) -> Result<(Vec<f32>, RunReport)> {
    let noise = inputs
        .iter()
        .find(|t| t.name == "noise")
        .with_context(|| format!("case {name} has no tensor 'noise' (the initial latent)"))?;
    let (latent, report) = sample(bundle, noise, inputs, false, false)
        .with_context(|| format!("sampling case {name}"))?;
    Ok((
        latent.to_f32_vec().context("the latent is not f32")?,
        report,
    ))
}

fn pass(options: toml::Table) -> PassSpec {
    PassSpec {
        name: "broadcast-adaptive".into(),
        options,
    }
}

fn options(pairs: &[(&str, toml::Value)]) -> toml::Table {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// What each policy's metric measured along the full model's run (see the module doc).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Drift {
    /// first-block-cache's metric with every call computing: the first block's residual's relative L1
    /// change from the previous step.
    pub first_block: Vec<Option<f64>>,
    /// easy-cache's accumulated estimate with every call computing: the estimated relative change of
    /// the output over one step.
    pub easy_cache: Vec<Option<f64>>,
    /// MagCache's magnitude ratios of the stack residual (the conditional branch's, averaged over the
    /// cases).
    pub mag_ratios: Vec<f64>,
    /// tea-cache's rescaled indicator per step (from the conversion: it depends only on the timestep).
    pub tea_cache: Vec<Option<f64>>,
    /// static-table's drift per group (attention kinds, `mlp`) and per value: see [`StaticDrift`].
    pub static_table: StaticDrift,
}

/// The profiled drift of the values static tables can reuse.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StaticDrift {
    /// Per group (attention kinds, `mlp`): see [`group_drift`].
    pub groups: BTreeMap<Group, Vec<Option<f64>>>,
    /// Per value (`attention.<site>`, `mlp.<block>`): its block, group and drift ([`value_drift`]).
    pub values: BTreeMap<String, ValueDrift>,
}

/// One value's drift and where its table goes.
#[derive(Clone, Debug, Serialize)]
pub struct ValueDrift {
    pub block: usize,
    pub group: Group,
    pub drift: Vec<Option<f64>>,
}

/// Per step: the largest relative L1 change of the profile quantity `name` to the previous step over
/// the branches and cases; null at step 0 and where none was measured.
pub fn value_drift(profile: &crate::calibration::profile::Profile, name: &str) -> Vec<Option<f64>> {
    let Some(q) = profile.quantity(name) else {
        return vec![None; profile.steps];
    };
    (0..profile.steps)
        .map(|step| {
            q.values
                .values()
                .flatten()
                .filter_map(|case| case.get(step).copied().flatten())
                .reduce(f64::max)
        })
        .collect()
}

/// Per group and step: the mean, over the group's values, of each value's drift; null where no
/// value has one.
pub fn group_drift(values: &BTreeMap<String, ValueDrift>) -> BTreeMap<Group, Vec<Option<f64>>> {
    let mut members: BTreeMap<Group, Vec<&ValueDrift>> = BTreeMap::new();
    for v in values.values() {
        members.entry(v.group).or_default().push(v);
    }
    members
        .into_iter()
        .map(|(group, vs)| {
            let steps = vs.iter().map(|v| v.drift.len()).max().unwrap_or(0);
            let drift = (0..steps)
                .map(|step| {
                    let per_value: Vec<f64> = vs
                        .iter()
                        .filter_map(|v| v.drift.get(step).copied().flatten())
                        .collect();
                    (!per_value.is_empty())
                        .then(|| per_value.iter().sum::<f64>() / per_value.len() as f64)
                })
                .collect();
            (group, drift)
        })
        .collect()
}

/// A static table from one group's per-step drift: step 0 computes; a later step reuses the value
/// cached at the last computed step while the drift accumulated since then (this step's included)
/// stays at most `threshold`, and computes (restarting the sum) once it would exceed it, or where no
/// drift was measured.
pub fn table_from_drift(drift: &[Option<f64>], threshold: f64) -> Vec<bool> {
    let mut accumulated = 0.0;
    drift
        .iter()
        .enumerate()
        .map(|(step, d)| match d {
            Some(d) if step > 0 && accumulated + d <= threshold => {
                accumulated += d;
                false
            }
            _ => {
                accumulated = 0.0;
                true
            }
        })
        .collect()
}

/// The `broadcast-static` pass of explicit tables for `threshold` times each group's scale (groups
/// without a scale are not cached; tables that compute every step are left out).
pub fn static_table_pass(
    drift: &BTreeMap<Group, Vec<Option<f64>>>,
    scales: &BTreeMap<Group, f64>,
    threshold: f64,
) -> PassSpec {
    let mut table = toml::Table::new();
    for (group, scale) in scales {
        let Some(d) = drift.get(group) else { continue };
        let t = table_from_drift(d, threshold * scale);
        if t.contains(&false) {
            table.insert(group.as_str().into(), ExplicitTables::pattern(&t).into());
        }
    }
    PassSpec {
        name: "broadcast-static".into(),
        options: options(&[("table", table.into())]),
    }
}

/// The `broadcast-static` pass of per-block tables: each value's table from its own drift at
/// `threshold` times its scale (values without a scale are not cached; tables that compute every step
/// are left out).
pub fn block_table_pass(
    values: &BTreeMap<String, ValueDrift>,
    scales: &BTreeMap<String, f64>,
    threshold: f64,
) -> PassSpec {
    let mut blocks: BTreeMap<String, toml::Table> = BTreeMap::new();
    for (name, scale) in scales {
        let Some(v) = values.get(name) else { continue };
        let t = table_from_drift(&v.drift, threshold * scale);
        if t.contains(&false) {
            blocks
                .entry(v.block.to_string())
                .or_default()
                .insert(v.group.as_str().into(), ExplicitTables::pattern(&t).into());
        }
    }
    let blocks: toml::Table = blocks.into_iter().map(|(k, v)| (k, v.into())).collect();
    let table = options(&[("blocks", blocks.into())]);
    PassSpec {
        name: "broadcast-static".into(),
        options: options(&[("table", table.into())]),
    }
}

/// A policy whose threshold is searched.
#[derive(Clone, Debug, Serialize)]
struct Family {
    label: String,
    /// The name `--policies` gives it.
    policy: &'static str,
    /// The options without `threshold`.
    #[serde(skip)]
    options: toml::Table,
    lo: f64,
    hi: f64,
    /// Decisions known at conversion (a table): tried tables are not run twice.
    table: bool,
    /// static-table: per group, the factor of the threshold its table is built with.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    scales: BTreeMap<Group, f64>,
    /// static-table per block: per value (`attention.<site>`, `mlp.<block>`), the factor of the
    /// threshold its own table is built with.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    value_scales: BTreeMap<String, f64>,
}

impl Family {
    /// The candidate at `threshold`.
    fn candidate(&self, threshold: f64, drift: &Drift) -> PassSpec {
        if self.policy == STATIC_TABLE && !self.value_scales.is_empty() {
            return block_table_pass(&drift.static_table.values, &self.value_scales, threshold);
        }
        if self.policy == STATIC_TABLE {
            return static_table_pass(&drift.static_table.groups, &self.scales, threshold);
        }
        let mut o = self.options.clone();
        o.insert("threshold".into(), threshold.into());
        pass(o)
    }
}

/// One candidate of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Tried {
    pub index: usize,
    pub label: String,
    pub policy: String,
    pub options: serde_json::Value,
    pub threshold: Option<f64>,
    /// Computed FLOPs per run relative to the full model's.
    pub flops_relative: f64,
    pub flops: f64,
    pub calls_computed: f64,
    pub calls_total: usize,
    /// Per case run, and the worst over them.
    pub fidelity: Vec<Fidelity>,
    pub worst: Option<Fidelity>,
    /// Whether every calibration case met the budget (cases after a miss are not run).
    pub meets: bool,
    /// Not run: its table computes at least the best FLOPs so far, so it cannot win.
    pub pruned: bool,
    pub seconds: f64,
    /// Why it was not run, or what it repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    pub pass: Option<PassSpec>,
}

/// The tuner's report (`tuned.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub model: String,
    pub base_recipe: String,
    pub cases: Vec<String>,
    /// What every candidate was checked against: `target` scaled by `margin`.
    pub budget: Budget,
    pub target: Budget,
    pub margin: f64,
    pub steps: usize,
    pub full_flops: u64,
    pub drift: Drift,
    pub families: Vec<serde_json::Value>,
    pub candidates: Vec<Tried>,
    /// The winner's index in `candidates`.
    pub winner: usize,
    pub stopped_by_time_limit: bool,
    pub seconds: f64,
}

/// The tuner: search over `evaluator`'s cases for the cheapest candidate meeting `budget`.
pub struct Tuner<'a> {
    pub evaluator: &'a mut Evaluator,
    /// The user's budget; candidates are checked against it scaled by `margin`.
    pub budget: Budget,
    /// See [`Budget::with_margin`] (1: the budget itself).
    pub margin: f64,
    pub iterations: usize,
    pub time_limit: Option<f64>,
    pub progress: bool,
    /// The policies searched (empty: all).
    pub policies: Vec<String>,
}

impl Tuner<'_> {
    pub fn tune(&mut self, model: &str, base_recipe: &str) -> Result<Report> {
        let start = Instant::now();
        let steps = self
            .evaluator
            .base
            .sampler
            .as_ref()
            .context("the base recipe has no [sampler]")?
            .steps();
        let bar = crate::progress::steps_bar(4, "tune: measuring drift", self.progress);
        let drift = self.measure_drift(steps)?;
        bar.inc(4);
        let families = self.families(&drift, steps);
        let families: Vec<Family> = families
            .into_iter()
            .filter(|f| self.wants(f.policy))
            .collect();
        let ladders: Vec<Ladder> = self
            .ladders()
            .into_iter()
            .filter(|l| self.wants(l.policy))
            .collect();
        let rungs: usize = ladders.iter().map(|l| l.rungs.len()).sum();
        bar.set_length(4 + (families.len() * self.iterations + rungs) as u64);
        let full = self.evaluator.full_flops as f64;
        let mut report = Report {
            format: "ditc-tune-report",
            model: model.into(),
            base_recipe: base_recipe.into(),
            cases: self.evaluator.cases.iter().map(|c| c.0.clone()).collect(),
            budget: self.budget.with_margin(self.margin),
            target: self.budget,
            margin: self.margin,
            steps,
            full_flops: self.evaluator.full_flops,
            drift,
            families: families
                .iter()
                .map(|f| serde_json::to_value(f).expect("serialisable"))
                .collect(),
            candidates: vec![Tried {
                index: 0,
                label: "none (the full model)".into(),
                policy: "none".into(),
                options: serde_json::Value::Null,
                threshold: None,
                flops_relative: 1.0,
                flops: full,
                calls_computed: f64::NAN,
                calls_total: 0,
                fidelity: Vec::new(),
                worst: None,
                meets: true,
                pruned: false,
                seconds: 0.0,
                note: Some("the reference itself: meets any budget".into()),
                pass: None,
            }],
            winner: 0,
            stopped_by_time_limit: false,
            seconds: 0.0,
        };
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        'families: for family in &families {
            let (mut lo, mut hi) = (family.lo.ln(), family.hi.ln());
            for _ in 0..self.iterations {
                if self.out_of_time(start) {
                    report.stopped_by_time_limit = true;
                    break 'families;
                }
                let threshold = ((lo + hi) / 2.0).exp();
                bar.set_message(format!("tune: {} threshold {threshold:.4}", family.label));
                let candidate = family.candidate(threshold, &report.drift);
                let mut tried =
                    self.try_candidate(&family.label, candidate, family.table, &mut seen, &report)?;
                tried.threshold = Some(threshold);
                bar.inc(1);
                let (meets, pruned, flops) = (tried.meets, tried.pruned, tried.flops);
                let best = report.candidates[report.winner].flops;
                report.candidates.push(tried);
                if meets || pruned {
                    if meets && flops < best {
                        report.winner = report.candidates.len() - 1;
                    }
                    lo = threshold.ln();
                } else {
                    hi = threshold.ln();
                    if flops >= best {
                        // Every smaller threshold computes at least these FLOPs: none can win.
                        break;
                    }
                }
            }
        }
        'ladders: for ladder in &ladders {
            for (label, pass) in &ladder.rungs {
                if report.stopped_by_time_limit || self.out_of_time(start) {
                    report.stopped_by_time_limit = true;
                    break 'ladders;
                }
                bar.set_message(format!("tune: {label}"));
                let tried =
                    self.try_candidate(label, pass.clone(), ladder.table, &mut seen, &report)?;
                bar.inc(1);
                let (meets, pruned) = (tried.meets, tried.pruned);
                if meets && tried.flops < report.candidates[report.winner].flops {
                    report.winner = report.candidates.len();
                }
                report.candidates.push(tried);
                if !meets && !pruned {
                    // The next rungs skip more: they would miss too (or the policy does not apply).
                    continue 'ladders;
                }
            }
        }
        bar.finish_and_clear();
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// The discrete searches, each a ladder of candidates that skip more and more (see [`Ladder`]).
    fn ladders(&self) -> Vec<Ladder> {
        let mut out = ada_ladders(self.evaluator.blocks());
        out.extend(pab_ladders());
        out
    }

    fn wants(&self, policy: &str) -> bool {
        self.policies.is_empty() || self.policies.iter().any(|p| p == policy)
    }

    fn out_of_time(&self, start: Instant) -> bool {
        self.time_limit
            .is_some_and(|l| start.elapsed().as_secs_f64() >= l)
    }

    /// Convert `pass`; unless its table was tried or cannot beat the best, run it.
    fn try_candidate(
        &mut self,
        label: &str,
        pass: PassSpec,
        table: bool,
        seen: &mut BTreeMap<String, usize>,
        report: &Report,
    ) -> Result<Tried> {
        let start = Instant::now();
        let full = self.evaluator.full_flops as f64;
        let mut tried = Tried {
            index: report.candidates.len(),
            label: label.into(),
            policy: policy_of(&pass).into(),
            options: serde_json::to_value(&pass.options)?,
            threshold: pass.options.get("threshold").and_then(|t| t.as_float()),
            flops_relative: f64::NAN,
            flops: f64::NAN,
            calls_computed: f64::NAN,
            calls_total: 0,
            fidelity: Vec::new(),
            worst: None,
            meets: false,
            pruned: false,
            seconds: 0.0,
            note: None,
            pass: Some(pass.clone()),
        };
        let (path, manifest) = match self.evaluator.convert(Some(&pass)) {
            Ok(c) => c,
            Err(e) => {
                tried.note = Some(format!("not applicable to this model: {e:#}"));
                return Ok(tried);
            }
        };
        if table {
            let schedule = manifest.schedule.as_ref();
            // PAB presets that give the same tables are the same schedule; a forecast changes what a
            // table policy's same table computes, so there the label (which names it) is the key.
            let family = if pass.name == "broadcast-static" {
                PAB
            } else {
                label
            };
            let key = format!(
                "{family}/{}",
                serde_json::to_string(&schedule.map(|s| (
                    &s.tables,
                    &s.uncond_tables,
                    &s.block_tables
                )))?
            );
            let planned = manifest.cost.model_flops_scheduled as f64;
            if let Some(&i) = seen.get(&key) {
                let same = &report.candidates[i];
                tried.note = Some(format!("the same table as candidate {i}: not run again"));
                tried.flops = same.flops;
                tried.flops_relative = same.flops_relative;
                tried.calls_computed = same.calls_computed;
                tried.calls_total = same.calls_total;
                tried.fidelity = same.fidelity.clone();
                tried.worst = same.worst.clone();
                tried.meets = same.meets;
                return Ok(tried);
            }
            let best = report.candidates[report.winner].flops;
            if planned >= best {
                // Whether it meets the budget or not, it cannot win: the search moves on to larger
                // thresholds, the only ones that can.
                tried.note = Some(format!(
                    "its table computes {:.1}% of full FLOPs, not below the best so far: not run",
                    100.0 * planned / full
                ));
                tried.flops = planned;
                tried.flops_relative = planned / full;
                tried.pruned = true;
                return Ok(tried);
            }
            seen.insert(key, tried.index);
        }
        let budget = report.budget;
        let o = self.evaluator.run(&path, Some(&budget))?;
        tried.meets = o.fidelity.len() == self.evaluator.cases()
            && o.fidelity.iter().all(|f| budget.meets(f));
        tried.flops = o.flops;
        tried.flops_relative = o.flops / full;
        tried.calls_computed = o.calls_computed;
        tried.calls_total = o.calls_total;
        tried.worst = worst(&o.fidelity);
        tried.fidelity = o.fidelity;
        tried.seconds = start.elapsed().as_secs_f64();
        Ok(tried)
    }

    /// The full model's drift as each policy measures it (every call computing).
    fn measure_drift(&mut self, steps: usize) -> Result<Drift> {
        let e = &mut *self.evaluator;
        let mut drift = Drift::default();
        let fbc = options(&[
            ("policy", "first-block-cache".into()),
            ("threshold", 0.0.into()),
        ]);
        let wants = |p: &str| self.policies.is_empty() || self.policies.iter().any(|q| q == p);
        if wants("first-block-cache") {
            drift.first_block = e.traced_drift(&pass(fbc)).unwrap_or_default();
        }
        if steps > 2 && wants("easy-cache") {
            let easy = options(&[
                ("policy", "easy-cache".into()),
                ("threshold", 0.0.into()),
                ("warmup_steps", 0.into()),
                ("per_branch", e.base.guidance.is_some().into()),
            ]);
            drift.easy_cache = e.traced_drift(&pass(easy)).unwrap_or_default();
        }
        if wants("mag-cache") {
            drift.mag_ratios = mag_ratios(e).unwrap_or_default();
        }
        // Opt-in (`--policies static-table`): on wan-small its tables saved next to nothing so far.
        if self.policies.iter().any(|q| q == STATIC_TABLE) {
            drift.static_table = e.static_drift().unwrap_or_default();
        }
        let tea = options(&[
            ("policy", "tea-cache".into()),
            ("threshold", 0.0.into()),
            ("coefficients", tea_coefficients(&e.base).into()),
        ]);
        if !wants("tea-cache") {
            return Ok(drift);
        }
        if let Ok((_, m)) = e.convert(Some(&pass(tea))) {
            drift.tea_cache = m
                .schedule
                .and_then(|s| s.metrics)
                .and_then(|mut m| m.remove(&Branch::Cond))
                .unwrap_or_default();
        }
        Ok(drift)
    }

    /// The threshold families, each with its bounds from the drift (families without drift, i.e. not
    /// applicable to this model, are left out).
    fn families(&self, drift: &Drift, steps: usize) -> Vec<Family> {
        let forecasts: [Option<i64>; 3] = [None, Some(1), Some(2)];
        let with_forecast = |mut o: toml::Table, order: Option<i64>| {
            if let Some(order) = order {
                o.insert("forecast".into(), "taylor".into());
                o.insert("order".into(), order.into());
            }
            o
        };
        let suffix = |order: Option<i64>| match order {
            None => String::new(),
            Some(k) => format!(" + taylor {k}"),
        };
        let mut out = Vec::new();
        if let Some((lo, hi)) = bounds(&drift.easy_cache) {
            let mut warmups = vec![(steps / 5).max(1), (steps / 10).max(1)];
            warmups.dedup();
            for warmup in warmups.into_iter().filter(|w| w + 1 < steps) {
                for order in forecasts {
                    let o = options(&[
                        ("policy", "easy-cache".into()),
                        ("warmup_steps", (warmup as i64).into()),
                    ]);
                    out.push(Family {
                        policy: "easy-cache",
                        scales: BTreeMap::new(),
                        value_scales: BTreeMap::new(),
                        label: format!("easy-cache warm-up {warmup}{}", suffix(order)),
                        options: with_forecast(o, order),
                        lo,
                        hi,
                        table: false,
                    });
                }
            }
        }
        if let Some((lo, hi)) = mag_bounds(&drift.mag_ratios, steps) {
            for order in forecasts {
                let ratios: Vec<toml::Value> = drift.mag_ratios.iter().map(|&r| r.into()).collect();
                let o = options(&[
                    ("policy", "mag-cache".into()),
                    ("mag_ratios", ratios.into()),
                ]);
                out.push(Family {
                    policy: "mag-cache",
                    scales: BTreeMap::new(),
                    value_scales: BTreeMap::new(),
                    label: format!("mag-cache{}", suffix(order)),
                    options: with_forecast(o, order),
                    lo,
                    hi,
                    table: true,
                });
            }
        }
        if let Some((lo, hi)) = bounds(&drift.tea_cache) {
            for order in forecasts {
                let o = options(&[
                    ("policy", "tea-cache".into()),
                    (
                        "coefficients",
                        tea_coefficients(&self.evaluator.base).into(),
                    ),
                ]);
                out.push(Family {
                    policy: "tea-cache",
                    scales: BTreeMap::new(),
                    value_scales: BTreeMap::new(),
                    label: format!("tea-cache{}", suffix(order)),
                    options: with_forecast(o, order),
                    lo,
                    hi,
                    table: true,
                });
            }
        }
        if let Some((lo, hi)) = bounds(&drift.first_block) {
            out.push(Family {
                label: "first-block-cache".into(),
                policy: "first-block-cache",
                options: options(&[("policy", "first-block-cache".into())]),
                lo,
                hi,
                table: false,
                scales: BTreeMap::new(),
                value_scales: BTreeMap::new(),
            });
        }
        out.extend(static_families(&drift.static_table.groups));
        out.extend(block_families(&drift.static_table.values));
        out
    }
}

/// The `policy` a report names for `pass`: `static-table` for `broadcast-static` with explicit
/// tables, `pab` for other `broadcast-static` passes, else its `policy` option (easy-cache, the
/// default, when absent).
fn policy_of(pass: &PassSpec) -> &str {
    if pass.name == "broadcast-static" {
        return match pass.options.contains_key("table") {
            true => STATIC_TABLE,
            false => PAB,
        };
    }
    pass.options
        .get("policy")
        .and_then(|p| p.as_str())
        .unwrap_or("easy-cache")
}

/// The name `--policies` gives PAB (`broadcast-static`).
const PAB: &str = "pab";

/// The name `--policies` gives `broadcast-static` tables built from the profile's drift.
const STATIC_TABLE: &str = "static-table";

/// static-table's families, each a threshold bisected as the others' (static tables: tried tables
/// and those computing at least the best FLOPs are not run). Per set of groups (every group; the
/// attention groups only, the MLPs computing), one threshold for every group (in units of relative
/// L1 change), and one per group in proportion to the group's mean drift (each group reuses over the
/// same multiple of its typical step). Bounds as [`bounds`]: below every step's drift every table
/// computes every step; above the largest sum every table reuses from step 1 on.
fn static_families(drift: &BTreeMap<Group, Vec<Option<f64>>>) -> Vec<Family> {
    let mut out = Vec::new();
    type Keep = fn(&Group) -> bool;
    let sets: [(&str, Keep); 2] = [
        ("every group", |_| true),
        ("attention only", |g| *g != Group::Mlp),
    ];
    for (i, (what, keep)) in sets.into_iter().enumerate() {
        let groups: Vec<Group> = drift.keys().copied().filter(keep).collect();
        if groups.is_empty() || (i > 0 && groups.len() == drift.len()) {
            continue;
        }
        for proportional in [false, true] {
            let scales = threshold_scales(drift, &groups, proportional);
            let Some((lo, hi)) = scaled_bounds(drift, &scales) else {
                continue;
            };
            let names: Vec<&str> = scales.keys().map(|g| g.as_str()).collect();
            out.push(Family {
                label: format!(
                    "static-table {what} ({}), {}",
                    names.join(", "),
                    scaling_label(proportional, "group")
                ),
                policy: STATIC_TABLE,
                options: toml::Table::new(),
                lo,
                hi,
                table: true,
                scales,
                value_scales: BTreeMap::new(),
            });
        }
    }
    out
}

/// static-table's per-block families: every value (each attention site's and MLP's output) gets a
/// table of its own from its own drift, in its block (`table.blocks`); per set of values (every one;
/// attention only), one threshold for all, and one in proportion to each value's mean drift.
fn block_families(values: &BTreeMap<String, ValueDrift>) -> Vec<Family> {
    let drift: BTreeMap<String, Vec<Option<f64>>> = values
        .iter()
        .map(|(k, v)| (k.clone(), v.drift.clone()))
        .collect();
    let mut out = Vec::new();
    for (i, what) in ["every value", "attention only"].into_iter().enumerate() {
        let names: Vec<String> = values
            .iter()
            .filter(|(_, v)| i == 0 || v.group != Group::Mlp)
            .map(|(k, _)| k.clone())
            .collect();
        if names.is_empty() || (i > 0 && names.len() == values.len()) {
            continue;
        }
        for proportional in [false, true] {
            let value_scales = threshold_scales(&drift, &names, proportional);
            let Some((lo, hi)) = scaled_bounds(&drift, &value_scales) else {
                continue;
            };
            out.push(Family {
                label: format!(
                    "static-table per block, {what} ({} values), {}",
                    value_scales.len(),
                    scaling_label(proportional, "value")
                ),
                policy: STATIC_TABLE,
                options: toml::Table::new(),
                lo,
                hi,
                table: true,
                scales: BTreeMap::new(),
                value_scales,
            });
        }
    }
    out
}

fn scaling_label(proportional: bool, unit: &str) -> String {
    match proportional {
        true => format!("thresholds in proportion to each {unit}'s mean drift"),
        false => "one threshold".into(),
    }
}

/// Per key of `keys`: the factor of the threshold its table is built with, 1 or (`proportional`)
/// the mean of its drift (keys without a positive mean are left out).
fn threshold_scales<K: Ord + Clone>(
    drift: &BTreeMap<K, Vec<Option<f64>>>,
    keys: &[K],
    proportional: bool,
) -> BTreeMap<K, f64> {
    let mean = |d: &[Option<f64>]| {
        let v: Vec<f64> = d.iter().flatten().copied().collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    keys.iter()
        .filter_map(|k| {
            let scale = match proportional {
                true => mean(drift.get(k)?).filter(|m| *m > 0.0)?,
                false => 1.0,
            };
            Some((k.clone(), scale))
        })
        .collect()
}

/// The bounds of the threshold before scaling: those of each key's drift over its scale (see
/// [`bounds`]), the smallest lower and the largest upper one.
fn scaled_bounds<K: Ord>(
    drift: &BTreeMap<K, Vec<Option<f64>>>,
    scales: &BTreeMap<K, f64>,
) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for (k, scale) in scales {
        let Some(d) = drift.get(k) else { continue };
        let scaled: Vec<Option<f64>> = d.iter().map(|d| d.map(|d| d / scale)).collect();
        if let Some((l, h)) = bounds(&scaled) {
            lo = lo.min(l);
            hi = hi.max(h);
        }
    }
    (lo.is_finite() && hi > lo).then_some((lo, hi))
}

/// A discrete search: candidates ordered from the one that skips least to the one that skips most, run
/// in order until one misses the budget (the rest skip more, so they would miss too) or does not
/// apply. With `table` (decisions known at conversion: PAB), a candidate whose table computes at
/// least the best FLOPs so far is not run, nor one whose table was already tried.
struct Ladder {
    policy: &'static str,
    table: bool,
    rungs: Vec<(String, PassSpec)>,
}

/// AdaCache: the codebook is not a threshold. Per measured block (the middle one, the reference's
/// default, and the last-but-one) and residual (self-attention, cross-attention + MLP), with and
/// without forecasting (order 1), the paper's codebooks from the slowest to the fastest, MoReg off;
/// then the defaults (MoReg on) alone.
fn ada_ladders(blocks: usize) -> Vec<Ladder> {
    let mut measured = vec![(blocks.max(1) - 1) / 2];
    if blocks >= 3 && blocks - 2 != measured[0] {
        measured.push(blocks - 2);
    }
    let mut out = Vec::new();
    for &block in &measured {
        for residual in ["attention", "cross-mlp"] {
            for order in [None, Some(1i64)] {
                let rungs = ["30-step-slow", "30-step-fast", "100-step"]
                    .iter()
                    .map(|codebook| {
                        let mut o = options(&[
                            ("policy", "ada-cache".into()),
                            ("codebook", (*codebook).into()),
                            ("block", (block as i64).into()),
                            ("residual", residual.into()),
                            ("moreg", false.into()),
                        ]);
                        let mut label =
                            format!("ada-cache {codebook}, block {block} {residual}, no MoReg");
                        if let Some(k) = order {
                            o.insert("forecast".into(), "taylor".into());
                            o.insert("order".into(), k.into());
                            label.push_str(&format!(" + taylor {k}"));
                        }
                        (label, pass(o))
                    })
                    .collect();
                out.push(Ladder {
                    policy: "ada-cache",
                    table: false,
                    rungs,
                });
            }
        }
    }
    out.push(Ladder {
        policy: "ada-cache",
        table: false,
        rungs: vec![(
            "ada-cache defaults (MoReg)".into(),
            pass(options(&[("policy", "ada-cache".into())])),
        )],
    });
    out
}

/// The published PAB presets (`schedules/pab/`), one candidate each.
const PAB_PRESETS: [(&str, &str); 6] = [
    ("latte", include_str!("../../schedules/pab/latte.toml")),
    (
        "open-sora",
        include_str!("../../schedules/pab/open-sora.toml"),
    ),
    (
        "open-sora-plan-v1.1",
        include_str!("../../schedules/pab/open-sora-plan-v1.1.toml"),
    ),
    (
        "open-sora-plan-v1.2",
        include_str!("../../schedules/pab/open-sora-plan-v1.2.toml"),
    ),
    (
        "cogvideox",
        include_str!("../../schedules/pab/cogvideox.toml"),
    ),
    (
        "vchitect",
        include_str!("../../schedules/pab/vchitect.toml"),
    ),
];

/// PAB (`broadcast-static`): the published presets, then per timestep window (PAB's (100, 800), and
/// (100, 950)) the pyramid of periods at levels 1-4: spatial (and full) attention `k + 1`, temporal
/// `k + 2`, cross `2 (k + 1)`; the kinds a model lacks are ignored. Every PAB schedule is a static
/// table: one that cannot beat the best FLOPs is not run.
fn pab_ladders() -> Vec<Ladder> {
    let static_pass = |options: toml::Table| PassSpec {
        name: "broadcast-static".into(),
        options,
    };
    let mut out: Vec<Ladder> = PAB_PRESETS
        .iter()
        .map(|(name, text)| Ladder {
            policy: PAB,
            table: true,
            rungs: vec![(
                format!("pab preset {name}"),
                static_pass(text.parse().expect("the preset parses")),
            )],
        })
        .collect();
    for window in [[100.0, 800.0], [100.0, 950.0]] {
        let rungs = (1..=4i64)
            .map(|k| {
                let kind = |period: i64| -> toml::Value {
                    let w: Vec<toml::Value> = window.iter().map(|&x| x.into()).collect();
                    options(&[("period", period.into()), ("window", w.into())]).into()
                };
                let o = options(&[
                    ("spatial", kind(k + 1)),
                    ("temporal", kind(k + 2)),
                    ("cross", kind(2 * (k + 1))),
                ]);
                (
                    format!(
                        "pab periods spatial {}, temporal {}, cross {} in ({}, {})",
                        k + 1,
                        k + 2,
                        2 * (k + 1),
                        window[0],
                        window[1]
                    ),
                    static_pass(o),
                )
            })
            .collect();
        out.push(Ladder {
            policy: PAB,
            table: true,
            rungs,
        });
    }
    out
}

/// A threshold below every step's drift computes every call; one above their sum skips all it may.
fn bounds(drift: &[Option<f64>]) -> Option<(f64, f64)> {
    let values: Vec<f64> = drift
        .iter()
        .flatten()
        .copied()
        .filter(|d| *d > 0.0)
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi: f64 = values.iter().sum();
    (lo.is_finite() && hi > lo).then_some((lo, hi))
}

/// MagCache's bounds: the smallest per-step error `|1 - ratio|` (from the retention step on) and the
/// largest error accumulated over the most steps it may skip in a row (3, diffusers' default).
fn mag_bounds(ratios: &[f64], steps: usize) -> Option<(f64, f64)> {
    let retention = (0.2 * steps as f64 + 0.5) as usize;
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for s in retention..ratios.len() {
        let step = (1.0 - ratios[s]).abs();
        if step > 0.0 {
            lo = lo.min(step);
        }
        let (mut acc, mut err) = (1.0, 0.0);
        for r in ratios.iter().skip(s).take(4) {
            acc *= r;
            err += (1.0 - acc).abs();
        }
        hi = hi.max(err);
    }
    (lo.is_finite() && hi > lo).then_some((lo, hi))
}

/// TeaCache's coefficients: the base recipe's if it names a tea-cache pass, else the published
/// Wan2.1-T2V-1.3B ones (TeaCache4Wan2.1; the model family TeaCache's indicator is implemented for).
fn tea_coefficients(base: &Recipe) -> Vec<toml::Value> {
    let given = base.passes.iter().find_map(|p| {
        let o = &p.options;
        (o.get("policy")?.as_str()? == "tea-cache")
            .then(|| o.get("coefficients")?.as_array().cloned())?
    });
    given.unwrap_or_else(|| {
        let preset: toml::Table = include_str!("../../schedules/teacache/wan2.1-t2v-1.3b.toml")
            .parse()
            .expect("the preset parses");
        preset["coefficients"]
            .as_array()
            .expect("the preset has coefficients")
            .clone()
    })
}

/// The full model's run of `bundle` (its sampler and guidance) as the calibration code drives it.
fn full_run_calibration(bundle: &Bundle) -> crate::calibration::mag_ratios::Calibration<'_> {
    crate::calibration::mag_ratios::Calibration {
        model: &bundle.model,
        io: &bundle.io,
        sampler: &bundle.sampler,
        guidance: bundle.manifest.guidance(),
        source: "ditc tune".into(),
    }
}

/// MagCache's ratios on the evaluator's cases, measured on the full model as `ditc calibrate
/// --mag-ratios` does.
pub fn mag_ratios(e: &Evaluator) -> Result<Vec<f64>> {
    let bundle = Bundle::open(&e.full_manifest)?;
    let calibration = full_run_calibration(&bundle);
    let cases: Vec<Vec<Tensor>> = e.cases.iter().map(|c| c.1.clone()).collect();
    Ok(crate::calibration::mag_ratios::calibrate(&calibration, &cases, false)?.cond)
}

pub fn run(args: &Args) -> Result<()> {
    args.threads.apply()?;
    let budget: Budget = args.budget.parse()?;
    if args.cases.is_empty() || args.cases.iter().any(|c| c.trim().is_empty()) {
        bail!("--cases: the list of calibration cases is empty (e.g. --cases 0,1)");
    }
    const POLICIES: [&str; 7] = [
        "easy-cache",
        "mag-cache",
        "tea-cache",
        "first-block-cache",
        "ada-cache",
        PAB,
        STATIC_TABLE,
    ];
    if let Some(p) = args
        .policies
        .iter()
        .find(|p| !POLICIES.contains(&p.as_str()))
    {
        bail!("--policies: unknown policy '{p}' (expected some of {POLICIES:?})");
    }
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    if !(args.margin > 0.0 && args.margin <= 1.0) {
        bail!(
            "--margin {}: expected a factor in (0, 1] (1: tune to the budget itself)",
            args.margin
        );
    }
    if let Some(l) = args.time_limit.filter(|l| !(l.is_finite() && *l > 0.0)) {
        bail!("--time-limit {l}: expected a positive number of seconds");
    }
    let base = Recipe::load(&args.recipe, &args.set)?;
    if let Some(p) = base
        .passes
        .iter()
        .find(|p| !p.name.starts_with("broadcast-"))
    {
        bail!(
            "the base recipe runs '{}': ditc tune searches caching passes only; give a recipe with a sampler and no other passes",
            p.name
        );
    }
    let work = tempfile_dir(&args.output)?;
    let result = tune_into(args, &base, budget, &work);
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    let winner = &report.candidates[report.winner];
    let mut text = format!(
        "# ditc tune: budget {} (margin {}: tuned to {} {}) on cases {:?} of {} ({} steps); winner: {} ({:.1}% of full FLOPs); report: {}\n",
        args.budget,
        args.margin,
        metric_name(report.budget.metric),
        report.budget.bound,
        args.cases,
        args.inputs.display(),
        report.steps,
        winner.label,
        100.0 * winner.flops_relative,
        report_path(&args.output).display()
    );
    text.push_str(&recipe_toml("tuned", &base, winner.pass.as_ref())?);
    crate::output::write_file_atomically(
        &report_path(&args.output),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    crate::output::write_file_atomically(&args.output, text.as_bytes())?;
    eprintln!(
        "tried {} candidates in {:.1}s{}; winner: {} at {:.1}% of full FLOPs",
        report.candidates.len() - 1,
        report.seconds,
        if report.stopped_by_time_limit {
            " (time limit reached)"
        } else {
            ""
        },
        winner.label,
        100.0 * winner.flops_relative
    );
    if let Some(w) = &winner.worst {
        eprintln!(
            "  worst over the calibration cases: PSNR {:.2} dB, cosine {:.5}, rel-L2 {:.4}",
            w.psnr_db, w.cosine, w.rel_l2
        );
    }
    eprintln!(
        "wrote {} and {}",
        args.output.display(),
        report_path(&args.output).display()
    );
    Ok(())
}

fn tune_into(args: &Args, base: &Recipe, budget: Budget, work: &Path) -> Result<Report> {
    let mut evaluator = Evaluator::new(
        &args.model,
        &args.shapes,
        base,
        &args.inputs,
        &args.cases,
        work,
    )?;
    let mut tuner = Tuner {
        evaluator: &mut evaluator,
        budget,
        margin: args.margin,
        iterations: args.iterations,
        time_limit: args.time_limit,
        progress: !args.no_progress,
        policies: args.policies.clone(),
    };
    tuner.tune(
        &args.model.display().to_string(),
        &args.recipe.display().to_string(),
    )
}

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::Psnr => "psnr",
        Metric::Cosine => "cosine",
        Metric::RelL2 => "rel-l2",
    }
}

/// `tuned.toml` -> `tuned.json`.
pub fn report_path(output: &Path) -> PathBuf {
    output.with_extension("json")
}

/// A scratch folder beside the output for the candidates' bundles (removed afterwards).
fn tempfile_dir(output: &Path) -> Result<PathBuf> {
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = parent.join(format!(".ditc-tune-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the scratch folder '{}'", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_tables_reuse_while_the_accumulated_drift_stays_within_the_threshold() {
        // Hand-worked at 0.75 (values exact in binary): step 0 computes; 0.25 and 0.25 + 0.5 = 0.75
        // reuse; 0.875 computes (the sum restarts); 0.75 reuses; no drift measured computes; 0.25
        // reuses.
        let drift = [
            None,
            Some(0.25),
            Some(0.5),
            Some(0.125),
            Some(0.75),
            None,
            Some(0.25),
        ];
        assert_eq!(
            table_from_drift(&drift, 0.75),
            [true, false, false, true, false, true, false]
        );
        // Below every step's drift everything computes; above their sum all but step 0 reuses.
        assert!(table_from_drift(&drift[1..], 0.1).iter().all(|&c| c));
        let all: Vec<Option<f64>> = drift.iter().map(|d| d.or(Some(0.0))).collect();
        assert_eq!(
            table_from_drift(&all, 2.0).iter().filter(|&&c| c).count(),
            1
        );
    }

    #[test]
    fn budgets_parse_and_bad_ones_are_refused() {
        let b: Budget = "rel-l2=0.1".parse().unwrap();
        assert_eq!((b.metric, b.bound), (Metric::RelL2, 0.1));
        assert_eq!("psnr=30".parse::<Budget>().unwrap().metric, Metric::Psnr);
        for (bad, says) in [
            ("psnr", "expected METRIC=VALUE"),
            ("ssim=0.9", "unknown metric 'ssim'"),
            ("rel-l2=abc", "not a finite number"),
            ("rel-l2=-1", ">= 0"),
            ("cosine=2", "[-1, 1]"),
        ] {
            let e = bad.parse::<Budget>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let f = |rel_l2| Fidelity {
            max_abs: 0.0,
            max_rel: 0.0,
            rel_l2,
            cosine: 1.0 - rel_l2,
            psnr_db: 30.0 - rel_l2,
        };
        assert!(b.meets(&f(0.1)) && !b.meets(&f(0.11)));
        let w = worst(&[f(0.05), f(0.2)]).unwrap();
        assert_eq!((w.rel_l2, w.cosine), (0.2, 0.8));
    }

    #[test]
    fn a_margin_scales_the_error() {
        let m = |b: &str, margin| b.parse::<Budget>().unwrap().with_margin(margin).bound;
        assert!((m("rel-l2=0.15", 0.8) - 0.12).abs() < 1e-15);
        // 20 log10(0.5) = -6.0206 dB; 1 - (1 - 0.99) * 0.25 = 0.9975.
        assert!((m("psnr=30", 0.5) - 36.0206).abs() < 1e-4);
        assert!((m("cosine=0.99", 0.5) - 0.9975).abs() < 1e-12);
        assert_eq!(m("psnr=30", 1.0), 30.0);
    }

    #[test]
    fn ladders_skip_more_at_every_rung() {
        // wan-small's 6 blocks: the middle block 2 and block 4; two residuals; with and without a
        // forecast: 8 codebook ladders, then the defaults.
        let ada = ada_ladders(6);
        assert_eq!(ada.len(), 9);
        assert_eq!(
            ada[0].rungs[0].0,
            "ada-cache 30-step-slow, block 2 attention, no MoReg"
        );
        assert_eq!(
            ada[7].rungs[2].0,
            "ada-cache 100-step, block 4 cross-mlp, no MoReg + taylor 1"
        );
        let pab = pab_ladders();
        assert_eq!(pab.len(), PAB_PRESETS.len() + 2);
        let pyramid = &pab.last().unwrap().rungs;
        let period =
            |i: usize, kind: &str| pyramid[i].1.options[kind]["period"].as_integer().unwrap();
        for i in 1..pyramid.len() {
            for kind in ["spatial", "temporal", "cross"] {
                assert!(period(i, kind) > period(i - 1, kind));
            }
        }
        for l in &pab {
            for (_, p) in &l.rungs {
                let o: crate::schedule::pab::PabOptions =
                    toml::Value::Table(p.options.clone()).try_into().unwrap();
                o.validate().unwrap();
            }
        }
    }

    #[test]
    fn drift_bounds_bracket_every_step() {
        assert_eq!(
            bounds(&[None, Some(0.5), Some(0.25), Some(0.0)]),
            Some((0.25, 0.75))
        );
        assert_eq!(bounds(&[None, None]), None);
        // Ratios 0.5 from the retention step (2 of 10) on: step error 0.5; four steps accumulate
        // 0.5 + 0.75 + 0.875 + 0.9375.
        let (lo, hi) = mag_bounds(&[0.5; 10], 10).unwrap();
        assert_eq!((lo, hi), (0.5, 3.0625));
    }
}
