//! `--threads`: sampling on 1 and 2 threads gives the same latent (tract splits work on output tiles
//! and rows, never inside a sum), and a count of 0 is refused. And the runtime's rewrites give the
//! bits tract's own plan gives.

mod common;

use std::path::Path;

use common::{assert_refused, ditc_ok, repo_path, run_args, strs};

#[test]
fn one_and_two_threads_sample_the_same_latent() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("wan");
    let recipe = repo_path("passes/wan-cfg.toml");
    common::convert_wan_small(
        &repo_path("examples/wan-small"),
        &recipe,
        &["sampler.steps=8"],
        &bundle,
    );
    let manifest = bundle.join("manifest.json");
    let inputs = repo_path("examples/wan-small/inputs.safetensors");
    let args = |out: &Path, threads: &str| {
        run_args(&manifest, &inputs, "0.", out, &["--threads", threads])
    };
    let sample = |threads: &str| {
        let out = tmp.path().join(format!("sample-{threads}.safetensors"));
        ditc_ok(&strs(&args(&out, threads)));
        let t = ditc::tensors::read_safetensors(&out).unwrap();
        common::f32_named(&t, "sample")
    };
    let one = sample("1");
    let two = sample("2");
    let diff: f64 = one
        .iter()
        .zip(&two)
        .map(|(a, b)| (a - b) as f64 * (a - b) as f64)
        .sum::<f64>()
        .sqrt();
    let norm: f64 = one.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    assert!(norm > 0.0);
    println!("1 vs 2 threads: relative L2 {:.3e}", diff / norm);
    assert!(
        diff / norm <= 1e-6,
        "1 vs 2 threads differ: {:.3e}",
        diff / norm
    );

    // The runtime's rewrites of tract's copy of the graph (src/runtime/rewrite.rs, small_kernels.rs,
    // tiled_matmul.rs) give tract's own bits over the whole trajectory, not only on the patterns
    // tests/runtime_rewrites.rs builds.
    let plain = tmp.path().join("sample-tract-alone.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(strs(&args(&plain, "1")))
        .env("DITC_RUNTIME_REWRITES", "0")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let t = ditc::tensors::read_safetensors(&plain).unwrap();
    let tract_alone = common::f32_named(&t, "sample");
    let differing = one.iter().zip(&tract_alone).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing, 0,
        "{differing} values differ from tract's own plan"
    );

    let out = tmp.path().join("never.safetensors");
    assert_refused(&strs(&args(&out, "0")), &["--threads", "at least 1"]);
    assert!(!out.exists());
}

/// latte-tiny (temporal attention over 8 frames, cross-attention over 4 tokens: the short products
/// and softmaxes the runtime computes itself) sampled with the runtime's rewrites and by tract's own
/// plan: the same bits.
#[test]
fn latte_samples_tract_bits_with_the_runtime_rewrites() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("latte");
    let demo = common::demo();
    ditc_ok(&strs(&[
        "convert".into(),
        demo.join("model.onnx").to_str().unwrap().to_string(),
        "--recipe".into(),
        repo_path("passes/pab.toml").to_str().unwrap().to_string(),
        "--set".into(),
        "sampler.steps=6".into(),
        "-o".into(),
        bundle.to_str().unwrap().to_string(),
    ]));
    let manifest = bundle.join("manifest.json");
    let inputs = demo.join("sampling.safetensors");
    let sample = |name: &str, rewrites: &str| {
        let out = tmp.path().join(name);
        let args = run_args(&manifest, &inputs, "0.", &out, &["--threads", "1"]);
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_ditc"))
            .args(strs(&args))
            .env("DITC_RUNTIME_REWRITES", rewrites)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let t = ditc::tensors::read_safetensors(&out).unwrap();
        common::f32_named(&t, "sample")
    };
    let rewritten = sample("rewritten.safetensors", "1");
    let tract_alone = sample("tract-alone.safetensors", "0");
    assert!(rewritten.iter().any(|v| *v != 0.0));
    let differing = rewritten
        .iter()
        .zip(&tract_alone)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "{differing} values differ from tract's own plan"
    );
}
