//! The turbo composition on wan-small (classifier-free guidance 5.0, flow Euler): every pair of its
//! passes (W8A8 GEMMs, block-sparse attention, SageAttention, MagCache) converted and sampled through
//! `ditc run`, each checked against what its passes promise independently of the run (closed-form
//! kept scores, the MagCache table, the plugin nodes); and the whole turbo bundle sampled by ditc's
//! runtime against tract alone planning the function-inlined graph (`DITC_RUNTIME_REWRITES=0`), plus
//! its conversion report.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ditc_ok, repo_path, run_args, run_bundle, strs};

#[derive(Clone, Copy, Debug, PartialEq)]
enum P {
    /// quantize-w8a8 (FP8, the Hopper default), calibrated by `convert --inputs`.
    W,
    /// sparse-linear-attention, top-k 0.2 of 32-token blocks (3 of 16 key blocks).
    S,
    /// quantize-attention, sage.
    Q,
    /// broadcast-adaptive, MagCache with wan-small's preset.
    C,
}

fn pass_toml(p: P) -> String {
    match p {
        P::W => "[[passes]]\nname = \"quantize-w8a8\"\n".into(),
        P::S => "[[passes]]\nname = \"sparse-linear-attention\"\n[passes.options]\ntopk = 0.2\nblock_q = 32\nblock_k = 32\n".into(),
        P::Q => "[[passes]]\nname = \"quantize-attention\"\n[passes.options]\nformat = \"sage\"\n".into(),
        P::C => format!(
            "[[passes]]\nname = \"broadcast-adaptive\"\npreset = {:?}\n",
            repo_path("schedules/mag-cache/wan-small.toml").display().to_string()
        ),
    }
}

