//! `ditc convert MODEL -o OUT [--recipe R] [--set k=v]...`: write a bundle.
//!
//! The recipe's options are all validated before any work; then the model is read, mapped, rewritten
//! by the recipe's passes (graph check after each), and `model.onnx` (+ `model.onnx.data`) and
//! `manifest.json` are staged and renamed into `OUT` only when every one of them is complete.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::analysis::analyse;
use crate::ir::{check_graph, Model};
use crate::manifest::{
    self, Cost, Manifest, PassRecord, Provenance, SamplerSection, Schedule, TensorRt,
};
use crate::onnx::{write_model, WriteOptions};
use crate::output::Staging;
use crate::passes::{self, PassContext};
use crate::recipe::Recipe;
use crate::schedule::guidance::Guidance;
use crate::schedule::specialize::{model_flops, specialize, Pattern};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  ditc convert model.onnx -o out\n  ditc convert model.onnx --recipe passes/pab.toml -o out\n  ditc convert model.onnx --recipe passes/pab.toml --set broadcast-static.spatial.period=3 --set sampler.steps=30 -o out\n  ditc convert Wan2.1-T2V-14B-Diffusers/transformer -o out --frames 21 --height 60 --width 104   (a diffusers checkpoint folder; BF16 kept)\n  ditc convert latte/transformer --recipe passes/pab.toml --text-len 120 -o out"
)]
pub struct Args {
    /// The model: an .onnx file (external data is read from beside it) or a diffusers checkpoint folder
    /// (config.json + safetensors; its graph is built, see the shape options).
    pub model: PathBuf,
    /// Output folder for the bundle (created if missing; existing bundle files are replaced).
    #[arg(short, long)]
    pub output: PathBuf,
    /// A recipe (TOML): the sampler and the passes to apply, e.g. passes/pab.toml. Without one the graph
    /// is re-emitted unchanged in meaning.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Override a recipe option: `sampler.steps=30`, `broadcast-static.cross.period=8`,
    /// `broadcast-static.spatial.window=[100,850]`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Calibration statistics for quantize-w8a8 (from `ditc calibrate`, or the documented format).
    #[arg(long, value_name = "FILE")]
    pub calibration_stats: Option<PathBuf>,
    /// Initializers of at least this many bytes go to model.onnx.data instead of the graph file.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    pub external_threshold: u64,
    /// Deployment target: a GPU generation (ampere, ada, hopper, blackwell), a TensorRT version
    /// (trt10, trt11), or both ("ampere,trt10"). The GPU sets W8A8's format when the recipe names none
    /// (INT8 on Ampere, FP8 E4M3 from Ada on: FP8 GEMMs are the faster ones there); the TensorRT
    /// version sets the lint's rules.
    #[arg(long, default_value = "hopper,trt10", value_name = "GPU[,TRT]")]
    pub target: crate::target::DeployTarget,
    /// Write the bundle even if the TensorRT lint finds violations (they are still printed).
    #[arg(long)]
    pub allow_lint_errors: bool,
    /// Also write the graph as it is after this pass, as OUT/after-<pass>.onnx (weights inline).
    /// Repeatable.
    #[arg(long, value_name = "PASS")]
    pub dump_after: Vec<String>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub calibrate: CalibrateFirst,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
}

/// `convert --inputs`: calibrate in the same command.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Calibrating in the same command")]
pub struct CalibrateFirst {
    /// Calibration inputs (as `ditc calibrate --inputs`: `noise` and the condition inputs per case,
    /// `<case>.<name>`). When the recipe quantizes (quantize-w8a8, or quantize-attention with
    /// format = "fp8") and no --calibration-stats is given, the activation ranges are recorded on
    /// these first, along the recipe's sampling trajectories of the full model, and the statistics
    /// are kept in the bundle (`calibration.json`).
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// The cases of --inputs to calibrate on (comma-separated prefixes without the dot). Default:
    /// every case in the file. Keep the cases you evaluate on out.
    #[arg(long, value_delimiter = ',', value_name = "CASES", requires = "inputs")]
    pub calibration_cases: Vec<String>,
}

