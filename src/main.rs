//! The `ditc` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ditc::cli;

/// ditc: an offline optimizing compiler for video Diffusion Transformers.
///
/// Reads a DiT (ONNX today), maps its transformer blocks and attention sites, applies the passes of a
/// recipe (static attention broadcast today), and writes a TensorRT-ready bundle: the graph and a
/// manifest that drives it through a sampling loop. Every result can be checked on CPU.
///
/// Typical use:
///   ditc inspect model.onnx
///   ditc convert model.onnx --recipe passes/pab.toml -o out
///   ditc run out/manifest.json --inputs in.safetensors -o sample.safetensors --compare-full
#[derive(Parser, Debug)]
#[command(name = "ditc", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's inputs, parameters, ops, blocks and attention sites (kind, heads, FLOPs).
    Inspect(cli::inspect::Args),
    /// Write a bundle: OUT/model.onnx (+ model.onnx.data) and OUT/manifest.json.
    Convert(cli::convert::Args),
    /// Measure activation ranges along sampling trajectories, for W8A8 quantization.
    Calibrate(cli::calibrate::Args),
    /// Run two models on the same inputs and compare outputs (max-abs, rel-L2, cosine, PSNR).
    Verify(cli::verify::Args),
    /// Sample with a bundle (manifest.json) through its schedule, or run an .onnx once, on CPU.
    Run(cli::run::Args),
    /// Search caching policies and thresholds for the fewest computed FLOPs within a fidelity budget.
    Tune(cli::tune::Args),
    /// Check a graph against TensorRT's ONNX rules (quantization, If, TopK, Reduce, opsets, size).
    Lint(cli::lint::Args),
    /// List the passes a recipe can name.
    Passes,
}

fn main() -> ExitCode {
    restore_default_sigpipe();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(a) => cli::inspect::run(a).map(|_| true),
        Command::Convert(a) => cli::convert::run(a).map(|_| true),
        Command::Calibrate(a) => cli::calibrate::run(a).map(|_| true),
        Command::Verify(a) => cli::verify::run(a),
        Command::Run(a) => cli::run::run(a).map(|_| true),
        Command::Tune(a) => cli::tune::run(a).map(|_| true),
        Command::Lint(a) => cli::lint::run(a),
        Command::Passes => {
            for (name, what) in ditc::passes::REGISTRY {
                println!("{name:<18} {what}");
            }
            Ok(true)
        }
    };
    if std::env::var_os("DITC_REPORT_PEAK_RSS").is_some() {
        report_peak_rss();
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// With `DITC_REPORT_PEAK_RSS` set, print the process's peak resident memory (Linux `VmHWM`) to stderr;
/// the memory benchmarks read it.
fn report_peak_rss() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        eprintln!("peak RSS: {}", line.trim_start_matches("VmHWM:").trim());
    }
}

/// Rust ignores SIGPIPE, so `ditc inspect m.onnx | head` would panic on a closed stdout; behave like
/// other command-line tools and end quietly instead.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
