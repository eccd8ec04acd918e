//! Fidelity of `sparse-linear-attention` on wan-small: the README's table.
//!
//! `cargo bench --profile dev --bench sla_fidelity`. Converts the example wan-small checkpoint
//! (examples/wan-small: 512 tokens, CFG 5.0, 50 flow-matching steps) with `passes/wan-sla.toml`
//! (32-token blocks: 16 key blocks per site) for top-k 0.5, 0.3, 0.2, 0.1 and the cumulative-mass mode
//! (0.9), each without and with dense warm-up (the first 10 steps dense), samples case 0 of
//! `inputs.safetensors` with each, and prints the final latent's PSNR, cosine and relative L2 against
//! the dense run (`passes/wan-cfg.toml`), the attention FLOPs kept (score and value products over
//! all sites and calls, counted by the graph at run time), and the relative L2 error of one
//! conditional call on case 0's noise at timestep 500 (step 25) against the dense graph's.
//!
//! Quantized attention rows (`quantize-attention`): `fp8` (`passes/wan-fp8-attention.toml`, amax
//! calibrated by `ditc calibrate` on case 1) and `sage` per_thread and per_block
//! (`passes/wan-sage.toml`), same columns. `-- --only quantized` runs just those rows, `-- --only
//! sparse` just the sparse ones.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn convert(root: &Path, recipe: &str, sets: &[String], out: &Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ditc"));
    cmd.arg("convert")
        .arg(root.join("examples/wan-small/ckpt"))
        .args(common::WAN_SMALL_SHAPES)
        .arg("--recipe")
        .arg(root.join(recipe))
        .arg("-o")
        .arg(out)
        .arg("--no-progress");
    for s in sets {
        cmd.args(["--set", s]);
    }
    let status = cmd.status().expect("ditc runs");
    assert!(status.success(), "convert {sets:?}");
}

/// `ditc calibrate` wan-small with `recipe` on case 1 into `out` (stats.json).
fn calibrate(root: &Path, recipe: &str, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_ditc"))
        .arg("calibrate")
        .arg(root.join("examples/wan-small/ckpt"))
        .args(common::WAN_SMALL_SHAPES)
        .arg("--recipe")
        .arg(root.join(recipe))
        .arg("--inputs")
        .arg(root.join("examples/wan-small/inputs.safetensors"))
        .args(["--cases", "1", "--no-progress", "-o"])
        .arg(out)
        .status()
        .expect("ditc runs");
    assert!(status.success(), "calibrate {recipe}");
}

fn sample(root: &Path, bundle: &Path) -> (Vec<f32>, ditc::cli::run::Report) {
    let args = ditc::cli::run::Args {
        model: bundle.join("manifest.json"),
        inputs: root.join("examples/wan-small/inputs.safetensors"),
        prefix: Some("0.".into()),
        output: bundle.join("unused.safetensors"),
        compare_full: false,
        json: true,
        trace: None,
        plot: None,
        no_progress: true,
        no_verify: false,
        shapes: Default::default(),
        threads: Default::default(),
    };
    let (latent, report) = ditc::cli::run::sample_bundle(&args).expect("sampling");
    (latent.to_f32_vec().expect("f32"), report)
}

/// One conditional call of the bundle's graph on case 0's noise at timestep 500, step 25: the
/// prediction (the per-call error, before 50 guided steps amplify it).
fn one_call(root: &Path, bundle: &Path) -> Vec<f32> {
    let model = ditc::onnx::read_model(&bundle.join("model.onnx")).expect("graph");
    let inputs =
        ditc::tensors::read_safetensors(&root.join("examples/wan-small/inputs.safetensors"))
            .expect("inputs");
    let get = |n: &str, as_name: &str| {
        let t = inputs.iter().find(|t| t.name == n).expect("input").clone();
        ditc::ir::Tensor {
            name: as_name.into(),
            ..t
        }
    };
    let feed = [
        get("0.noise", "hidden_states"),
        get("0.encoder_hidden_states", "encoder_hidden_states"),
        ditc::ir::Tensor::from_f32("timestep", vec![1], &[500.0]),
        ditc::ir::Tensor::from_i64("ditc.step", vec![], &[25]),
    ];
    let feed: Vec<ditc::ir::Tensor> = feed
        .into_iter()
        .filter(|t| model.graph.runtime_inputs().any(|i| i.name == t.name))
        .collect();
    let out = ditc::runtime::run_once(&model, &feed).expect("one call");
    out[0].to_f32_vec().expect("f32")
}

/// One table row: convert `recipe` with `sets`, sample case 0, compare with the dense run.
fn row(
    root: &Path,
    recipe: &str,
    sets: &[String],
    out: &Path,
    full: &[f32],
    full_call: &[f32],
) -> String {
    convert(root, recipe, sets, out);
    let (latent, report) = sample(root, out);
    let f = ditc::metrics::compare(&latent, full);
    let call = ditc::metrics::compare(&one_call(root, out), full_call);
    format!(
        "{:.2} | {:.5} | {:.4} | {:.1}% | {:.2e} |",
        f.psnr_db,
        f.cosine,
        f.rel_l2,
        100.0 * report.attention_flops_kept_fraction,
        call.rel_l2
    )
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let only = common::arg("--only");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dense = tmp.path().join("dense");
    convert(&root, "passes/wan-cfg.toml", &[], &dense);
    let (full, _) = sample(&root, &dense);
    let full_call = one_call(&root, &dense);
    println!("| selection | dense warm-up | PSNR (dB) | cosine | rel-L2 | attention FLOPs kept | one call: rel-L2 |");
    println!("|---|---|---|---|---|---|---|");
    if only.as_deref() != Some("quantized") {
        sparse_rows(&root, tmp.path(), &full, &full_call);
    }
    if only.as_deref() != Some("sparse") {
        let stats = tmp.path().join("stats.json");
        calibrate(&root, "passes/wan-fp8-attention.toml", &stats);
        let set = format!(
            "quantize-attention.calibration_stats={}",
            toml_string(&stats)
        );
        let out = tmp.path().join("fp8");
        let cells = row(
            &root,
            "passes/wan-fp8-attention.toml",
            &[set],
            &out,
            &full,
            &full_call,
        );
        println!("| `quantize-attention` `fp8` | none | {cells}");
        for g in ["per_thread", "per_block"] {
            let out = tmp.path().join(g);
            let sets = [format!("quantize-attention.granularity={g}")];
            let cells = row(
                &root,
                "passes/wan-sage.toml",
                &sets,
                &out,
                &full,
                &full_call,
            );
            println!("| `quantize-attention` `sage` `{g}` | none | {cells}");
        }
    }
}

/// `path` as a TOML string (for `--set`).
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

fn sparse_rows(root: &Path, tmp: &Path, full: &[f32], full_call: &[f32]) {
    let selections = [
        "topk=0.5",
        "topk=0.3",
        "topk=0.2",
        "topk=0.1",
        "mass=0.9",
        "mass=0.9 sim_threshold=-1.0",
    ];
    for (i, selection) in selections.iter().enumerate() {
        for warm in [0, 10] {
            let out = tmp.join(format!("row{i}-{warm}"));
            let mut sets: Vec<String> = selection
                .split(' ')
                .map(|s| format!("sparse-linear-attention.{s}"))
                .collect();
            sets.push(format!("sparse-linear-attention.dense_steps={warm}"));
            let cells = row(root, "passes/wan-sla.toml", &sets, &out, full, full_call);
            let warm = if warm > 0 { "10 steps" } else { "none" };
            println!("| `{selection}` | {warm} | {cells}");
        }
    }
}
