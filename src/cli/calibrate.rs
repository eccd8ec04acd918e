//! `ditc calibrate MODEL --recipe R --inputs IN --cases 1,2 -o stats.json`: activation ranges for W8A8
//! (and, with `quantize-attention` in format `fp8` in the recipe, Q, Kᵀ, P and V of its attention sites).
//! With `--mag-ratios`: MagCache's magnitude ratios per guidance branch instead
//! ([`crate::calibration::mag_ratios`]), written as the ratios file `mag_ratios` can name. With
//! `--profile`: the drift profile of every cached quantity ([`crate::calibration::profile`]) and its
//! picture; with `--fit-teacache OUT.toml` also TeaCache's polynomial fitted from it
//! ([`crate::calibration::teacache_fit`]).
//!
//! Parses the options and reports; the work is in [`crate::calibration::collect`] (ranges along the
//! recipe's sampling trajectories) and [`crate::calibration::sensitivity`] (ranking, budget table).
//! Writes the stats format documented in [`crate::calibration`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::analysis::analyse;
use crate::calibration::collect::{
    record_trajectories, RangeMethod, RangeRecorder, StepFilter, Trajectory,
};
use crate::calibration::mag_ratios::{calibrate, Calibration};
use crate::calibration::profile::{find_quantities, profile, Profile};
use crate::calibration::sensitivity::{budget_table, rank_layers, SENSITIVITY_EVERY};
use crate::calibration::teacache_fit::{fit_teacache, preset_toml};
use crate::ir::Model;
use crate::ir::Tensor;
use crate::manifest::detect_io;
use crate::manifest::ModelIo;
use crate::output::{write_file_atomically, Staging};
use crate::passes::quantize_w8a8::{select_targets, set_format_for_gpu, Format, QuantizeOptions};
use crate::recipe::Recipe;
use crate::schedule::guidance::Guidance;
use crate::schedule::Sampler;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  ditc calibrate examples/latte-tiny/model.onnx --recipe passes/w8a8.toml --inputs examples/latte-tiny/sampling.safetensors --cases 1,2 -o stats.json\n  ditc calibrate examples/wan-small/ckpt --frames 8 --height 16 --width 16 --text-len 4 --recipe passes/wan-cfg.toml --inputs examples/wan-small/inputs.safetensors --cases 0 --profile -o profile.json --fit-teacache teacache.toml"
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
    /// The deployment target (as for convert): its GPU picks the format the sensitivity ranking and
    /// budget table quantize to when the recipe names none (INT8 on Ampere, FP8 from Ada on).
    #[arg(long, default_value = "hopper,trt10", value_name = "GPU[,TRT]")]
    pub target: crate::target::DeployTarget,
    /// Measure MagCache's magnitude ratios instead of activation ranges: a full run of the recipe's
    /// sampler (and guidance) per case, the ratio of the block stack's residual norms at each step,
    /// per branch (averaged over the cases); writes the ratios file (`"format": "ditc-mag-ratios"`)
    /// that `broadcast-adaptive.mag_ratios` can name, and prints the tables as TOML.
    #[arg(long)]
    pub mag_ratios: bool,
    /// Profile drift instead: a full run of the recipe's sampler (and guidance) per case, recording
    /// per step and branch the relative change of every value a cache policy looks at (first-block,
    /// middle-block and whole-stack residuals, TeaCache's indicator, every attention output, the
    /// MagCache ratio, the output). Writes the profile (`"format": "ditc-profile"`, default
    /// `profile.json`) and its picture beside it (`<name>.drift.svg`).
    #[arg(long)]
    pub profile: bool,
    /// Also fit TeaCache's rescaling polynomial from the profile (least squares of the output's
    /// relative L1 change against the indicator's, every call) and write it as a preset for
    /// `broadcast-adaptive` (`policy = "tea-cache"`). Implies --profile.
    #[arg(long, value_name = "OUT.toml")]
    pub fit_teacache: Option<PathBuf>,
    /// The profile quantity TeaCache's fit uses as indicator: `timestep_embedding` (Wan's e, the
    /// default on Wan), `timestep_modulation` (Wan's e0: the preset gets `use_ret_steps = true`),
    /// `modulated_input` (the default on other families).
    #[arg(long, value_name = "QUANTITY")]
    pub fit_indicator: Option<String>,
    /// The degree of TeaCache's polynomial.
    #[arg(long, default_value_t = 4)]
    pub fit_degree: usize,
    /// Where to write the statistics, ratios or profile (JSON). Required except with --profile
    /// (default `profile.json`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
    #[command(flatten)]
    pub threads: super::Threads,
}