/// True if the recipe at `path` (with `overrides`) has a pass that reads calibration statistics and
/// names none itself.
fn recipe_needs_stats(path: Option<&std::path::Path>, overrides: &[String]) -> bool {
    let Some(recipe) = path.and_then(|p| Recipe::load(p, overrides).ok()) else {
        return false;
    };
    recipe.passes.iter().any(|p| {
        let reads = match p.name.as_str() {
            "quantize-w8a8" => true,
            "quantize-attention" => p.options.get("format").and_then(|f| f.as_str()) == Some("fp8"),
            _ => false,
        };
        reads && !p.options.contains_key("calibration_stats")
    })
}

/// The cases of an inputs file: every prefix `P` with a tensor `P.noise`.
fn cases_in(inputs: &std::path::Path) -> Result<Vec<String>> {
    let all = crate::tensors::read_safetensors(inputs)?;
    let cases: Vec<String> = all
        .iter()
        .filter_map(|t| t.name.strip_suffix(".noise").map(String::from))
        .collect();
    if cases.is_empty() {
        anyhow::bail!(
            "--inputs '{}' has no '<case>.noise' tensor: nothing to calibrate on",
            inputs.display()
        );
    }
    Ok(cases)
}

/// Record the activation ranges the recipe's quantizing passes need (`ditc calibrate` with the same
/// model, recipe, overrides and target) into a temporary file; None when nothing needs them.
fn calibrate_first(args: &Args) -> Result<Option<tempfile::TempPath>> {
    let Some(inputs) = &args.calibrate.inputs else {
        return Ok(None);
    };
    if args.calibration_stats.is_some() || !recipe_needs_stats(args.recipe.as_deref(), &args.set) {
        return Ok(None);
    }
    let recipe = args
        .recipe
        .clone()
        .context("--inputs calibrates for a recipe's passes: give --recipe")?;
    let cases = match args.calibrate.calibration_cases.is_empty() {
        true => cases_in(inputs)?,
        false => args.calibrate.calibration_cases.clone(),
    };
    let stats = tempfile::Builder::new()
        .prefix("ditc-calibration-")
        .suffix(".json")
        .tempfile()
        .context("creating a temporary file for the calibration statistics")?
        .into_temp_path();
    eprintln!(
        "calibrating on {} case(s) of {} ({})",
        cases.len(),
        inputs.display(),
        cases.join(",")
    );
    let calibrate = super::calibrate::Args {
        model: args.model.clone(),
        recipe,
        set: args.set.clone(),
        inputs: inputs.clone(),
        cases,
        every: 1,
        method: "max".into(),
        percentile: 99.99,
        window: None,
        sensitivity: false,
        target: args.target,
        mag_ratios: false,
        profile: false,
        fit_teacache: None,
        fit_indicator: None,
        fit_degree: 4,
        output: Some(stats.to_path_buf()),
        no_progress: args.no_progress,
        shapes: args.shapes.clone(),
        threads: super::Threads { threads: None },
    };
    super::calibrate::run(&calibrate).context("calibrating before the conversion (--inputs)")?;
    Ok(Some(stats))
}

/// W8A8's format follows the GPU when the recipe names none (INT8 when it asks for SmoothQuant, which
/// is INT8 only); FP8 on a GPU without FP8 is refused.
fn apply_target_defaults(recipe: &mut Recipe, target: crate::target::DeployTarget) -> Result<()> {
    for pass in recipe
        .passes
        .iter_mut()
        .filter(|p| p.name == "quantize-w8a8")
    {
        crate::passes::quantize_w8a8::set_format_for_gpu(&mut pass.options, target.gpu)?;
    }
    Ok(())
}

/// True if the recipe file at `path` lists the pass `name` (an unreadable recipe: false; loading it
/// reports the error).
fn recipe_has_pass(path: Option<&std::path::Path>, name: &str) -> bool {
    path.and_then(|p| Recipe::load(p, &[]).ok())
        .is_some_and(|r| r.passes.iter().any(|p| p.name == name))
}