/// A recipe with Wan's sampler (`steps` steps, guidance 5.0) and `passes` in turbo's order.
fn recipe(dir: &Path, passes: &[P], steps: usize) -> PathBuf {
    let mut text = format!(
        "name = \"pair\"\n[sampler]\nkind = \"flow_euler\"\nsteps = {steps}\nnum_train_timesteps = 1000\nshift = 3.0\n[sampler.guidance]\nscale = 5.0\nnegative = \"negative_encoder_hidden_states\"\n"
    );
    for p in passes {
        text += &pass_toml(*p);
    }
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn inputs() -> PathBuf {
    repo_path("examples/wan-small/inputs.safetensors")
}

/// Convert wan-small with `recipe`, calibrating on case 1 when a pass needs statistics.
fn convert(recipe: &Path, out: &Path) -> serde_json::Value {
    let inputs = inputs();
    let mut args =
        common::convert_wan_small_args(&repo_path("examples/wan-small"), recipe, &[], out);
    args.extend(
        [
            "--inputs",
            inputs.to_str().unwrap(),
            "--calibration-cases",
            "1",
        ]
        .map(String::from),
    );
    ditc_ok(&strs(&args));
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

/// Per call of a site with 512 queries and keys in 32-token blocks, top-k 0.2 keeps 3 of 16 key
/// blocks per query block: 3/16 of the dense scores, exactly.
const KEPT_FRACTION: f64 = 3.0 / 16.0;

#[test]
fn every_pair_of_turbo_passes_samples_through_ditc_run() {
    use P::*;
    let pairs = [(W, S), (W, Q), (W, C), (S, Q), (S, C), (Q, C)];
    for (a, b) in pairs {
        let dir = tempfile::tempdir().unwrap();
        let passes = [a, b];
        let has = |p: P| passes.contains(&p);
        // MagCache's preset holds 50 steps of ratios; without it 20 steps keep the test short.
        let steps = if has(C) { 50 } else { 20 };
        let out = dir.path().join("bundle");
        let m = convert(&recipe(dir.path(), &passes, steps), &out);
        let (latent, report) = run_bundle(&out.join("manifest.json"), &inputs(), "0.", true);
        let label = format!("{a:?}+{b:?}");
        assert!(
            latent.iter().all(|x| x.is_finite()),
            "{label}: finite sample"
        );
        let f = report.fidelity.as_ref().unwrap();
        println!(
            "{label}: rel-L2 {:.4}, PSNR {:.2} dB vs full; attention kept {:.3}",
            f.rel_l2, f.psnr_db, report.attention_flops_kept_fraction
        );
        assert!(f.rel_l2 > 0.0 && f.rel_l2.is_finite(), "{label}: {f:?}");
        let s = &report.scheduled;
        let plugins: Vec<(&str, usize)> = m["tensorrt"]["plugins"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap(),
                            p["nodes"].as_array().unwrap().len(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if has(W) {
            let quantized = m["precision"]["quantized"].as_array().unwrap().len();
            assert_eq!(
                quantized, 60,
                "{label}: every projection and FFN layer of 6 blocks"
            );
            assert!(
                out.join("calibration.json").is_file(),
                "{label}: statistics kept"
            );
        }
        match (has(S), has(Q)) {
            (true, true) => assert_eq!(plugins, [("SageSparseLinearAttention", 6)], "{label}"),
            (true, false) => assert_eq!(plugins, [("SparseLinearAttention", 6)], "{label}"),
            (false, true) => assert_eq!(plugins, [("SageAttention", 6)], "{label}"),
            (false, false) => assert!(plugins.is_empty(), "{label}"),
        }
        // The MagCache table decides every call, per branch, as the manifest says.
        let mut computed_calls = 2 * steps;
        if has(C) {
            let tables = &m["schedule"]["tables"]["stack"];
            let table: Vec<bool> = serde_json::from_value(tables.clone()).unwrap();
            let uncond: Vec<bool> = m["schedule"]["uncond_tables"]["stack"]
                .as_array()
                .map(|_| {
                    serde_json::from_value(m["schedule"]["uncond_tables"]["stack"].clone()).unwrap()
                })
                .unwrap_or_else(|| table.clone());
            for (branch, want) in [("cond", &table), ("uncond", &uncond)] {
                let got = &s
                    .branches
                    .iter()
                    .find(|(b, _)| b.as_str() == branch)
                    .unwrap()
                    .1
                    .stack_decisions;
                assert_eq!(got, want, "{label}: {branch} decisions");
            }
            computed_calls = table.iter().chain(&uncond).filter(|&&c| c).count();
            assert!(computed_calls < 2 * steps, "{label}: the cache skips calls");
        }
        // Block-sparse sites compute 3/16 of their scores at every call they run, none when skipped.
        if has(S) {
            assert_eq!(s.sparse_sites.len(), 6, "{label}");
            let dense_per_call = m["sparse_attention"]["sites"][0]["scores_dense"]
                .as_u64()
                .unwrap();
            for (id, site) in &s.sparse_sites {
                assert_eq!(site.kept_fraction, KEPT_FRACTION, "{label}: site {id}");
                assert_eq!(
                    site.scores_dense,
                    dense_per_call * computed_calls as u64,
                    "{label}: site {id} counted at the {computed_calls} computed calls"
                );
            }
        }
    }
}

#[test]
fn quantized_attention_alone_is_compared_with_the_float_model() {
    // (Its reference is the source model, not the bundle with every site computing, which would
    // hold the same quantized attention.)
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    convert(&recipe(dir.path(), &[P::Q], 10), &out);
    let (_, report) = run_bundle(&out.join("manifest.json"), &inputs(), "0.", true);
    let f = report.fidelity.unwrap();
    println!(
        "sage alone, 10 steps: rel-L2 {:.2e} vs the float model",
        f.rel_l2
    );
    assert!(f.rel_l2 > 1e-3 && f.rel_l2 < 0.3, "{f:?}");
}

/// The sample of a `ditc run` subprocess (`env` set), read back from its output file.
fn sample_with(
    manifest: &Path,
    out: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Vec<f32>, Vec<u8>) {
    let args = run_args(manifest, &inputs(), "0.", out, extra);
    let r = Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "ditc run: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let t = ditc::tensors::read_safetensors(out).unwrap();
    (t[0].to_f32_vec().unwrap(), r.stdout)
}

#[test]
fn the_turbo_bundle_runs_as_tract_runs_its_inlined_graph_and_reports_itself() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("turbo");
    let inputs = inputs();
    let mut args = common::convert_wan_small_args(
        &repo_path("examples/wan-small"),
        &repo_path("passes/turbo.toml"),
        &[
            "sparse-linear-attention.block_q=32",
            "sparse-linear-attention.block_k=32",
        ],
        &out,
    );
    args.extend(
        [
            "--inputs",
            inputs.to_str().unwrap(),
            "--calibration-cases",
            "1,2",
        ]
        .map(String::from),
    );
    ditc_ok(&strs(&args));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    // TensorRT side: the lint passes (convert refuses otherwise; and `ditc lint` agrees), the plugin
    // requirement lists every SageSLA node, the trtexec command loads ditc's plugin library.
    let model = out.join("model.onnx");
    ditc_ok(&["lint", model.to_str().unwrap()]);
    let plugins = m["tensorrt"]["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 1);
    assert_eq!(plugins[0]["name"], "SageSparseLinearAttention");
    assert_eq!(plugins[0]["nodes"].as_array().unwrap().len(), 6);
    let build = m["tensorrt"]["build_command"].as_str().unwrap();
    assert!(build.contains("libditc_plugins.so"), "{build}");
    assert_eq!(m["precision"]["format"], "w8a8-fp8-e4m3");

    // ditc's runtime (its rewrites on) vs tract alone on the function-inlined graph.
    let manifest = out.join("manifest.json");
    let (ditc_sample, stdout) = sample_with(
        &manifest,
        &dir.path().join("a.safetensors"),
        &[],
        &["--compare-full", "--json"],
    );
    let (tract_sample, _) = sample_with(
        &manifest,
        &dir.path().join("b.safetensors"),
        &[("DITC_RUNTIME_REWRITES", "0")],
        &["--json"],
    );
    let diff: f64 = ditc_sample
        .iter()
        .zip(&tract_sample)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = tract_sample
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "turbo: ditc run vs tract alone, final latent after 100 calls: rel-L2 {:.2e}",
        diff / norm
    );
    assert!(diff / norm <= 1e-4, "rel-L2 {}", diff / norm);

    // The conversion report: what each pass changed, completed by --compare-full.
    let run: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let names: Vec<&str> = report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "quantize-w8a8",
            "sparse-linear-attention",
            "quantize-attention",
            "broadcast-adaptive"
        ]
    );
    assert_eq!(report["fidelity_budget"], "rel-l2=0.3");
    let measured = &report["measured"];
    assert_eq!(measured["fidelity"]["rel_l2"], run["fidelity"]["rel_l2"]);
    let rel_l2 = run["fidelity"]["rel_l2"].as_f64().unwrap();
    assert_eq!(measured["budget_met"], serde_json::json!(rel_l2 <= 0.3));
    assert_eq!(measured["calls"], 100);
    assert_eq!(
        measured["calls_computed"].as_u64().unwrap(),
        m["schedule"]["calls"]["stack"]["computed"]
            .as_u64()
            .unwrap()
    );
    assert!(out.join("report.md").is_file());
    // The H100 estimate per step from the run's own counts, by the documented model: GEMM FLOPs at
    // 300 TFLOP/s over FP8's 1.48, self-attention sites' cost-model time over Sage's 1.6.
    let steps = run["scheduled"]["steps"].as_f64().unwrap();
    let estimate = |r: &serde_json::Value, gemm: f64, attention: f64| {
        let sites = r["attention_h100_ms"].as_object().unwrap();
        let cross: Vec<String> = m["dit_map"]["attention"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "cross")
            .map(|s| s["id"].to_string())
            .collect();
        let attention_ms: f64 = sites
            .iter()
            .map(|(id, ms)| ms.as_f64().unwrap() / if cross.contains(id) { 1.0 } else { attention })
            .sum();
        (r["gemm_flops"].as_f64().unwrap() / 300e12 * 1e3 / gemm + attention_ms) / steps
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    let optimized = estimate(&run["scheduled"], 1.48, 1.6);
    let full = estimate(&run["full"], 1.0, 1.0);
    assert!(
        close(measured["h100_ms_per_step"].as_f64().unwrap(), optimized),
        "{measured}"
    );
    assert!(
        close(measured["h100_ms_per_step_full"].as_f64().unwrap(), full),
        "{measured}"
    );
}

#[test]
fn the_latte_turbo_recipe_composes_on_a_ddim_model_without_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latte");
    let inputs = repo_path("examples/latte-tiny/sampling.safetensors");
    ditc_ok(&[
        "convert",
        repo_path("examples/latte-tiny/model.onnx")
            .to_str()
            .unwrap(),
        "--recipe",
        repo_path("passes/turbo-latte.toml").to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--calibration-cases",
        "1,2",
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        m["tensorrt"]["plugins"][0]["name"],
        "SageSparseLinearAttention"
    );
    assert_eq!(m["schedule"]["policy"], "easy-cache");
    let (latent, report) = run_bundle(&out.join("manifest.json"), &inputs, "0.", true);
    assert!(latent.iter().all(|x| x.is_finite()));
    let s = &report.scheduled;
    // EasyCache decides in the graph; the spatial sparse sites count scores only when computed.
    let cond = s.branches.values().next().unwrap();
    assert!(cond.model_calls.skipped > 0 && cond.model_calls.computed > 0);
    for (id, site) in &s.sparse_sites {
        let dense_per_call = m["sparse_attention"]["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["site"] == *id)
            .unwrap()["scores_dense"]
            .as_u64()
            .unwrap();
        assert_eq!(
            site.scores_dense,
            dense_per_call * cond.model_calls.computed as u64,
            "site {id}"
        );
        assert!(site.kept_fraction > 0.0 && site.kept_fraction < 1.0);
    }
    println!(
        "latte turbo: rel-L2 {:.4} vs full",
        report.fidelity.unwrap().rel_l2
    );
}
