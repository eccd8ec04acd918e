//! `ditc calibrate MODEL --recipe R --inputs IN --cases 1,2 -o stats.json`: activation ranges for W8A8.
//!
//! Runs the float graph with tract along real sampling trajectories (the recipe's sampler, from each
//! case's `noise` and condition inputs) and records, for every activation a quantized layer would read,
//! the largest |x| over all cases and the chosen steps. Writes the stats format documented in
//! [`crate::calibration`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::analysis::analyse;
use crate::calibration::{BudgetPoint, CalibrationStats, LayerSensitivity, TensorStats, FORMAT};
use crate::ir::{Tensor, ValueInfo, ValueType};
use crate::manifest::detect_io;
use crate::metrics::compare;
use crate::output::write_file_atomically;
use crate::passes::quantize_w8a8::{quantize_layers, select_targets, QuantizeOptions, Target};
use crate::recipe::Recipe;
use crate::runtime::sampling::timestep_tensor;
use crate::runtime::TractRunner;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  ditc calibrate examples/latte-tiny/model.onnx --recipe passes/w8a8.toml --inputs examples/latte-tiny/sampling.safetensors --cases 1,2 -o stats.json"
)]
pub struct Args {
    /// The float model: an .onnx file or a diffusers checkpoint folder.
    pub model: PathBuf,
    /// The recipe whose sampler drives the trajectories (and whose quantize-w8a8 options choose layers).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe option (as for convert). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Safetensors file with `noise` and the model's condition inputs, per case as `<case>.<name>`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Cases to calibrate on (comma-separated prefixes without the dot), e.g. `1,2`. Keep evaluation
    /// cases out.
    #[arg(long, value_delimiter = ',', required = true)]
    pub cases: Vec<String>,
    /// Use every N-th sampling step (1 = all).
    #[arg(long, default_value_t = 1)]
    pub every: usize,
    /// Range statistic: `max` (largest |x|) or `percentile` (the --percentile of |x| over a histogram).
    #[arg(long, default_value = "max")]
    pub method: String,
    /// Percentile of |x| for `--method percentile`.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// Only record steps whose timestep t satisfies lo <= t <= hi (e.g. `--window 100,900`).
    #[arg(long, value_delimiter = ',', value_name = "LO,HI")]
    pub window: Option<Vec<f64>>,
    /// Also rank the quantized layers by the fidelity lost when only that layer is quantized, and measure
    /// the final-latent fidelity when the k most sensitive layers stay in high precision (k = 0, 1, 2, 4,
    /// ...): the table `quantize-w8a8.budget_psnr` / `budget_cosine` choose from.
    #[arg(long)]
    pub sensitivity: bool,
    /// Where to write the statistics (JSON).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
}