pub fn run(args: &Args) -> Result<()> {
    args.threads.apply()?;
    let fit_options = args.fit_indicator.is_some() || args.fit_degree != 4;
    if fit_options && args.fit_teacache.is_none() {
        bail!("--fit-indicator and --fit-degree apply only to --fit-teacache");
    }
    if args.profile || args.fit_teacache.is_some() {
        let ignored = [
            (args.every != 1, "--every"),
            (args.window.is_some(), "--window"),
            (args.method != "max", "--method"),
            (args.sensitivity, "--sensitivity"),
            (args.mag_ratios, "--mag-ratios"),
        ];
        if let Some((_, flag)) = ignored.iter().find(|(set, _)| *set) {
            bail!("{flag} does not apply to --profile (the profile comes from every step of a full run)");
        }
        return run_profile(args);
    }
    let output = args
        .output
        .as_deref()
        .context("-o/--output is required (where to write the statistics)")?;
    if args.mag_ratios {
        let ignored = [
            (args.every != 1, "--every"),
            (args.window.is_some(), "--window"),
            (args.method != "max", "--method"),
            (args.sensitivity, "--sensitivity"),
        ];
        if let Some((_, flag)) = ignored.iter().find(|(set, _)| *set) {
            bail!("{flag} does not apply to --mag-ratios (the ratios come from every step of a full run)");
        }
        return run_mag_ratios(args, output);
    }
    let method = range_method(args)?;
    let filter = step_filter(args)?;
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let sampler = recipe
        .sampler
        .clone()
        .context("the recipe has no [sampler]")?
        .plan()?;
    // The layers and format convert would quantize: the recipe's options, the format from --target.
    let mut table = recipe
        .passes
        .iter()
        .find(|p| p.name == "quantize-w8a8")
        .map(|p| p.options.clone())
        .unwrap_or_default();
    set_format_for_gpu(&mut table, args.target.gpu)?;
    let options: QuantizeOptions = table.try_into().context("invalid quantize-w8a8 options")?;
    options.validate()?;
    let format = match options.format.as_deref() {
        Some("fp8") => Format::Fp8,
        _ => Format::Int8,
    };
    let all = crate::tensors::read_safetensors(&args.inputs)?;
    let cases = args
        .cases
        .iter()
        .map(|c| select_case(&all, c).with_context(|| format!("case {c}")))
        .collect::<Result<Vec<_>>>()?;
    let model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    crate::finite::check_model(&args.model, &model, !args.no_progress)?;
    let map = analyse(&model);
    let io = detect_io(&model)?;
    let (targets, _) = select_targets(&model, &map, &options);
    // quantize-attention (fp8) in the recipe: Q, Kᵀ, P and V of its sites too.
    let attention = match recipe
        .passes
        .iter()
        .find(|p| p.name == "quantize-attention")
    {
        Some(p) => crate::passes::quantize_attention::calibration_values(&model, &map, &p.options)?,
        None => Vec::new(),
    };
    if targets.is_empty() && attention.is_empty() {
        bail!(
            "no layer to quantize was found in '{}'",
            args.model.display()
        );
    }
    let mut activations: Vec<String> = targets.iter().map(|t| t.activation.clone()).collect();
    activations.extend(attention);
    activations.sort();
    activations.dedup();

    let mut recorder = RangeRecorder::new(&model, &activations, method, filter);
    let keep_every = args.sensitivity.then_some(SENSITIVITY_EVERY);
    let (finals, points) = record_trajectories(
        &model,
        &cases,
        &io,
        &sampler,
        &mut recorder,
        keep_every,
        !args.no_progress,
    )?;
    let mut stats = recorder.finish(format!(
        "ditc calibrate {} on cases {:?} of {}, every {} step(s), timestep window {:?}",
        args.model.display(),
        args.cases,
        args.inputs.display(),
        args.every,
        args.window
    ))?;
    if args.sensitivity {
        let progress = !args.no_progress;
        stats.sensitivity = rank_layers(
            &model,
            &targets,
            &stats,
            format,
            &points,
            &io.prediction,
            progress,
        )?;
        let trajectory = Trajectory {
            io: &io,
            sampler: &sampler,
            inputs: &cases[0],
        };
        stats.budget = budget_table(
            &model,
            &targets,
            &stats,
            format,
            &trajectory,
            &finals[0],
            progress,
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
    write_file_atomically(output, serde_json::to_string_pretty(&stats)?.as_bytes())?;
    eprintln!(
        "wrote {}: {} activations over {} model calls",
        output.display(),
        stats.tensors.len(),
        stats.samples
    );
    Ok(())
}

/// What a full run (`--mag-ratios`, `--profile`) needs: the sampler, the cases, the model, its io and
/// the guidance with its input resolved.
struct FullRunSetup {
    sampler: Sampler,
    cases: Vec<Vec<Tensor>>,
    model: Model,
    io: ModelIo,
    guidance: Option<Guidance>,
}

fn full_run_setup(args: &Args) -> Result<FullRunSetup> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let sampler = recipe
        .sampler
        .clone()
        .context("the recipe has no [sampler]")?
        .plan()?;
    let all = crate::tensors::read_safetensors(&args.inputs)?;
    let cases = args
        .cases
        .iter()
        .map(|c| select_case(&all, c).with_context(|| format!("case {c}")))
        .collect::<Result<Vec<_>>>()?;
    let model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    crate::finite::check_model(&args.model, &model, !args.no_progress)?;
    let io = detect_io(&model)?;
    let guidance = match &recipe.guidance {
        Some(g) => {
            let candidates: Vec<String> = model
                .graph
                .runtime_inputs()
                .map(|i| i.name.clone())
                .filter(|n| *n != io.latent && *n != io.timestep)
                .collect();
            Some(Guidance {
                input: Some(g.resolve_input(&candidates)?),
                ..g.clone()
            })
        }
        None => None,
    };
    Ok(FullRunSetup {
        sampler,
        cases,
        model,
        io,
        guidance,
    })
}

/// `--mag-ratios`: MagCache calibration along the recipe's sampler and guidance.
fn run_mag_ratios(args: &Args, output: &Path) -> Result<()> {
    let FullRunSetup {
        sampler,
        cases,
        model,
        io,
        guidance,
    } = full_run_setup(args)?;
    let calibration = Calibration {
        model: &model,
        io: &io,
        sampler: &sampler,
        guidance: guidance.as_ref(),
        source: format!(
            "ditc calibrate --mag-ratios {} on cases {:?} of {}",
            args.model.display(),
            args.cases,
            args.inputs.display()
        ),
    };
    let ratios = calibrate(&calibration, &cases, !args.no_progress)?;
    write_file_atomically(output, serde_json::to_string_pretty(&ratios)?.as_bytes())?;
    let toml_list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("mag_ratios = [{}]", toml_list(&ratios.cond));
    if let Some(u) = &ratios.uncond {
        println!("# the unconditional branch's own table (beyond diffusers, which drives both branches with mag_ratios):");
        println!("# mag_ratios_uncond = [{}]", toml_list(u));
    }
    eprintln!(
        "wrote {}: {} steps, {} branch(es), {} case(s)",
        output.display(),
        ratios.steps,
        1 + ratios.uncond.is_some() as usize,
        cases.len()
    );
    Ok(())
}

/// Where the drift picture of the profile at `output` goes: `<stem>.drift.svg` beside it.
pub fn drift_picture_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "profile".into(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}.drift.svg"))
}

