//! `ditc run`: drive a bundle through its sampling loop (`manifest.json`), or run an `.onnx` once.
//!
//! A bundle is checked before anything runs (see [`crate::integrity`]): the manifest against its
//! schema, then every listed file's size and (without `--no-verify`) SHA-256.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::integrity::Checks;
use crate::metrics::{compare, Fidelity};
use crate::runtime::{sample, Bundle, RunReport, TractRunner};
use crate::tensors::write_safetensors;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  ditc run out/manifest.json --inputs in.safetensors -o sample.safetensors --compare-full\n  ditc run model.onnx --inputs io.safetensors --prefix 0. -o out.safetensors"
)]
pub struct Args {
    /// A bundle's manifest.json (sampling loop), or an .onnx file (one forward pass). A bundle is
    /// checked first: the manifest against its schema, then each listed file's size and SHA-256;
    /// a damaged, truncated, missing or swapped file is refused by name.
    pub model: PathBuf,
    /// For a bundle: `noise` (the initial latent) and every model input other than the latent and the
    /// timestep (e.g. `encoder_hidden_states`). For an .onnx: every graph input.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Use the tensors named PREFIX<name> (e.g. `--prefix 0.` for the fixtures' case 0).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Where to write the result: `sample` (the final latent) for a bundle, the graph outputs otherwise.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also sample with the unoptimised model (every site computing; the float source model when the
    /// bundle is quantized) and report the difference.
    #[arg(long)]
    pub compare_full: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write per step and branch the timestep, the decision and the policy's metric to this JSON file:
    /// `{"steps": [{"step": i, "timestep": t, "cond": {"computed": bool, "metric": x|null,
    /// "groups": {...}}, "uncond": {...}}]}`.
    #[arg(long, value_name = "FILE.json")]
    pub trace: Option<PathBuf>,
    /// Draw the run's decision timeline to this SVG file: one row per cached value (group, attention
    /// site, MLP) and branch, one cell per step, computed or reused.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// Skip the SHA-256 check of the bundle's files, for trusted bundles (hashing reads every byte of
    /// the bundle: 28 GB for Wan2.1-14B). The manifest's schema and the files' sizes are always checked.
    #[arg(long)]
    pub no_verify: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
    #[command(flatten)]
    pub threads: super::Threads,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// The scheduled run's `attention_flops_kept_fraction` (also in `scheduled`), for scripts.
    pub attention_flops_kept_fraction: f64,
    pub scheduled: RunReport,
    pub full: Option<RunReport>,
    /// Final latent vs the full computation's.
    pub fidelity: Option<Fidelity>,
    /// full wall time / scheduled wall time (sampling only, plans excluded), with --compare-full.
    pub speedup: Option<f64>,
}

pub fn run(args: &Args) -> Result<()> {
    args.threads.apply()?;
    if args.model.extension().is_some_and(|e| e == "json") {
        return run_bundle(args);
    }
    let inputs = super::load_inputs(&args.inputs, args.prefix.as_deref())?;
    let model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    let start = Instant::now();
    let runner = TractRunner::new(&model, &inputs)?;
    let prepared = start.elapsed();
    let outputs = runner.run(&inputs)?;
    write_safetensors(&args.output, &outputs)?;
    for t in &outputs {
        eprintln!("output {} {} {:?}", t.name, t.dtype, t.dims);
    }
    eprintln!(
        "wrote {} (plan {:.2}s, run {:.2}s)",
        args.output.display(),
        prepared.as_secs_f64(),
        (start.elapsed() - prepared).as_secs_f64()
    );
    Ok(())
}

/// Run a bundle as the report describes; also used by tests and benches.
pub fn sample_bundle(args: &Args) -> Result<(crate::ir::Tensor, Report)> {
    let inputs = super::load_inputs(&args.inputs, args.prefix.as_deref())?;
    let progress = !args.no_progress && !args.json;
    let checks = Checks {
        hashes: !args.no_verify,
        progress,
    };
    let bundle = Bundle::open_checked(&args.model, &checks)?;
    let noise = inputs.iter().find(|t| t.name == "noise").with_context(|| {
        format!(
            "'{}' has no tensor 'noise' (the initial latent)",
            args.inputs.display()
        )
    })?;
    let (latent, scheduled) = sample(&bundle, noise, &inputs, false, progress)?;
    let (full, fidelity) = if args.compare_full {
        let reference = bundle.reference()?;
        let (full_latent, full) = sample(
            reference.as_ref().unwrap_or(&bundle),
            noise,
            &inputs,
            true,
            progress,
        )?;
        let f = compare(
            &latent.to_f32_vec().expect("f32"),
            &full_latent.to_f32_vec().expect("f32"),
        );
        (Some(full), Some(f))
    } else {
        (None, None)
    };
    let speedup = full.as_ref().map(|f| {
        (f.wall_seconds - f.plan_seconds)
            / (scheduled.wall_seconds - scheduled.plan_seconds).max(1e-9)
    });
    Ok((
        latent,
        Report {
            attention_flops_kept_fraction: scheduled.attention_flops_kept_fraction,
            scheduled,
            full,
            fidelity,
            speedup,
        },
    ))
}