pub fn run(args: &Args) -> Result<()> {
    if args.method != "max" && args.method != "percentile" {
        bail!("--method {}: expected `max` or `percentile`", args.method);
    }
    if !(args.percentile > 0.0 && args.percentile <= 100.0) {
        bail!("--percentile {} must be in (0, 100]", args.percentile);
    }
    match args.window.as_deref() {
        None => {}
        Some([lo, hi]) if lo <= hi => {}
        Some(w) => bail!("--window {w:?}: expected LO,HI with LO <= HI"),
    }
    if args.every == 0 {
        bail!("--every must be at least 1");
    }
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let sampler_config = recipe
        .sampler
        .clone()
        .context("the recipe has no [sampler]")?;
    let sampler = sampler_config.plan()?;
    let options: QuantizeOptions = match recipe.passes.iter().find(|p| p.name == "quantize-w8a8") {
        Some(p) => p
            .options
            .clone()
            .try_into()
            .context("invalid quantize-w8a8 options")?,
        None => QuantizeOptions::default(),
    };
    let all = crate::tensors::read_safetensors(&args.inputs)?;
    let model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    crate::finite::check_model(&args.model, &model, !args.no_progress)?;
    let map = analyse(&model);
    let io = detect_io(&model)?;
    let (targets, _) = select_targets(&model, &map, &options);
    if targets.is_empty() {
        bail!(
            "no layer to quantize was found in '{}'",
            args.model.display()
        );
    }
    let mut activations: Vec<String> = targets.iter().map(|t| t.activation.clone()).collect();
    activations.sort();
    activations.dedup();

    // Expose every activation as an extra graph output.
    let mut probe = model.clone();
    for a in &activations {
        probe.graph.outputs.push(ValueInfo {
            name: a.clone(),
            ty: ValueType::Tensor {
                dtype: None,
                shape: None,
            },
            doc_string: String::new(),
        });
    }
    let mut amax: BTreeMap<String, f32> = activations.iter().map(|a| (a.clone(), 0.0)).collect();
    let mut channel_amax: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut histograms: BTreeMap<String, Histogram> = activations
        .iter()
        .map(|a| (a.clone(), Histogram::new()))
        .collect();
    let bar = crate::progress::steps_bar(
        (args.cases.len() * sampler.steps()) as u64,
        "calibrating",
        !args.no_progress,
    );
    let mut runner: Option<TractRunner> = None;
    let mut samples = 0;
    let mut points: Vec<(Vec<Tensor>, Vec<f32>)> = Vec::new();
    let mut finals: Vec<Vec<f32>> = Vec::new();
    for case in &args.cases {
        let inputs = select_case(&all, case).with_context(|| format!("case {case}"))?;
        let trajectory = Trajectory {
            io: &io,
            sampler: &sampler,
            inputs: &inputs,
        };
        let x = trajectory.run(&probe, &mut runner, |i, feed, outputs| {
            let t_now = sampler.timesteps[i];
            let in_window = args
                .window
                .as_deref()
                .is_none_or(|w| w[0] <= t_now && t_now <= w[1]);
            if i % args.every == 0 && in_window {
                samples += 1;
                for t in outputs {
                    if let Some(m) = amax.get_mut(&t.name) {
                        let v = t.to_f32_vec().context("activations are float")?;
                        *m = v.iter().fold(*m, |acc, x| acc.max(x.abs()));
                        let k = *t.dims.last().unwrap_or(&1) as usize;
                        let c = channel_amax
                            .entry(t.name.clone())
                            .or_insert_with(|| vec![0.0; k]);
                        for row in v.chunks_exact(k.max(1)) {
                            for (m, x) in c.iter_mut().zip(row) {
                                *m = m.max(x.abs());
                            }
                        }
                        if args.method == "percentile" {
                            let h = histograms.get_mut(&t.name).expect("one per activation");
                            v.iter().for_each(|x| h.add(x.abs()));
                        }
                    }
                }
            }
            if args.sensitivity && i % SENSITIVITY_EVERY == 0 {
                let pred = outputs
                    .iter()
                    .find(|t| t.name == io.prediction)
                    .context("no prediction")?;
                points.push((feed.to_vec(), pred.to_f32_vec().context("f32 prediction")?));
            }
            bar.inc(1);
            Ok(())
        })?;
        finals.push(x);
    }
    bar.finish_and_clear();
    if samples == 0 {
        bail!("no step was recorded: --window and --every leave nothing");
    }
    if args.method == "percentile" {
        for (name, h) in &histograms {
            amax.insert(name.clone(), h.percentile(args.percentile));
        }
    }
    let method = if args.method == "percentile" {
        format!("percentile {}", args.percentile)
    } else {
        "max".into()
    };
    let mut stats = CalibrationStats {
        format: FORMAT.into(),
        version: 1,
        method,
        source: format!(
            "ditc calibrate {} on cases {:?} of {}, every {} step(s), timestep window {:?}",
            args.model.display(),
            args.cases,
            args.inputs.display(),
            args.every,
            args.window
        ),
        samples,
        tensors: amax
            .into_iter()
            .map(|(k, v)| {
                let channels = channel_amax.remove(&k);
                (
                    k,
                    TensorStats {
                        amax: v,
                        channel_amax: channels,
                    },
                )
            })
            .collect(),
        sensitivity: Vec::new(),
        budget: Vec::new(),
    };
    if args.sensitivity {
        let first = select_case(&all, &args.cases[0])?;
        stats.sensitivity = rank_layers(
            &model,
            &targets,
            &stats,
            &points,
            &io.prediction,
            !args.no_progress,
        )?;
        let trajectory = Trajectory {
            io: &io,
            sampler: &sampler,
            inputs: &first,
        };
        stats.budget = budget_table(
            &model,
            &targets,
            &stats,
            &trajectory,
            &finals[0],
            !args.no_progress,
        )?;
        for b in &stats.budget {
            eprintln!(
                "  keep {:>3} layers in high precision: PSNR {:>7.2} dB, cosine {:.6}",
                b.keep_float.len(),
                b.psnr_db,
                b.cosine
            );
        }
    }
    write_file_atomically(
        &args.output,
        serde_json::to_string_pretty(&stats)?.as_bytes(),
    )?;
    eprintln!(
        "wrote {}: {} activations over {} model calls",
        args.output.display(),
        stats.tensors.len(),
        samples
    );
    Ok(())
}

