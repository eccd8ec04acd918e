//! The caching comparison tables of the README (issue 12) on wan-small and latte-tiny: every
//! hand-set policy, with and without TaylorSeer forecasting, and the `ditc tune` winner, on held-out
//! cases, against the full model.
//!
//! `cargo bench --profile dev --bench cache_table [-- --model wan|latte --steps 50 --budget rel-l2=0.1
//! --calibration 0 --held-out 1,2 --iterations 4 --margin 1 --time-limit S --policies P,Q --no-tune
//! --no-rows]` (`--policies`: as `ditc tune --policies`, default its default set).
//!
//! - `wan` (default): wan-small (`examples/wan-small/ckpt`, 8 x 16 x 16 latents, 4 caption tokens) with
//!   passes/wan-cfg.toml's sampler (flow Euler shift 3, CFG 5.0), converted with each policy (the
//!   recipes of `passes/`, as shipped, plus forecasting), sampled on the held-out cases of
//!   `examples/wan-small/inputs.safetensors` (cases 0-2 of the fixture; case 0 is the calibration
//!   case: MagCache's preset ratios were measured on it, and the tuner tunes on it).
//! - `latte`: latte-tiny (`examples/latte-tiny/model.onnx`) with passes/pab.toml's sampler (DDIM 50,
//!   no guidance), on `examples/latte-tiny/sampling.safetensors` (diffusers' three trajectories' inputs):
//!   PAB presets, FirstBlockCache with a spatial + temporal block pair as its head, MagCache with
//!   ratios measured here on the calibration cases, EasyCache; TeaCache and AdaCache are refused (the
//!   table prints why).
//!
//! It prints a markdown table: calls computed (mean per run, both branches), computed FLOPs relative
//! to full, and the worst PSNR / cosine / rel-L2 over the held-out cases; then the tuned row and whether
//! it beats every hand-set policy that meets the same budget on the held-out cases.

use std::path::Path;

use ditc::cli::tune::{worst, Budget, Evaluator, Outcome, Tuner};
use ditc::recipe::{PassSpec, Recipe};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn list(s: &str) -> Vec<String> {
    s.split(',').map(|c| c.trim().to_string()).collect()
}

/// One model's comparison: what to convert, its base recipe, its inputs and its rows.
struct Setup {
    title: String,
    model: std::path::PathBuf,
    shapes: ditc::models::BuildOptions,
    base: Recipe,
    base_name: &'static str,
    inputs: std::path::PathBuf,
    rows: Vec<(String, Option<PassSpec>)>,
}

const T1: [&str; 1] = ["broadcast-adaptive.forecast=taylor"];
const T2: [&str; 2] = [
    "broadcast-adaptive.forecast=taylor",
    "broadcast-adaptive.order=2",
];

/// `label` without forecasting, then with order 1 and 2 (`pass_with(sets)` builds each).
fn with_forecasts(
    rows: &mut Vec<(String, Option<PassSpec>)>,
    label: &str,
    pass_with: &dyn Fn(&[&str]) -> Option<PassSpec>,
) {
    rows.push((label.to_string(), pass_with(&[])));
    rows.push(("+ taylor order 1".into(), pass_with(&T1)));
    rows.push(("+ taylor order 2".into(), pass_with(&T2)));
}

