//! `ditc lint MODEL [--target GPU,TRT] [--json]`: check a graph against TensorRT's ONNX rules.

use std::path::PathBuf;

use anyhow::Result;

use crate::lint::{lint, lint_gpu, Violation};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model: an .onnx file or a diffusers checkpoint folder.
    pub model: PathBuf,
    /// The TensorRT version whose rules apply (trt10, trt11) and the GPU generation (ampere, ada,
    /// hopper, blackwell: FP8 needs Ada or newer), alone or both as "ampere,trt10".
    #[arg(long, default_value = "hopper,trt10", value_name = "GPU[,TRT]")]
    pub target: crate::target::DeployTarget,
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
    let mut violations = lint(&model, args.target.tensorrt, bytes);
    violations.extend(lint_gpu(&model, args.target.gpu));
    let plugins = crate::lint::plugin_nodes(&model);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&violations)?);
    } else {
        print(&violations);
        print_plugins(&plugins);
        if violations.is_empty() {
            println!(
                "{}: conforms to the TensorRT rules for {}",
                args.model.display(),
                args.target
            );
        }
    }
    Ok(violations.is_empty())
}

/// Plugin requirements (not violations): the node, the plugin, and what TensorRT does without it.
pub fn print_plugins(plugins: &[crate::lint::PluginUse]) {
    for p in plugins {
        let fallback = if p.has_function {
            "its local function is the portable fallback"
        } else {
            "no local function: the plugin is required"
        };
        println!(
            "plugin: node '{}' needs TensorRT plugin {} (version {}, namespace {}) from {} ({fallback})",
            p.node,
            p.plugin,
            p.version,
            p.namespace,
            crate::passes::sparse_linear_attention::PLUGIN_LIBRARY
        );
    }
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