fn select_case(all: &[Tensor], case: &str) -> Result<Vec<Tensor>> {
    let prefix = format!("{case}.");
    let v = super::select_prefixed(all, &prefix);
    if v.is_empty() {
        bail!("no tensors named '{prefix}...' in the inputs");
    }
    Ok(v)
}

/// Sensitivity is measured at every this-many-th step of each calibration trajectory.
const SENSITIVITY_EVERY: usize = 10;

/// Layers by the mean relative L2 error of the prediction when only that layer is quantized.
fn rank_layers(
    model: &crate::ir::Model,
    targets: &[Target],
    stats: &CalibrationStats,
    points: &[(Vec<Tensor>, Vec<f32>)],
    prediction: &str,
    progress: bool,
) -> Result<Vec<LayerSensitivity>> {
    let bar = crate::progress::steps_bar(targets.len() as u64, "sensitivity", progress);
    let mut ranked = Vec::new();
    for t in targets {
        let mut m = model.clone();
        quantize_layers(&mut m, std::slice::from_ref(t), stats)?;
        let runner = TractRunner::new(&m, &points[0].0)?;
        let mut total = 0.0;
        for (feed, reference) in points {
            let out = runner.run(feed)?;
            let pred = out
                .iter()
                .find(|o| o.name == prediction)
                .context("no prediction")?;
            total += compare(&pred.to_f32_vec().context("f32")?, reference).rel_l2;
        }
        ranked.push(LayerSensitivity {
            node: t.node.clone(),
            rel_l2: total / points.len() as f64,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    ranked.sort_by(|a, b| b.rel_l2.total_cmp(&a.rel_l2));
    Ok(ranked)
}

struct Trajectory<'a> {
    io: &'a crate::manifest::ModelIo,
    sampler: &'a crate::schedule::Sampler,
    inputs: &'a [Tensor],
}

impl Trajectory<'_> {
    /// Sample with `model` from the case's `noise` and return the final latent. `on_step(i, feed,
    /// outputs)` sees every step; `runner` is the plan for `model`, made on first use and reusable.
    fn run(
        &self,
        model: &crate::ir::Model,
        runner: &mut Option<TractRunner>,
        mut on_step: impl FnMut(usize, &[Tensor], &[Tensor]) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let noise = self
            .inputs
            .iter()
            .find(|t| t.name == "noise")
            .context("no 'noise' tensor")?;
        let mut x = noise.to_f32_vec().context("noise must be f32")?;
        for i in 0..self.sampler.steps() {
            let mut feed: Vec<Tensor> = self
                .inputs
                .iter()
                .filter(|t| t.name != "noise")
                .cloned()
                .collect();
            feed.push(Tensor::from_f32(&self.io.latent, noise.dims.clone(), &x));
            feed.push(timestep_tensor(
                model,
                &self.io.timestep,
                self.sampler.timesteps[i],
            )?);
            if runner.is_none() {
                *runner = Some(TractRunner::new(model, &feed)?);
            }
            let out = runner.as_ref().expect("prepared").run(&feed)?;
            on_step(i, &feed, &out)?;
            let pred = out
                .iter()
                .find(|o| o.name == self.io.prediction)
                .context("no prediction")?;
            let pred = pred.to_f32_vec().context("f32 prediction")?;
            let n = x.len();
            self.sampler.step(i, &mut x, &pred[..n]);
        }
        Ok(x)
    }
}

/// Fidelity of the final latent (first calibration case) with the k most sensitive layers kept in
/// high precision, k = 0, 1, 2, 4, ... up to all of them.
fn budget_table(
    model: &crate::ir::Model,
    targets: &[Target],
    stats: &CalibrationStats,
    trajectory: &Trajectory,
    reference: &[f32],
    progress: bool,
) -> Result<Vec<BudgetPoint>> {
    let mut ks = vec![0usize];
    while *ks.last().expect("non-empty") < targets.len() {
        let next = (ks.last().expect("non-empty") * 2)
            .max(1)
            .min(targets.len());
        ks.push(next);
    }
    let bar = crate::progress::steps_bar(ks.len() as u64, "budget table", progress);
    let mut table = Vec::new();
    for k in ks {
        let keep: Vec<String> = stats
            .sensitivity
            .iter()
            .take(k)
            .map(|s| s.node.clone())
            .collect();
        let chosen: Vec<Target> = targets
            .iter()
            .filter(|t| !keep.contains(&t.node))
            .cloned()
            .collect();
        let mut m = model.clone();
        quantize_layers(&mut m, &chosen, stats)?;
        let f = compare(&trajectory.run(&m, &mut None, |_, _, _| Ok(()))?, reference);
        table.push(BudgetPoint {
            keep_float: keep,
            psnr_db: f.psnr_db.min(999.0),
            cosine: f.cosine,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(table)
}

/// A histogram of |x| with a fixed number of bins whose width doubles (merging pairs) when a larger
/// value arrives, so it needs no first pass to find the range.
struct Histogram {
    bins: Vec<u64>,
    width: f32,
}

const BINS: usize = 4096;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            bins: vec![0; BINS],
            width: 1e-6,
        }
    }

    fn add(&mut self, x: f32) {
        if !x.is_finite() {
            return;
        }
        while x >= self.width * BINS as f32 {
            for i in 0..BINS / 2 {
                self.bins[i] = self.bins[2 * i] + self.bins[2 * i + 1];
            }
            self.bins[BINS / 2..].iter_mut().for_each(|b| *b = 0);
            self.width *= 2.0;
        }
        self.bins[((x / self.width) as usize).min(BINS - 1)] += 1;
    }

    /// Upper edge of the bin where the cumulative count reaches `p` percent.
    fn percentile(&self, p: f64) -> f32 {
        let total: u64 = self.bins.iter().sum();
        let target = (total as f64 * p / 100.0).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.bins.iter().enumerate() {
            seen += b;
            if seen >= target.max(1) {
                return (i + 1) as f32 * self.width;
            }
        }
        BINS as f32 * self.width
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_percentiles() {
        let mut h = Histogram::new();
        for i in 1..=10_000 {
            h.add(i as f32 / 1000.0); // 0.001 .. 10.0, uniform
        }
        let p50 = h.percentile(50.0);
        assert!((p50 - 5.0).abs() < 0.01, "{p50}");
        let p100 = h.percentile(100.0);
        assert!((p100 - 10.0).abs() < 0.01, "{p100}");
        assert!(h.percentile(99.0) < p100);
    }
}
