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
use crate::calibration::{CalibrationStats, TensorStats, FORMAT};
use crate::ir::{Tensor, ValueInfo, ValueType};
use crate::manifest::detect_io;
use crate::output::write_file_atomically;
use crate::passes::quantize_w8a8::{select_targets, QuantizeOptions};
use crate::recipe::Recipe;
use crate::runtime::TractRunner;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  ditc calibrate examples/latte-tiny/model.onnx --recipe passes/w8a8.toml --inputs examples/latte-tiny/sampling.safetensors --cases 1,2 -o stats.json"
)]
pub struct Args {
    /// The float model (.onnx).
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
    /// Range statistic: only `max` is implemented.
    #[arg(long, default_value = "max")]
    pub method: String,
    /// Where to write the statistics (JSON).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.method != "max" {
        bail!(
            "--method {}: only `max` is implemented (percentile calibration is not yet)",
            args.method
        );
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
    let model = super::read_model_arg(&args.model)?;
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
    let steps: Vec<usize> = (0..sampler.steps()).collect();
    let bar = crate::progress::steps_bar(
        (args.cases.len() * steps.len()) as u64,
        "calibrating",
        !args.no_progress,
    );
    let mut runner: Option<TractRunner> = None;
    let mut samples = 0;
    for case in &args.cases {
        let inputs = select_case(&all, case)?;
        let noise = inputs
            .iter()
            .find(|t| t.name == "noise")
            .with_context(|| format!("case {case}: no '{case}.noise'"))?
            .clone();
        let mut x = noise.to_f32_vec().context("noise must be f32")?;
        for &i in &steps {
            let mut feed: Vec<Tensor> = inputs
                .iter()
                .filter(|t| t.name != "noise")
                .cloned()
                .collect();
            feed.push(Tensor::from_f32(&io.latent, noise.dims.clone(), &x));
            feed.push(timestep_tensor(&model, &io.timestep, sampler.timesteps[i])?);
            if runner.is_none() {
                runner = Some(TractRunner::new(&probe, &feed)?);
            }
            let outputs = runner.as_ref().expect("prepared").run(&feed)?;
            if i % args.every == 0 {
                samples += 1;
                for t in &outputs {
                    if let Some(m) = amax.get_mut(&t.name) {
                        let v = t.to_f32_vec().context("activations are float")?;
                        *m = v.iter().fold(*m, |acc, x| acc.max(x.abs()));
                    }
                }
            }
            let pred = outputs
                .iter()
                .find(|t| t.name == io.prediction)
                .context("no prediction")?;
            let pred = pred.to_f32_vec().context("f32 prediction")?;
            let n = x.len();
            sampler.step(i, &mut x, &pred[..n]);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let stats = CalibrationStats {
        format: FORMAT.into(),
        version: 1,
        method: "max".into(),
        source: format!(
            "ditc calibrate {} on cases {:?} of {}, every {} step(s)",
            args.model.display(),
            args.cases,
            args.inputs.display(),
            args.every
        ),
        samples,
        tensors: amax
            .into_iter()
            .map(|(k, v)| (k, TensorStats { amax: v }))
            .collect(),
    };
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
    let v: Vec<Tensor> = all
        .iter()
        .filter_map(|t| {
            let mut t = t.clone();
            t.name = t.name.strip_prefix(&prefix)?.to_string();
            Some(t)
        })
        .collect();
    if v.is_empty() {
        bail!("no tensors named '{prefix}...' in the inputs");
    }
    Ok(v)
}

fn timestep_tensor(model: &crate::ir::Model, name: &str, t: f64) -> Result<Tensor> {
    let info = model
        .graph
        .inputs
        .iter()
        .find(|i| i.name == name)
        .context("timestep input")?;
    let shape: Vec<i64> = info
        .shape()
        .unwrap_or(&[])
        .iter()
        .map(|d| d.value().unwrap_or(1))
        .collect();
    Ok(match info.dtype() {
        Some(crate::ir::DataType::I64) => Tensor::from_i64(name, shape, &[t.round() as i64]),
        _ => Tensor::from_f32(name, shape, &[t as f32]),
    })
}
