//! `ditc convert MODEL -o OUT`: write a bundle (`model.onnx`, `model.onnx.data`, `manifest.json`).
//!
//! With no recipe the graph is re-emitted unchanged in meaning. All files are staged and renamed into
//! `OUT` only when every one of them is complete.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::analysis::analyse;
use crate::ir::check_graph;
use crate::manifest;
use crate::onnx::{write_model, WriteOptions};
use crate::output::Staging;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model: an .onnx file (external data is read from beside it).
    pub model: PathBuf,
    /// Output folder for the bundle (created if missing; existing bundle files are replaced).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Initializers of at least this many bytes go to model.onnx.data instead of the graph file.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    pub external_threshold: u64,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let model = super::read_model_arg(&args.model)?;
    check_graph(&model.graph).context("the input graph is invalid")?;
    let dit_map = analyse(&model);
    let source = manifest::describe_source(&args.model, &model)?;

    let mut staging = Staging::new(&args.output)?;
    let options = WriteOptions {
        external_threshold: args.external_threshold,
        progress: !args.no_progress,
    };
    let files = write_model(&model, &mut staging, "model.onnx", &options)?;
    let manifest = manifest::build(&model, source, files, dit_map);
    staging.write(
        "manifest.json",
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    staging.commit()?;

    let sizes: Vec<String> = manifest
        .files
        .iter()
        .map(|f| format!("{} ({})", f.path, super::inspect::human_bytes(f.bytes)))
        .collect();
    eprintln!(
        "wrote {}: {}, manifest.json; {} attention sites in {} blocks",
        args.output.display(),
        sizes.join(", "),
        manifest.dit_map.attention.len(),
        manifest.dit_map.blocks.len()
    );
    Ok(())
}
