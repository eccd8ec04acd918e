//! The README's turbo table: wan-small (CFG 5.0, 50 flow-matching steps), the full model, each pass
//! of `passes/turbo.toml` alone, and the turbo recipe (its default, and with the options that reach
//! its fidelity budget), on the held-out cases 0 and 1 (W8A8 is calibrated on case 2 by
//! `convert --inputs`).
//!
//! `cargo bench --profile dev --bench turbo_table`. Every row is `ditc convert` then, per case,
//! `ditc run --compare-full` (subprocesses, as a user runs them); the numbers come from the
//! bundle's `report.json` after each run: calls computed, model FLOPs and attention score/value
//! FLOPs kept (both cases summed), the cost model's estimated H100 time per step and speedup, and the
//! worst case's PSNR, cosine and rel-L2 against the full model.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

const STEPS_AND_GUIDANCE: &str = "[sampler]\nkind = \"flow_euler\"\nsteps = 50\nnum_train_timesteps = 1000\nshift = 3.0\n[sampler.guidance]\nscale = 5.0\nnegative = \"negative_encoder_hidden_states\"\n";

/// wan-small's blocks for the sparse pass: 32 tokens (16 key blocks of its 512 tokens).
const BLOCKS: [&str; 2] = [
    "sparse-linear-attention.block_q=32",
    "sparse-linear-attention.block_k=32",
];

struct Row {
    label: &'static str,
    /// A recipe file of the repository, or the text of one pass after Wan's sampler.
    recipe: Recipe,
    sets: Vec<&'static str>,
    /// `--target` (W8A8's format: FP8 on hopper, the default; INT8 on ampere).
    target: &'static str,
}

