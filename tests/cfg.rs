//! Classifier-free guidance on the trained wan-small: the runtime's CFG loop against diffusers'
//! WanPipeline trajectories (cond call, uncond call, `u + 5 (c - u)`, flow Euler step), and PAB with
//! state per branch checked by identity (guidance scale 1 equals the conditional run alone).

mod common;

use common::{convert_wan_small, ditc_ok, f32_named, fixture, repo_path, run_bundle};
use ditc::metrics::compare;
use ditc::schedule::guidance::Branch;
use ditc::tensors::read_safetensors;

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn cfg_trajectories_match_diffusers_full() {
    let dir = fixture("wan-small");
    let inputs = dir.join("sampling.safetensors");
    let reference = read_safetensors(&inputs).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cfg");
    let manifest = convert_wan_small(&dir, &repo_path("passes/wan-cfg.toml"), &[], &out);
    let errors = ditc::manifest::validate_schema(&manifest);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(
        manifest["sampler"]["guidance"],
        serde_json::json!({ "scale": 5.0, "negative": "negative_encoder_hidden_states", "input": "encoder_hidden_states" })
    );
    ditc_ok(&["lint", out.join("model.onnx").to_str().unwrap()]);
    // An inputs file without the negative is refused by name, before any step runs.
    let case0 = common::case(&reference, 0);
    let partial: Vec<_> = case0
        .iter()
        .filter(|t| t.name == "noise" || t.name == "encoder_hidden_states")
        .cloned()
        .collect();
    let partial_path = tmp.path().join("partial.safetensors");
    ditc::tensors::write_safetensors(&partial_path, &partial).unwrap();
    let sample = tmp.path().join("s.safetensors");
    common::assert_refused(
        &[
            "run",
            out.join("manifest.json").to_str().unwrap(),
            "--inputs",
            partial_path.to_str().unwrap(),
            "-o",
            sample.to_str().unwrap(),
            "--no-progress",
        ],
        &[
            "no tensor 'negative_encoder_hidden_states'",
            "sampler.guidance.negative",
        ],
    );
    assert!(!sample.exists());
    for case in 0..3 {
        let t = std::time::Instant::now();
        let (latent, report) = run_bundle(
            &out.join("manifest.json"),
            &inputs,
            &format!("{case}."),
            false,
        );
        let calls: Vec<usize> = [Branch::Cond, Branch::Uncond]
            .iter()
            .map(|b| report.scheduled.branches[b].model_calls.computed)
            .collect();
        assert_eq!(calls, [50, 50], "two calls per step, all computed");
        let f = compare(
            &latent,
            &f32_named(&reference, &format!("{case}.full.final")),
        );
        eprintln!(
            "case {case}: CFG full vs diffusers rel L2 {:.2e} ({:.1} ms per call)",
            f.rel_l2,
            1e3 * t.elapsed().as_secs_f64() / 100.0
        );
        assert!(f.rel_l2 <= 1e-4, "case {case}: rel L2 {}", f.rel_l2);
    }
}

/// PAB keeps its state per branch. diffusers' PAB shares one state between the branches, so there is
/// no reference run to match; with guidance scale 1, `u + 1 (c - u) = c` (to rounding), so the CFG run
/// must equal the PAB run without guidance on the conditional inputs. With the negative all zeros the
/// unconditional branch's attention differs, so a state shared between branches would break this.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn pab_with_cfg_at_scale_one_is_the_conditional_run() {
    let dir = fixture("wan-small");
    let inputs = dir.join("sampling.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo_path("passes/pab-flow.toml");
    let steps = "sampler.steps=20";
    let plain = tmp.path().join("pab");
    convert_wan_small(&dir, &recipe, &[steps], &plain);
    let cfg = tmp.path().join("pab-cfg");
    let manifest = convert_wan_small(
        &dir,
        &recipe,
        &[
            steps,
            "sampler.guidance={ scale = 1.0, negative = \"zeros\" }",
        ],
        &cfg,
    );
    assert!(ditc::manifest::validate_schema(&manifest).is_empty());
    // Calls over both branches: 3 full-attention sites, period 2 in (100, 850).
    let full_calls = &manifest["schedule"]["calls"]["full"];
    assert_eq!(full_calls["total"], 6 * 20 * 2);
    let (alone, _) = run_bundle(&plain.join("manifest.json"), &inputs, "0.", false);
    let (guided, report) = run_bundle(&cfg.join("manifest.json"), &inputs, "0.", false);
    let cond = &report.scheduled.branches[&Branch::Cond];
    let uncond = &report.scheduled.branches[&Branch::Uncond];
    assert!(
        cond.calls[&ditc::schedule::Group::Full].skipped > 0,
        "PAB reuses"
    );
    assert_eq!(cond.decisions, uncond.decisions, "same static tables");
    let f = compare(&guided, &alone);
    eprintln!("PAB + CFG scale 1 vs PAB alone: rel L2 {:.2e}", f.rel_l2);
    assert!(f.rel_l2 <= 1e-5, "rel L2 {}", f.rel_l2);
}