/// `--profile` (and `--fit-teacache`): the drift profile, its picture, and the fitted preset.
fn run_profile(args: &Args) -> Result<()> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("profile.json"));
    let picture = drift_picture_path(&output);
    // The output folders are made (or refused) before the long run.
    let mut staging = Staging::new(parent_dir(&output))?;
    let mut fit_staging = match &args.fit_teacache {
        Some(p) if parent_dir(p) != parent_dir(&output) => Some(Staging::new(parent_dir(p))?),
        _ => None,
    };
    let setup = full_run_setup(args)?;
    let (quantities, left_out) = find_quantities(&setup.model, &setup.io.prediction);
    // Choose the indicator before the (long) run, so a wrong name fails at once.
    let indicator = match (&args.fit_teacache, &args.fit_indicator) {
        (None, _) => None,
        (Some(_), Some(name)) => Some(name.clone()),
        (Some(_), None) if quantities.iter().any(|q| q.name == "timestep_embedding") => {
            Some("timestep_embedding".to_string())
        }
        (Some(_), None) => Some("modulated_input".to_string()),
    };
    if let Some(name) = &indicator {
        if !quantities.iter().any(|q| &q.name == name) {
            let have: Vec<&str> = quantities.iter().map(|q| q.name.as_str()).collect();
            bail!("--fit-indicator {name}: the model has no such quantity (it has {have:?})");
        }
    }
    let calibration = Calibration {
        model: &setup.model,
        io: &setup.io,
        sampler: &setup.sampler,
        guidance: setup.guidance.as_ref(),
        source: format!(
            "ditc calibrate --profile {} on cases {:?} of {}",
            args.model.display(),
            args.cases,
            args.inputs.display()
        ),
    };
    let profiled = profile(
        &calibration,
        &quantities,
        left_out,
        &setup.cases,
        &args.cases,
        !args.no_progress,
    )?;
    let fitted = match (&args.fit_teacache, &indicator) {
        (Some(path), Some(name)) => {
            let fit = fit_teacache(&profiled, name, args.fit_degree)?;
            Some((path, fit))
        }
        _ => None,
    };
    let svg = crate::plot::drift_svg(&profiled)?;
    // Everything is computed before anything is written, and written all together.
    staging.write(
        &file_name(&output)?,
        serde_json::to_string_pretty(&profiled)?.as_bytes(),
    )?;
    staging.write(&file_name(&picture)?, svg.as_bytes())?;
    if let Some((path, fit)) = &fitted {
        let preset = preset_toml(fit, &calibration.source);
        fit_staging
            .as_mut()
            .unwrap_or(&mut staging)
            .write(&file_name(path)?, preset.as_bytes())?;
    }
    if let Some(s) = fit_staging {
        s.commit()?;
    }
    staging.commit()?;
    print_profile_summary(&profiled);
    eprintln!(
        "wrote {} ({} quantities, {} steps, {} branch(es), {} case(s)) and {}",
        output.display(),
        profiled.quantities.len(),
        profiled.steps,
        profiled.branches.len(),
        profiled.cases.len(),
        picture.display()
    );
    if let Some((path, fit)) = fitted {
        if fit.indicator == "modulated_input" {
            eprintln!("note: policy \"tea-cache\" reads Wan's timestep embedding only; this fit (on the modulated input) is for a runtime that computes that indicator");
        }
        eprintln!(
            "wrote {}: TeaCache coefficients of degree {} on {} ({} pairs, R^2 {:.4}): {:?}",
            path.display(),
            args.fit_degree,
            fit.indicator,
            fit.points,
            fit.r_squared,
            fit.coefficients
        );
    }
    Ok(())
}