enum Recipe {
    File(&'static str),
    Pass(&'static str),
}

fn rows() -> Vec<Row> {
    let turbo = |label, extra: &[&'static str]| Row {
        label,
        recipe: Recipe::File("passes/turbo.toml"),
        sets: BLOCKS.iter().chain(extra).copied().collect(),
        target: "hopper",
    };
    vec![
        Row {
            label: "full (no pass)",
            recipe: Recipe::File("passes/wan-cfg.toml"),
            sets: vec![],
            target: "hopper",
        },
        Row {
            label: "`quantize-w8a8` alone (FP8, calibrated on case 2)",
            recipe: Recipe::Pass("[[passes]]\nname = \"quantize-w8a8\"\n"),
            sets: vec![],
            target: "hopper",
        },
        Row {
            label: "`sparse-linear-attention` alone (top-k 0.1, 32-token blocks)",
            recipe: Recipe::Pass("[[passes]]\nname = \"sparse-linear-attention\"\n[passes.options]\ntopk = 0.1\nblock_q = 32\nblock_k = 32\n"),
            sets: vec![],
            target: "hopper",
        },
        Row {
            label: "`quantize-attention` alone (sage, per_thread)",
            recipe: Recipe::Pass("[[passes]]\nname = \"quantize-attention\"\n[passes.options]\nformat = \"sage\"\n"),
            sets: vec![],
            target: "hopper",
        },
        Row {
            label: "MagCache alone (`passes/wan-magcache.toml`)",
            recipe: Recipe::File("passes/wan-magcache.toml"),
            sets: vec![],
            target: "hopper",
        },
        turbo("turbo (default: top-k 0.1)", &[]),
        turbo(
            "turbo, top-k 1.0 (no block skipped: W8A8 + SageAttention + MagCache)",
            &["sparse-linear-attention.topk=1.0"],
        ),
        turbo(
            "turbo, `mass = 0.9` (SpargeAttn's selection, guard 0.6)",
            &["sparse-linear-attention.mass=0.9"],
        ),
        Row {
            label: "`quantize-w8a8` alone, INT8 (`format = \"int8\"`)",
            recipe: Recipe::Pass("[[passes]]\nname = \"quantize-w8a8\"\n[passes.options]\nformat = \"int8\"\n"),
            sets: vec![],
            target: "hopper",
        },
        turbo(
            "turbo, `mass = 0.9`, INT8 W8A8 (`format = \"int8\"`)",
            &["sparse-linear-attention.mass=0.9", "quantize-w8a8.format=\"int8\""],
        ),
    ]
}

fn ditc(args: &[&str]) -> Vec<u8> {
    let r = Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(args)
        .output()
        .expect("ditc runs");
    assert!(
        r.status.success(),
        "ditc {args:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    r.stdout
}

fn recipe_path(root: &Path, dir: &Path, row: &Row) -> PathBuf {
    match row.recipe {
        Recipe::File(f) => root.join(f),
        Recipe::Pass(text) => {
            let path = dir.join("recipe.toml");
            std::fs::write(
                &path,
                format!("name = \"one-pass\"\n{STEPS_AND_GUIDANCE}{text}"),
            )
            .unwrap();
            path
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let inputs = root.join("examples/wan-small/inputs.safetensors");
    let ckpt = root.join("examples/wan-small/ckpt");
    println!("| schedule | calls computed | model FLOPs | attention kept | est. H100 ms/step (full) | est. H100 speedup | PSNR (dB) | cosine | rel-L2 | budget rel-L2 <= 0.3 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        let recipe = recipe_path(root, dir.path(), &row);
        let mut args: Vec<String> = vec![
            "convert".into(),
            ckpt.display().to_string(),
            "--recipe".into(),
            recipe.display().to_string(),
            "-o".into(),
            bundle.display().to_string(),
            "--no-progress".into(),
            "--inputs".into(),
            inputs.display().to_string(),
            "--calibration-cases".into(),
            "2".into(),
            "--target".into(),
            row.target.into(),
        ];
        args.extend(common::WAN_SMALL_SHAPES.map(String::from));
        for s in &row.sets {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        ditc(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let manifest = bundle.join("manifest.json");
        let mut measured = Vec::new();
        for prefix in ["0.", "1."] {
            let out = dir.path().join("sample.safetensors");
            ditc(&[
                "run",
                manifest.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--prefix",
                prefix,
                "-o",
                out.to_str().unwrap(),
                "--compare-full",
                "--json",
                "--no-progress",
            ]);
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(bundle.join("report.json")).unwrap())
                    .unwrap();
            measured.push(report["measured"].clone());
        }
        let sum = |key: &str| -> f64 { measured.iter().map(|m| m[key].as_f64().unwrap()).sum() };
        let worst = |key: &str, low: bool| -> f64 {
            let values = measured
                .iter()
                .map(|m| m["fidelity"][key].as_f64().unwrap_or(f64::INFINITY));
            if low {
                values.fold(f64::INFINITY, f64::min)
            } else {
                values.fold(f64::NEG_INFINITY, f64::max)
            }
        };
        let kept: f64 = measured
            .iter()
            .map(|m| m["attention_flops_kept_fraction"].as_f64().unwrap())
            .sum::<f64>()
            / measured.len() as f64;
        let rel_l2 = worst("rel_l2", false);
        println!(
            "| {} | {:.0}/{:.0} | {:.1}% | {:.1}% | {:.5} ({:.5}) | {:.2}x | {:.2} | {:.5} | {:.4} | {} |",
            row.label,
            sum("calls_computed"),
            sum("calls"),
            100.0 * sum("model_flops") / sum("model_flops_full"),
            100.0 * kept,
            sum("h100_ms_per_step") / measured.len() as f64,
            sum("h100_ms_per_step_full") / measured.len() as f64,
            sum("h100_ms_per_step_full") / sum("h100_ms_per_step"),
            worst("psnr_db", true),
            worst("cosine", true),
            rel_l2,
            if rel_l2 <= 0.3 { "met" } else { "missed" }
        );
    }
}
