//! `ditc run MODEL --inputs IN.safetensors -o OUT.safetensors`: one forward pass on CPU with tract.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::runtime::TractRunner;
use crate::tensors::write_safetensors;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model (.onnx). Bundles driven through a sampling loop (manifest.json) come with schedules.
    pub model: PathBuf,
    /// Inputs as a safetensors file keyed by graph input names.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Use the tensors named PREFIX<input> (e.g. `--prefix 0.` for a fixture's io.safetensors).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Where to write the outputs (safetensors, keyed by graph output names).
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    if args.model.extension().is_some_and(|e| e == "json") {
        bail!(
            "running a manifest through a sampling loop is not implemented yet; give an .onnx file"
        );
    }
    let inputs = super::load_inputs(&args.inputs, args.prefix.as_deref())?;
    let model = super::read_model_arg(&args.model)?;
    let start = Instant::now();
    let runner = TractRunner::new(&model, &inputs)?;
    let prepared = start.elapsed();
    let outputs = runner.run(&inputs)?;
    let total = start.elapsed();
    write_safetensors(&args.output, &outputs)?;
    for t in &outputs {
        eprintln!("output {} {} {:?}", t.name, t.dtype, t.dims);
    }
    eprintln!(
        "wrote {} (plan {:.2}s, run {:.2}s)",
        args.output.display(),
        prepared.as_secs_f64(),
        (total - prepared).as_secs_f64()
    );
    Ok(())
}