fn wan_setup(root: &Path, steps: usize) -> Setup {
    let steps_set = format!("sampler.steps={steps}");
    let recipe = |name: &str, sets: &[&str]| -> Recipe {
        let mut all = vec![steps_set.clone()];
        all.extend(sets.iter().map(|s| s.to_string()));
        Recipe::load(&root.join("passes").join(name), &all).unwrap()
    };
    let first_pass = |name: &str, sets: &[&str]| -> Option<PassSpec> {
        recipe(name, sets).passes.first().cloned()
    };
    let with = |name: &'static str, extra: &'static [&'static str]| {
        move |sets: &[&str]| {
            let mut all: Vec<&str> = extra.to_vec();
            all.extend(sets);
            first_pass(name, &all)
        }
    };
    let ada_slow: &'static [&'static str] = &[
        "broadcast-adaptive.codebook=30-step-slow",
        "broadcast-adaptive.block=4",
        "broadcast-adaptive.residual=cross-mlp",
        "broadcast-adaptive.moreg=false",
    ];
    let mut rows: Vec<(String, Option<PassSpec>)> = vec![
        ("full model (`passes/wan-cfg.toml`)".into(), None),
        // pab-flow.toml's pass (its recipe has no guidance; the pass applies to Wan's attention kinds).
        ("PAB: `pab-flow.toml`'s CogVideoX preset (full attention period 2, cross period 6, in (100, 850))".into(), first_pass("pab-flow.toml", &[])),
    ];
    with_forecasts(
        &mut rows,
        "FirstBlockCache 0.05 (diffusers' default; `fbc-wan-cfg.toml`)",
        &with("fbc-wan-cfg.toml", &[]),
    );
    rows.push((
        "FirstBlockCache 0.2".into(),
        first_pass("fbc-wan-cfg.toml", &["broadcast-adaptive.threshold=0.2"]),
    ));
    with_forecasts(
        &mut rows,
        "MagCache 0.06 (diffusers' default; `wan-magcache.toml`)",
        &with("wan-magcache.toml", &[]),
    );
    with_forecasts(
        &mut rows,
        "TeaCache 0.2, published Wan2.1-1.3B coefficients (`wan-teacache.toml`)",
        &with("wan-teacache.toml", &[]),
    );
    with_forecasts(
        &mut rows,
        "EasyCache 0.05, EasyCache4Wan2.1's defaults (`wan-easycache.toml`)",
        &with("wan-easycache.toml", &[]),
    );
    with_forecasts(
        &mut rows,
        "AdaCache + MoReg defaults (`wan-adacache.toml`)",
        &with("wan-adacache.toml", &[]),
    );
    with_forecasts(
        &mut rows,
        "AdaCache 30-step slow, block 4 cross-attention + MLP, no MoReg",
        &with("wan-adacache.toml", ada_slow),
    );
    Setup {
        title: format!("wan-small, CFG 5.0, {steps} flow-matching steps"),
        model: root.join("examples/wan-small/ckpt"),
        shapes: ditc::models::BuildOptions {
            frames: Some(8),
            height: Some(16),
            width: Some(16),
            text_len: Some(4),
            ..Default::default()
        },
        base: recipe("wan-cfg.toml", &[]),
        base_name: "passes/wan-cfg.toml",
        inputs: root.join("examples/wan-small/inputs.safetensors"),
        rows,
    }
}

/// `broadcast-adaptive` with `options` (TOML text) plus forecasting `sets` (`broadcast-adaptive.k=v`).
fn adaptive(options: &str, sets: &[&str]) -> Option<PassSpec> {
    let mut o: toml::Table = options.parse().unwrap();
    for s in sets {
        let (k, v) = s
            .trim_start_matches("broadcast-adaptive.")
            .split_once('=')
            .unwrap();
        let v: toml::Value = v.parse().unwrap_or_else(|_| v.into());
        o.insert(k.into(), v);
    }
    Some(PassSpec {
        name: "broadcast-adaptive".into(),
        options: o,
    })
}