/// True if the recipe at `path` quantizes attention in a format that reads statistics (`fp8`).
fn recipe_has_fp8_attention(path: Option<&std::path::Path>) -> bool {
    path.and_then(|p| Recipe::load(p, &[]).ok())
        .is_some_and(|r| {
            r.passes.iter().any(|p| {
                p.name == "quantize-attention"
                    && p.options.get("format").and_then(|f| f.as_str()) == Some("fp8")
            })
        })
}

pub fn run(args: &Args) -> Result<()> {
    let manifest = convert(args)?;
    print_summary(args, &manifest);
    Ok(())
}

/// Write the bundle `args` describe and return its manifest, printing nothing (`ditc tune` converts
/// every candidate through this).
pub fn convert(args: &Args) -> Result<Manifest> {
    // Options first: a bad option fails before any model is read.
    let mut overrides = args.set.clone();
    let calibrated = calibrate_first(args)?;
    let stats_file = args
        .calibration_stats
        .clone()
        .or(calibrated.as_ref().map(|p| p.to_path_buf()));
    if let Some(stats) = &stats_file {
        let text = toml::Value::String(stats.display().to_string()).to_string();
        // The passes that read statistics: quantize-w8a8 (its error when the recipe has neither).
        let recipe = args.recipe.as_deref();
        let attention = recipe_has_fp8_attention(recipe);
        if !attention || recipe_has_pass(recipe, "quantize-w8a8") {
            overrides.push(format!("quantize-w8a8.calibration_stats={text}"));
        }
        if attention {
            overrides.push(format!("quantize-attention.calibration_stats={text}"));
        }
    }
    let mut recipe = match &args.recipe {
        Some(path) => Recipe::load(path, &overrides)?,
        None => Recipe::empty(&overrides)?,
    };
    apply_target_defaults(&mut recipe, args.target)?;
    if let Some(b) = &recipe.fidelity_budget {
        b.parse::<super::tune::Budget>()
            .context("the recipe's fidelity_budget")?;
    }
    let pass_list = recipe
        .passes
        .iter()
        .map(|p| passes::create(&p.name, &p.options))
        .collect::<Result<Vec<_>>>()?;
    let sampler = recipe
        .sampler
        .clone()
        .map(|c| c.plan().map(|s| (c, s)))
        .transpose()
        .context("invalid [sampler]")?;
    let steps = sampler.as_ref().map(|(_, s)| s.steps());
    for (pass, p) in pass_list.iter().zip(&recipe.passes) {
        pass.check_sampler(steps)
            .with_context(|| format!("pass '{}'", p.name))?;
    }

    for name in &args.dump_after {
        if !recipe.passes.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = recipe.passes.iter().map(|p| p.name.as_str()).collect();
            anyhow::bail!("--dump-after {name}: the recipe runs no such pass (it runs: {known:?})");
        }
    }
    let mut model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    check_graph(&model.graph).context("the input graph is invalid")?;
    let mut source = manifest::describe_source(&args.model, &model)?;
    if args.model.is_dir() {
        source.build = Some(args.shapes.clone());
    }
    let dit_map = analyse(&model);
    let io = match manifest::detect_io(&model) {
        Ok(io) => Some(io),
        Err(e) if sampler.is_some() => {
            return Err(e.context("a sampler needs the latent and timestep inputs"))
        }
        Err(_) => None,
    };
    let guidance = match (&recipe.guidance, &io) {
        (Some(g), Some(io)) => Some(resolve_guidance(g, &model, io)?),
        _ => None,
    };
    let original = model.clone();
    let mut cx = PassContext {
        dit_map,
        sampler,
        guidance,
        schedule: None,
        state: Vec::new(),
        step_input: None,
        branch_input: None,
        precision: None,
        sparse_attention: None,
        plugins: Vec::new(),
    };
    let mut dumps: Vec<(String, Vec<u8>)> = Vec::new();
    passes::run_pipeline_with(&mut model, &pass_list, &mut cx, &mut |name, m| {
        if args.dump_after.iter().any(|d| d == name) {
            dumps.push((
                format!("after-{name}.onnx"),
                crate::onnx::model_to_bytes_inline(m)?,
            ));
        }
        Ok(())
    })?;
    let cost = cost(&original, &model, &cx)?;
    let finite =
        crate::finite::check_before_write(&args.model, &original, &model, args.external_threshold)?;
    let mut violations = crate::lint::lint(&model, args.target.tensorrt, None);
    violations.extend(crate::lint::lint_gpu(&model, args.target.gpu));
    if !violations.is_empty() {
        super::lint::print(&violations);
        if !args.allow_lint_errors {
            anyhow::bail!(
                "the graph breaks {} TensorRT rule(s) (listed above); nothing was written (--allow-lint-errors writes it anyway)",
                violations.len()
            );
        }
    }

    let mut staging = Staging::new(&args.output)?;
    let options = WriteOptions {
        external_threshold: args.external_threshold,
        progress: !args.no_progress,
        finite: Some(finite),
    };
    let files = write_model(&model, &mut staging, "model.onnx", &options)?;
    let manifest = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        ditc_version: env!("CARGO_PKG_VERSION").into(),
        source,
        files,
        ir_version: model.ir_version,
        opset: model.default_opset(),
        inputs: model
            .graph
            .runtime_inputs()
            .map(manifest::binding)
            .collect(),
        outputs: model.graph.outputs.iter().map(manifest::binding).collect(),
        io: io.map(|mut io| {
            io.step = cx.step_input.clone();
            io.branch = cx.branch_input.clone();
            io
        }),
        sampler: cx.sampler.as_ref().map(|(c, s)| SamplerSection {
            config: c.clone(),
            timesteps: s.timesteps.clone(),
            guidance: cx.guidance.clone(),
        }),
        schedule: cx.schedule.clone(),
        state: cx.state.clone(),
        cost,
        tensorrt: TensorRt {
            build_command: manifest::trtexec_command(
                &model,
                args.shapes.batch_range(),
                args.target,
            ),
            target: Some(args.target),
            plugins: cx.plugins.clone(),
        },
        provenance: Provenance {
            recipe: recipe.path.as_ref().map(|p| p.display().to_string()),
            passes: recipe
                .passes
                .iter()
                .map(|p| {
                    Ok(PassRecord {
                        name: p.name.clone(),
                        options: serde_json::to_value(&p.options)?,
                    })
                })
                .collect::<Result<_>>()?,
            overrides: recipe.overrides.clone(),
        },
        precision: cx.precision.clone(),
        dit_map: serde_json::to_value(&cx.dit_map)?,
        sparse_attention: cx.sparse_attention.clone(),
        attention_cost: crate::analysis::gpu_cost::site_costs(&model, &cx.dit_map.attention),
    };
    for (name, bytes) in &dumps {
        staging.write(name, bytes)?;
    }
    if let Some(stats) = &calibrated {
        let bytes = std::fs::read(stats).context("reading back the calibration statistics")?;
        staging.write("calibration.json", &bytes)?;
    }
    let report = crate::report::at_conversion(&manifest, recipe.fidelity_budget.clone());
    staging.write(
        crate::report::FILE,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    staging.write(
        crate::report::SUMMARY_FILE,
        crate::report::summary(&report).as_bytes(),
    )?;
    staging.write(
        "manifest.json",
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    staging.commit()?;
    Ok(manifest)
}

/// The recipe's guidance with the model input its negative replaces named (see
/// [`Guidance::resolve_input`]).
fn resolve_guidance(g: &Guidance, model: &Model, io: &manifest::ModelIo) -> Result<Guidance> {
    let candidates: Vec<String> = model
        .graph
        .runtime_inputs()
        .map(|i| i.name.clone())
        .filter(|n| *n != io.latent && *n != io.timestep)
        .collect();
    let input = g.resolve_input(&candidates)?;
    Ok(Guidance {
        input: Some(input),
        ..g.clone()
    })
}

/// Planned FLOPs over the whole run (every call: two per step with guidance), every distinct
/// decision pattern specialised once.
fn cost(original: &Model, baked: &Model, cx: &PassContext) -> Result<Cost> {
    let all_sites: u64 = cx
        .dit_map
        .attention
        .iter()
        .map(|s| s.flops + s.projection_flops)
        .sum();
    let full = model_flops(original);
    let Some((_, sampler)) = &cx.sampler else {
        return Ok(Cost {
            steps: 1,
            attention_flops_full: all_sites,
            attention_flops_scheduled: all_sites,
            model_flops_full: full,
            model_flops_scheduled: full,
        });
    };
    let steps = sampler.steps();
    let empty = Schedule {
        policy: String::new(),
        options: serde_json::Value::Null,
        tables: BTreeMap::new(),
        uncond_tables: None,
        metrics: None,
        sites: BTreeMap::new(),
        blocks: Vec::new(),
        calls: BTreeMap::new(),
        block_tables: Vec::new(),
        adaptive: None,
    };
    let schedule = cx.schedule.as_ref().unwrap_or(&empty);
    // Per site: its FLOPs per call and the tables driving it (its block's or kind's, the stack's).
    let driven: Vec<(u64, Vec<_>)> = cx
        .dit_map
        .attention
        .iter()
        .map(|s| (s.flops + s.projection_flops, schedule.site_deciders(s.id)))
        .collect();
    let mut per_pattern: BTreeMap<Pattern, u64> = BTreeMap::new();
    let (mut model_scheduled, mut attention_scheduled) = (0u64, 0u64);
    let branches = cx.branches();
    for &branch in branches {
        for i in 0..steps {
            let pattern = schedule.pattern_at(branch, i);
            let flops = match per_pattern.get(&pattern) {
                Some(f) => *f,
                None => {
                    // Decisions the graph takes at run time are not known here: count every
                    // call as computing (the bound; `ditc run` measures what ran).
                    let specialised = specialize(baked, &pattern)?;
                    let f = model_flops(&crate::schedule::split::inline_ifs(&specialised, true)?);
                    per_pattern.insert(pattern.clone(), f);
                    f
                }
            };
            model_scheduled += flops;
            // A site is skipped when any table driving it reuses.
            let skipped: u64 = driven
                .iter()
                .filter(|(_, deciders)| deciders.iter().any(|d| !pattern[d]))
                .map(|(flops, _)| flops)
                .sum();
            attention_scheduled += all_sites - skipped;
        }
    }
    let calls = (steps * branches.len()) as u64;
    Ok(Cost {
        steps,
        attention_flops_full: all_sites * calls,
        attention_flops_scheduled: attention_scheduled,
        model_flops_full: full * calls,
        model_flops_scheduled: model_scheduled,
    })
}

fn print_summary(args: &Args, m: &Manifest) {
    let sizes: Vec<String> = m
        .files
        .iter()
        .map(|f| format!("{} ({})", f.path, super::inspect::human_bytes(f.bytes)))
        .collect();
    eprintln!(
        "wrote {}: {}, manifest.json",
        args.output.display(),
        sizes.join(", ")
    );
    for p in crate::report::pass_changes(m) {
        eprintln!("  {}: {}", p.name, p.changed);
    }
    if let Some(s) = &m.schedule {
        if let Some(a) = &s.adaptive {
            eprintln!(
                "  {}: blocks {:?} cached, decided at every call inside the graph (outputs '{}', '{}'); the FLOPs below count every call computing",
                s.policy, a.cached_blocks, a.decision, a.metric
            );
        }
        for (kind, c) in &s.calls {
            eprintln!(
                "  {:<9} computes {:>4} of {:>4} calls",
                kind.as_str(),
                c.computed,
                c.total
            );
        }
        let c = &m.cost;
        eprintln!(
            "  attention FLOPs {:.1}% of full, model FLOPs {:.1}% of full over {} steps ({} states carried)",
            100.0 * c.attention_flops_scheduled as f64 / c.attention_flops_full.max(1) as f64,
            100.0 * c.model_flops_scheduled as f64 / c.model_flops_full.max(1) as f64,
            c.steps,
            m.state.len()
        );
    }
}
