//! The caching comparison table of the README (issue 12) on wan-small: every hand-set policy and the
//! `ditc tune` winner, on held-out cases, against the full model.
//!
//! `cargo bench --profile dev --bench cache_table [-- --steps 50 --budget rel-l2=0.1 --calibration 0
//! --held-out 1,2 --iterations 4 --time-limit S --no-tune]`. wan-small (`examples/wan-small/ckpt`, 8 x 16
//! x 16 latents, 4 caption tokens) with passes/wan-cfg.toml's sampler (flow Euler shift 3, CFG 5.0) is
//! converted with each policy (the recipes of `passes/`, as shipped, plus forecasting where supported),
//! sampled on the held-out cases of `examples/wan-small/inputs.safetensors` (cases 0-2 of the fixture;
//! case 0 is the calibration case: MagCache's preset ratios were measured on it, and the tuner tunes on
//! it), and compared with the full model's final latent. It prints a markdown table: calls computed
//! (mean per run, both branches), computed FLOPs relative to full, and the worst PSNR / cosine / rel-L2
//! over the held-out cases; then the tuned row and whether it beats every hand-set policy that meets
//! the same budget on the held-out cases.

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

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let steps: usize = arg("--steps").map_or(50, |s| s.parse().expect("--steps N"));
    let budget_text = arg("--budget").unwrap_or_else(|| "rel-l2=0.1".into());
    let budget: Budget = budget_text.parse().unwrap();
    let calibration = list(&arg("--calibration").unwrap_or_else(|| "0".into()));
    let held_out = list(&arg("--held-out").unwrap_or_else(|| "1,2".into()));
    let iterations: usize = arg("--iterations").map_or(4, |s| s.parse().expect("--iterations N"));
    let time_limit: Option<f64> = arg("--time-limit").map(|s| s.parse().expect("--time-limit S"));
    let no_tune = std::env::args().any(|a| a == "--no-tune");

    let ckpt = root.join("examples/wan-small/ckpt");
    let inputs = root.join("examples/wan-small/inputs.safetensors");
    let shapes = ditc::models::BuildOptions {
        frames: Some(8),
        height: Some(16),
        width: Some(16),
        text_len: Some(4),
        ..Default::default()
    };
    let steps_set = format!("sampler.steps={steps}");
    let recipe = |name: &str, sets: &[&str]| -> Recipe {
        let mut all = vec![steps_set.clone()];
        all.extend(sets.iter().map(|s| s.to_string()));
        Recipe::load(&root.join("passes").join(name), &all).unwrap()
    };
    let base = recipe("wan-cfg.toml", &[]);
    let first_pass = |name: &str, sets: &[&str]| -> Option<PassSpec> {
        recipe(name, sets).passes.first().cloned()
    };
    let t1 = ["broadcast-adaptive.forecast=taylor"];
    let t2 = [
        "broadcast-adaptive.forecast=taylor",
        "broadcast-adaptive.order=2",
    ];
    // pab-flow.toml's pass (its recipe has no guidance; the pass applies to Wan's attention kinds).
    let pab = first_pass("pab-flow.toml", &[]);
    let ada_slow = [
        "broadcast-adaptive.codebook=30-step-slow",
        "broadcast-adaptive.block=4",
        "broadcast-adaptive.residual=cross-mlp",
        "broadcast-adaptive.moreg=false",
    ];
    let rows: Vec<(&str, Option<PassSpec>)> = vec![
        ("full model (`passes/wan-cfg.toml`)", None),
        ("PAB: `pab-flow.toml`'s CogVideoX preset (full attention period 2, cross period 6, in (100, 850))", pab),
        ("FirstBlockCache 0.05 (diffusers' default; `fbc-wan-cfg.toml`)", first_pass("fbc-wan-cfg.toml", &[])),
        ("FirstBlockCache 0.2", first_pass("fbc-wan-cfg.toml", &["broadcast-adaptive.threshold=0.2"])),
        ("MagCache 0.06 (diffusers' default; `wan-magcache.toml`)", first_pass("wan-magcache.toml", &[])),
        ("+ taylor order 1", first_pass("wan-magcache.toml", &t1)),
        ("+ taylor order 2", first_pass("wan-magcache.toml", &t2)),
        ("TeaCache 0.2, published Wan2.1-1.3B coefficients (`wan-teacache.toml`)", first_pass("wan-teacache.toml", &[])),
        ("+ taylor order 1", first_pass("wan-teacache.toml", &t1)),
        ("+ taylor order 2", first_pass("wan-teacache.toml", &t2)),
        ("EasyCache 0.05, EasyCache4Wan2.1's defaults (`wan-easycache.toml`)", first_pass("wan-easycache.toml", &[])),
        ("+ taylor order 1", first_pass("wan-easycache.toml", &t1)),
        ("+ taylor order 2", first_pass("wan-easycache.toml", &t2)),
        ("AdaCache + MoReg defaults (`wan-adacache.toml`; forecasting refused)", first_pass("wan-adacache.toml", &[])),
        ("AdaCache 30-step slow, block 4 cross-attention + MLP, no MoReg", first_pass("wan-adacache.toml", &ada_slow)),
    ];

    let tmp = std::env::temp_dir().join(format!("ditc-cache-table-{}", std::process::id()));
    let mut held =
        Evaluator::new(&ckpt, &shapes, &base, &inputs, &held_out, &tmp.join("held")).unwrap();
    println!(
        "wan-small, CFG 5.0, {steps} flow-matching steps; held-out cases {held_out:?} (worst over them); budget {budget_text}\n"
    );
    println!("| policy | calls computed | FLOPs vs full | PSNR | cosine | rel-L2 | meets {budget_text} |");
    println!("|---|---|---|---|---|---|---|");
    let full = held.full_flops as f64;
    let mut meeting: Vec<(String, f64)> = Vec::new();
    for (label, pass) in &rows {
        match held.evaluate(pass.as_ref(), None) {
            Ok(o) => {
                let meets = print_row(label, &o, full, &budget);
                if meets && pass.is_some() {
                    meeting.push((label.to_string(), o.flops));
                }
            }
            Err(e) => println!("| {label} | refused: {e:#} | | | | | |"),
        }
    }
    if no_tune {
        return;
    }
    let mut cal = Evaluator::new(
        &ckpt,
        &shapes,
        &base,
        &inputs,
        &calibration,
        &tmp.join("cal"),
    )
    .unwrap();
    let mut tuner = Tuner {
        evaluator: &mut cal,
        budget,
        iterations,
        time_limit,
        progress: true,
        policies: Vec::new(),
    };
    let report = tuner
        .tune(&ckpt.display().to_string(), "passes/wan-cfg.toml")
        .unwrap();
    let winner = &report.candidates[report.winner];
    let label = format!(
        "`ditc tune --budget {budget_text}` on case(s) {calibration:?}: {} (threshold {:?}; {} candidates, {:.0} s)",
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