fn latte_setup(root: &Path, steps: usize, calibration: &[String], tmp: &Path) -> Setup {
    let steps_set = format!("sampler.steps={steps}");
    let base = Recipe::load(&root.join("passes/pab.toml"), &[steps_set]).unwrap();
    let model = root.join("examples/latte-tiny/model.onnx");
    let inputs = root.join("examples/latte-tiny/sampling.safetensors");
    let shapes = ditc::models::BuildOptions::default();
    // MagCache's ratios, measured on the calibration cases as `ditc calibrate --mag-ratios` does.
    let cal = Evaluator::new(
        &model,
        &shapes,
        &base,
        &inputs,
        calibration,
        &tmp.join("ratios"),
    )
    .unwrap();
    let ratios = ditc::cli::tune::mag_ratios(&cal).unwrap();
    let ratios: Vec<String> = ratios.iter().map(|r| format!("{r:?}")).collect();
    let mag = format!(
        "policy = \"mag-cache\"\nmag_ratios = [{}]",
        ratios.join(", ")
    );
    let preset = |name: &str| -> Option<PassSpec> {
        let text = std::fs::read_to_string(root.join("schedules/pab").join(name)).unwrap();
        Some(PassSpec {
            name: "broadcast-static".into(),
            options: text.parse().unwrap(),
        })
    };
    let fbc = |threshold: f64| {
        move |sets: &[&str]| {
            adaptive(
                &format!(
                    "policy = \"first-block-cache\"\nthreshold = {threshold:?}\ncompute_first = 2"
                ),
                sets,
            )
        }
    };
    let mut rows: Vec<(String, Option<PassSpec>)> = vec![
        ("full model (`passes/pab.toml`'s sampler)".into(), None),
        ("PAB: Latte's preset (`passes/pab.toml`: spatial 2, temporal 3, cross 6 in (100, 800), MLP broadcast)".into(), base.passes.first().cloned()),
        ("PAB: Open-Sora's preset".into(), preset("open-sora.toml")),
        ("PAB: Open-Sora-Plan v1.1's preset".into(), preset("open-sora-plan-v1.1.toml")),
    ];
    with_forecasts(
        &mut rows,
        "FirstBlockCache 0.05 (diffusers' default threshold), head = spatial + temporal block 0",
        &fbc(0.05),
    );
    with_forecasts(
        &mut rows,
        "FirstBlockCache 0.2, head = spatial + temporal block 0",
        &fbc(0.2),
    );
    with_forecasts(
        &mut rows,
        "MagCache 0.06 (diffusers' default), ratios measured on the calibration cases",
        &|sets: &[&str]| adaptive(&mag, sets),
    );
    rows.push((
        "TeaCache".into(),
        adaptive("policy = \"tea-cache\"\ncoefficients = [1.0, 0.0]", &[]),
    ));
    with_forecasts(
        &mut rows,
        "EasyCache 0.05, EasyCache4Wan2.1's defaults",
        &|sets: &[&str]| adaptive("policy = \"easy-cache\"", sets),
    );
    rows.push(("AdaCache".into(), adaptive("policy = \"ada-cache\"", &[])));
    Setup {
        title: format!("latte-tiny, no guidance, {steps} DDIM steps"),
        model,
        shapes,
        base,
        base_name: "passes/pab.toml",
        inputs,
        rows,
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let which = arg("--model").unwrap_or_else(|| "wan".into());
    let steps: usize = arg("--steps").map_or(50, |s| s.parse().expect("--steps N"));
    let budget_text = arg("--budget").unwrap_or_else(|| "rel-l2=0.1".into());
    let budget: Budget = budget_text.parse().unwrap();
    let calibration = list(&arg("--calibration").unwrap_or_else(|| "0".into()));
    let held_out = list(&arg("--held-out").unwrap_or_else(|| "1,2".into()));
    let iterations: usize = arg("--iterations").map_or(4, |s| s.parse().expect("--iterations N"));
    let margin: f64 = arg("--margin").map_or(1.0, |s| s.parse().expect("--margin M"));
    let time_limit: Option<f64> = arg("--time-limit").map(|s| s.parse().expect("--time-limit S"));
    let no_tune = std::env::args().any(|a| a == "--no-tune");
    let no_rows = std::env::args().any(|a| a == "--no-rows");
    let policies: Vec<String> = arg("--policies").map_or_else(Vec::new, |p| list(&p));

    let tmp = std::env::temp_dir().join(format!("ditc-cache-table-{}", std::process::id()));
    let setup = match which.as_str() {
        "wan" => wan_setup(root, steps),
        "latte" => latte_setup(root, steps, &calibration, &tmp),
        other => panic!("--model {other}: expected wan or latte"),
    };
    let mut held = Evaluator::new(
        &setup.model,
        &setup.shapes,
        &setup.base,
        &setup.inputs,
        &held_out,
        &tmp.join("held"),
    )
    .unwrap();
    println!(
        "{}; held-out cases {held_out:?} (worst over them); calibration cases {calibration:?}; budget {budget_text}\n",
        setup.title
    );
    println!("| policy | calls computed | FLOPs vs full | PSNR | cosine | rel-L2 | meets {budget_text} |");
    println!("|---|---|---|---|---|---|---|");
    let full = held.full_flops as f64;
    let mut meeting: Vec<(String, f64)> = Vec::new();
    for (label, pass) in setup.rows.iter().filter(|_| !no_rows) {
        match held.evaluate(pass.as_ref(), None) {
            Ok(o) => {
                let meets = print_row(label, &o, full, &budget);
                if meets && pass.is_some() {
                    meeting.push((label.to_string(), o.flops));
                }
            }
            Err(e) => println!(
                "| {label} | refused: {} | | | | | |",
                format!("{e:#}").replace('|', "/")
            ),
        }
    }
    if no_tune {
        return;
    }
    let mut cal = Evaluator::new(
        &setup.model,
        &setup.shapes,
        &setup.base,
        &setup.inputs,
        &calibration,
        &tmp.join("cal"),
    )
    .unwrap();
    let mut tuner = Tuner {
        evaluator: &mut cal,
        budget,
        margin,
        iterations,
        time_limit,
        progress: true,
        policies,
    };
    let report = tuner
        .tune(&setup.model.display().to_string(), setup.base_name)
        .unwrap();
    let mut met: Vec<_> = report
        .candidates
        .iter()
        .filter(|c| c.meets && !c.pruned)
        .collect();
    met.sort_by(|a, b| a.flops.total_cmp(&b.flops));
    println!("the cheapest candidates meeting the budget on the calibration case(s):");
    for c in met.iter().take(6) {
        println!(
            "  {:.1}% FLOPs, worst rel-L2 {:.4}: {} (threshold {:?})",
            100.0 * c.flops_relative,
            c.worst.as_ref().map_or(f64::NAN, |w| w.rel_l2),
            c.label,
            c.threshold
        );
    }
    let winner = &report.candidates[report.winner];
    let label = format!(
        "`ditc tune --budget {budget_text} --margin {margin}` on case(s) {calibration:?}: {} (threshold {:?}; {} candidates, {:.0} s)",
        winner.label,
        winner.threshold,
        report.candidates.len() - 1,
        report.seconds
    );
    let o = held.evaluate(winner.pass.as_ref(), None).unwrap();
    let meets = print_row(&label, &o, full, &budget);
    println!();
    let cheapest = meeting.iter().min_by(|a, b| a.1.total_cmp(&b.1));
    match cheapest {
        None => println!("no hand-set policy meets {budget_text} on the held-out cases; the tuned one {}", if meets { "does" } else { "does not" }),
        Some((l, f)) => println!(
            "cheapest hand-set policy meeting {budget_text} on the held-out cases: {l} at {:.1}% of full FLOPs; tuned: {:.1}% ({}), {}",
            100.0 * f / full,
            100.0 * o.flops / full,
            if meets { "meets it" } else { "misses it" },
            if o.flops < *f { "fewer FLOPs" } else { "not fewer FLOPs" }
        ),
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// One markdown row; whether every case met the budget.
fn print_row(label: &str, o: &Outcome, full: f64, budget: &Budget) -> bool {
    let w = worst(&o.fidelity).expect("cases ran");
    let meets = o.fidelity.iter().all(|f| budget.meets(f));
    let psnr = if w.psnr_db.is_finite() {
        format!("{:.2} dB", w.psnr_db)
    } else {
        "exact".into()
    };
    println!(
        "| {label} | {:.0} / {} | {:.1}% | {psnr} | {:.5} | {:.4} | {} |",
        o.calls_computed,
        o.calls_total,
        100.0 * o.flops / full,
        w.cosine,
        w.rel_l2,
        if meets { "yes" } else { "no" }
    );
    meets
}