/// `ditc run --trace`: the scheduled run's decisions and metrics, step by step.
#[derive(Serialize)]
struct Trace<'a> {
    steps: &'a [crate::runtime::sampling::TraceStep],
}

fn run_bundle(args: &Args) -> Result<()> {
    let (latent, report) = sample_bundle(args)?;
    let timeline = match &args.plot {
        Some(_) => {
            let manifest = crate::manifest::read(&args.model)?;
            let rows = crate::plot::timeline_rows(&report.scheduled, &manifest);
            let title = format!("{}: decisions", args.model.display());
            Some(crate::plot::timeline_svg(&title, &rows)?)
        }
        None => None,
    };
    write_safetensors(&args.output, &[latent])?;
    if let (Some(path), Some(svg)) = (&args.plot, &timeline) {
        crate::output::write_file_atomically(path, svg.as_bytes())?;
    }
    if let Some(path) = &args.trace {
        let trace = Trace {
            steps: &report.scheduled.trace,
        };
        crate::output::write_file_atomically(
            path,
            serde_json::to_string_pretty(&trace)?.as_bytes(),
        )?;
    }
    let measured = complete_conversion_report(args, &report)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let s = &report.scheduled;
    let calls: usize = s
        .branches
        .values()
        .map(|b| b.model_calls.computed + b.model_calls.skipped)
        .sum();
    println!(
        "sampled {} steps ({calls} model calls) in {:.2}s ({} plans, {:.2}s planning) -> {}",
        s.steps,
        s.wall_seconds,
        s.plans,
        s.plan_seconds,
        args.output.display()
    );
    println!(
        "{:<7} {:<9} {:>9} {:>9}",
        "branch", "group", "computed", "skipped"
    );
    for (branch, b) in &s.branches {
        let model = std::iter::once(("calls", &b.model_calls));
        let groups = b.calls.iter().map(|(g, c)| (g.as_str(), c));
        for (group, c) in model.chain(groups) {
            println!(
                "{:<7} {:<9} {:>9} {:>9}",
                branch.as_str(),
                group,
                c.computed,
                c.skipped
            );
        }
    }
    let pct = |a: u64, b: u64| 100.0 * (1.0 - a as f64 / b.max(1) as f64);
    println!(
        "attention FLOPs saved {:.1}% ({} of {}), model FLOPs saved {:.1}% (ideal speedup {:.2}x)",
        pct(s.attention_flops, s.attention_flops_full),
        super::inspect::human_flops(s.attention_flops_full - s.attention_flops),
        super::inspect::human_flops(s.attention_flops_full),
        pct(s.model_flops, s.model_flops_full),
        s.model_flops_full as f64 / s.model_flops.max(1) as f64
    );
    if !s.sparse_sites.is_empty() {
        let (est, dense): (f64, f64) = s
            .sparse_sites
            .values()
            .map(|x| (x.h100_ms_estimated, x.h100_ms_dense))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        println!(
            "attention score/value FLOPs kept {:.1}% over all sites ({} block-sparse sites); cost model: their H100 attention time {:.1} ms vs {:.1} ms dense ({:.2}x)",
            100.0 * s.attention_flops_kept_fraction,
            s.sparse_sites.len(),
            est,
            dense,
            dense / est.max(1e-12)
        );
    }
    if let (Some(f), Some(full), Some(speedup)) = (&report.fidelity, &report.full, report.speedup) {
        println!(
            "vs full computation: PSNR {:.2} dB, cosine {:.6}, max-abs {:.3e}, rel-L2 {:.3e}\nsampling time without planning {:.2}s vs {:.2}s for full: speedup {:.2}x",
            f.psnr_db, f.cosine, f.max_abs, f.rel_l2,
            s.wall_seconds - s.plan_seconds, full.wall_seconds - full.plan_seconds, speedup
        );
    }
    if let Some((m, budget)) = measured {
        println!(
            "report: {} (fidelity budget {})\n{}\n{}",
            args.model.with_file_name(crate::report::FILE).display(),
            budget.as_deref().unwrap_or("none declared"),
            crate::report::table_header(),
            crate::report::table_row(&m)
        );
    }
    Ok(())
}

/// With --compare-full, on a bundle that has a conversion report: add what this run measured to
/// it (`report.json`, `report.md`). Returns the measured section and the declared budget.
fn complete_conversion_report(
    args: &Args,
    report: &Report,
) -> Result<Option<(crate::report::Measured, Option<String>)>> {
    let (Some(full), Some(fidelity)) = (&report.full, &report.fidelity) else {
        return Ok(None);
    };
    let Some(mut conversion) = crate::report::read(&args.model)? else {
        return Ok(None);
    };
    let manifest = crate::manifest::read(&args.model)?;
    let budget = conversion
        .fidelity_budget
        .as_deref()
        .map(str::parse::<super::tune::Budget>)
        .transpose()
        .context("the report's fidelity_budget")?;
    let measured = crate::report::measured(
        &manifest,
        &report.scheduled,
        full,
        fidelity,
        budget.as_ref(),
        &args.inputs,
        args.prefix.as_deref(),
    );
    conversion.measured = Some(measured.clone());
    crate::report::write(&args.model, &conversion)?;
    Ok(Some((measured, conversion.fidelity_budget)))
}
