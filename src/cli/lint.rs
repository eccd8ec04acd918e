//! `ditc lint MODEL [--target trt10|trt11] [--json]`: check a graph against TensorRT's ONNX rules.

use std::path::PathBuf;

use anyhow::Result;

use crate::lint::{lint, Target, Violation};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model: an .onnx file or a diffusers checkpoint folder.
    pub model: PathBuf,
    /// TensorRT version whose rules apply.
    #[arg(long, value_enum, default_value = "trt10")]
    pub target: Target,
    /// Print the violations as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
}

/// Returns whether the model conforms.
pub fn run(args: &Args) -> Result<bool> {
    let model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    let bytes = std::fs::metadata(&args.model).ok().map(|m| m.len());
    let violations = lint(&model, args.target, bytes);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&violations)?);
    } else {
        print(&violations);
        if violations.is_empty() {
            println!(
                "{}: conforms to the {:?} rules",
                args.model.display(),
                args.target
            );
        }
    }
    Ok(violations.is_empty())
}

pub fn print(violations: &[Violation]) {
    for v in violations {
        let node = if v.node.is_empty() {
            String::new()
        } else {
            format!(" node '{}':", v.node)
        };
        println!("{}:{node} {}", v.rule, v.message);
    }
}
