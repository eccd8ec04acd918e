//! `ditc verify A B --inputs FILE`: run two models on the same inputs and compare every output.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::metrics::{compare, Fidelity};
use crate::runtime::TractRunner;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model under test: an .onnx file or a diffusers checkpoint folder.
    pub a: PathBuf,
    /// The reference model: an .onnx file or a diffusers checkpoint folder.
    pub b: PathBuf,
    /// Inputs as a safetensors file keyed by graph input names.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Use the tensors named PREFIX<input> (e.g. `--prefix 0.` for a fixture's io.safetensors).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Largest accepted relative error max|a-b|/max|b| per output; above it the exit code is 1.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
    #[command(flatten)]
    pub threads: super::Threads,
}

#[derive(Debug, Serialize)]
pub struct OutputComparison {
    pub name: String,
    #[serde(flatten)]
    pub fidelity: Fidelity,
    pub pass: bool,
}

/// Run both models and compare outputs by name; fails if the outputs differ in name or shape.
pub fn compare_models(args: &Args) -> Result<Vec<OutputComparison>> {
    let inputs = super::load_inputs(&args.inputs, args.prefix.as_deref())?;
    let a = crate::models::read_model_or_checkpoint(&args.a, &args.shapes)?;
    let b = crate::models::read_model_or_checkpoint(&args.b, &args.shapes)?;
    let out_a = TractRunner::new(&a, &inputs)
        .and_then(|r| r.run(&inputs))
        .with_context(|| format!("running '{}'", args.a.display()))?;
    let out_b = TractRunner::new(&b, &inputs)
        .and_then(|r| r.run(&inputs))
        .with_context(|| format!("running '{}'", args.b.display()))?;
    let mut rows = Vec::new();
    for tb in &out_b {
        let Some(ta) = out_a.iter().find(|t| t.name == tb.name) else {
            bail!("'{}' has no output named '{}'", args.a.display(), tb.name);
        };
        if ta.dims != tb.dims {
            bail!(
                "output '{}': shapes differ ({:?} vs {:?})",
                tb.name,
                ta.dims,
                tb.dims
            );
        }
        let (Some(va), Some(vb)) = (ta.to_f32_vec(), tb.to_f32_vec()) else {
            bail!("output '{}' is not a float tensor", tb.name);
        };
        let fidelity = compare(&va, &vb);
        rows.push(OutputComparison {
            name: tb.name.clone(),
            pass: fidelity.max_rel <= args.tolerance,
            fidelity,
        });
    }
    Ok(rows)
}

/// Returns whether every output is within tolerance.
pub fn run(args: &Args) -> Result<bool> {
    args.threads.apply()?;
    let rows = compare_models(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<24} {:>12} {:>12} {:>12} {:>12} {:>10}  result",
            "output", "max_abs", "max_rel", "rel_l2", "cosine", "psnr_db"
        );
        for r in &rows {
            let f = &r.fidelity;
            println!(
                "{:<24} {:>12.3e} {:>12.3e} {:>12.3e} {:>12.9} {:>10.2}  {}",
                r.name,
                f.max_abs,
                f.max_rel,
                f.rel_l2,
                f.cosine,
                f.psnr_db,
                if r.pass { "ok" } else { "ABOVE TOLERANCE" }
            );
        }
    }
    let ok = rows.iter().all(|r| r.pass);
    if !ok {
        eprintln!("error: relative error above tolerance {:e}", args.tolerance);
    }
    Ok(ok)
}
