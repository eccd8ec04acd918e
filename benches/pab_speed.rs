//! Wall time of scheduled sampling against the plain graph, in one run.
//!
//! `cargo bench --bench pab_speed` (or `--profile dev` to reuse the test build). On the demo model
//! (latte-tiny, 50 DDIM steps) it measures, interleaved over R repetitions (`-- --reps R`, default 7),
//! the median sampling time (plans excluded; reported separately) of:
//! - `plain`: the model converted with the sampler only (no pass);
//! - `period1`: `broadcast-static` with every period 1 (must stay within 1.10x of plain);
//! - `pab`: the Latte PAB preset (attention and MLP broadcast), against the same bundle run with every
//!   site computing (`full`);
//! - `pab-attention`: the preset's attention periods only (spatial 2, temporal 3, cross 6), no MLP.
//!
//! It compares PAB's measured speedup with the ideal from its FLOP ratio (bound: >= 0.9 of ideal), prints
//! PASS or FAIL for each of the three bounds and exits with status 1 when one is missed.

use std::path::Path;
use std::process::Command;

use ditc::ir::Tensor;
use ditc::runtime::{sample, Bundle, RunReport};

mod common;

fn main() {
    let reps = common::reps(7);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = root.join("examples/latte-tiny/model.onnx");
    let recipe = root.join("passes/pab.toml");
    let tmp = std::env::temp_dir().join(format!("ditc-pab-bench-{}", std::process::id()));
    let ones: Vec<String> = ["spatial", "temporal", "cross"]
        .iter()
        .map(|k| format!("broadcast-static.{k}={{ period = 1, window = [100, 800] }}"))
        .collect();
    let plain_recipe = tmp.join("plain.toml");
    std::fs::create_dir_all(&tmp).unwrap();
    let text = std::fs::read_to_string(&recipe).unwrap();
    let sampler = &text[..text.find("[[passes]]").unwrap()];
    std::fs::write(&plain_recipe, sampler).unwrap();
    let bare_recipe = tmp.join("bare.toml");
    std::fs::write(
        &bare_recipe,
        format!("{sampler}[[passes]]\nname = \"broadcast-static\"\n"),
    )
    .unwrap();
    convert(&demo, &plain_recipe, &[], &tmp.join("plain"));
    convert(&demo, &bare_recipe, &ones, &tmp.join("period1"));
    convert(&demo, &recipe, &[], &tmp.join("pab"));
    let latte_attention: Vec<String> = [("spatial", 2), ("temporal", 3), ("cross", 6)]
        .iter()
        .map(|(k, p)| format!("broadcast-static.{k}={{ period = {p}, window = [100, 800] }}"))
        .collect();
    convert(
        &demo,
        &bare_recipe,
        &latte_attention,
        &tmp.join("pab-attention"),
    );

    let inputs =
        ditc::tensors::read_safetensors(&root.join("examples/latte-tiny/io.safetensors")).unwrap();
    let pick = |n: &str| -> Tensor {
        let mut t = inputs
            .iter()
            .find(|t| t.name == format!("0.{n}"))
            .unwrap()
            .clone();
        t.name = n.to_string();
        t
    };
    let noise = pick("hidden_states");
    let extra = vec![pick("encoder_hidden_states")];
    let open = |n: &str| Bundle::open(&tmp.join(n).join("manifest.json")).unwrap();
    let (plain, period1, pab, attention) = (
        open("plain"),
        open("period1"),
        open("pab"),
        open("pab-attention"),
    );
    let mut times: [Vec<f64>; 5] = Default::default();
    let mut reports: [Option<RunReport>; 5] = Default::default();
    for _ in 0..reps {
        let runs = [
            (&plain, false),
            (&period1, false),
            (&pab, false),
            (&pab, true),
            (&attention, false),
        ];
        for (slot, (bundle, full)) in runs.iter().enumerate() {
            let (_, report) = sample(bundle, &noise, &extra, *full, false).unwrap();
            times[slot].push(report.wall_seconds - report.plan_seconds);
            reports[slot] = Some(report);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let [p, one, s, f, a] = times.each_mut().map(median);
    let ideal_of = |slot: usize| {
        let r = reports[slot].as_ref().expect("ran");
        r.model_flops_full as f64 / r.model_flops as f64
    };
    let (ideal, measured) = (ideal_of(2), f / s);
    let (ideal_a, measured_a) = (ideal_of(4), f / a);
    println!("median sampling time over {reps} interleaved runs (50 steps, plans excluded):");
    println!("  plain graph       {p:.3}s");
    println!("  PAB full compute  {f:.3}s");
    let checks = [
        (
            format!("all periods 1     {one:.3}s  ratio to plain {:.3}", one / p),
            one / p <= 1.10,
            "<= 1.10",
        ),
        (
            format!("PAB scheduled     {s:.3}s  speedup {measured:.3}x; ideal from FLOPs {ideal:.3}x; measured/ideal {:.3}", measured / ideal),
            measured / ideal >= 0.9,
            ">= 0.9",
        ),
        (
            format!("PAB attention     {a:.3}s  speedup {measured_a:.3}x; ideal from FLOPs {ideal_a:.3}x; measured/ideal {:.3}", measured_a / ideal_a),
            measured_a / ideal_a >= 0.9,
            ">= 0.9",
        ),
    ];
    for (line, pass, bound) in &checks {
        let verdict = if *pass { "PASS" } else { "FAIL" };
        println!("{verdict} {line} (bound {bound})");
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let failed = checks.iter().filter(|c| !c.1).count();
    if failed > 0 {
        println!("{failed} of {} bounds missed (wall times: on a loaded machine they measure the load too)", checks.len());
        std::process::exit(1);
    }
}

fn convert(model: &Path, recipe: &Path, sets: &[String], out: &Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ditc"));
    cmd.args([
        "convert",
        model.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}