/// The folder a file is written into (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn file_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .with_context(|| format!("'{}' is not a file path", path.display()))?
        .to_string_lossy()
        .into_owned())
}

/// One line per quantity: its mean change per branch over the steps that have one.
fn print_profile_summary(p: &Profile) {
    for q in &p.quantities {
        let means: Vec<String> = p
            .branches
            .iter()
            .map(|&b| {
                let v: Vec<f64> = q.mean_over_cases(b).into_iter().flatten().collect();
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                format!("{b} {mean:.4e}")
            })
            .collect();
        eprintln!("  {:<30} mean {}  ({})", q.name, means.join(", "), q.what);
    }
    for l in &p.left_out {
        eprintln!("  {:<30} left out: {}", l.name, l.reason);
    }
}

fn range_method(args: &Args) -> Result<RangeMethod> {
    match args.method.as_str() {
        "max" => Ok(RangeMethod::Max),
        "percentile" if args.percentile > 0.0 && args.percentile <= 100.0 => {
            Ok(RangeMethod::Percentile(args.percentile))
        }
        "percentile" => bail!("--percentile {} must be in (0, 100]", args.percentile),
        other => bail!("--method {other}: expected `max` or `percentile`"),
    }
}

fn step_filter(args: &Args) -> Result<StepFilter> {
    if args.every == 0 {
        bail!("--every must be at least 1");
    }
    let window = match args.window.as_deref() {
        None => None,
        Some(&[lo, hi]) if lo <= hi => Some((lo, hi)),
        Some(w) => bail!("--window {w:?}: expected LO,HI with LO <= HI"),
    };
    Ok(StepFilter {
        every: args.every,
        window,
    })
}

fn select_case(all: &[Tensor], case: &str) -> Result<Vec<Tensor>> {
    let prefix = format!("{case}.");
    let v = super::select_prefixed(all, &prefix);
    if v.is_empty() {
        bail!("no tensors named '{prefix}...' in the inputs");
    }
    Ok(v)
}
