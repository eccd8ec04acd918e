//! `ditc tune` on wan-small (10 steps, CFG 5.0): the recipe it writes converts as it is, and running
//! it meets the budget on every calibration case, recomputed here by converting and sampling the tuned
//! recipe and the full model independently of the tuner's report; its FLOPs are at most those of every
//! candidate the report says met the budget. Plus the refusals of bad budgets, metrics and case lists.

mod common;

use common::{
    assert_refused, convert_wan_small, ditc_ok, repo_path, run_bundle, strs, WAN_SMALL_SHAPES,
};
use ditc::metrics::compare;
use serde_json::Value;

const BUDGET: f64 = 0.35;
const CASES: [&str; 2] = ["0", "1"];

fn tune_args(out: &std::path::Path, budget: &str, cases: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "tune",
        repo_path("examples/wan-small/ckpt").to_str().unwrap(),
        "--recipe",
        repo_path("passes/wan-cfg.toml").to_str().unwrap(),
        "--inputs",
        repo_path("examples/wan-small/inputs.safetensors")
            .to_str()
            .unwrap(),
        "--cases",
        cases,
        "--budget",
        budget,
        "--set",
        "sampler.steps=10",
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    args.extend(WAN_SMALL_SHAPES.map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn the_tuned_recipe_meets_the_budget_with_the_fewest_flops() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned = tmp.path().join("tuned.toml");
    let budget = format!("rel-l2={BUDGET}");
    ditc_ok(&strs(&tune_args(
        &tuned,
        &budget,
        &CASES.join(","),
        &[
            "--policies",
            "first-block-cache,mag-cache",
            "--iterations",
            "3",
        ],
    )));
    let report: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("tuned.json")).unwrap()).unwrap();
    let candidates = report["candidates"].as_array().unwrap();
    let winner = &candidates[report["winner"].as_u64().unwrap() as usize];
    eprintln!(
        "{} candidates; winner {} threshold {} at {:.3} of full FLOPs",
        candidates.len() - 1,
        winner["label"],
        winner["threshold"],
        winner["flops_relative"]
    );

    // Independently of the report: the written recipe converts as it is, and so does the full model.
    let wan = repo_path("examples/wan-small");
    let inputs = repo_path("examples/wan-small/inputs.safetensors");
    convert_wan_small(&wan, &tuned, &[], &tmp.path().join("tuned"));
    let full_recipe = repo_path("passes/wan-cfg.toml");
    convert_wan_small(
        &wan,
        &full_recipe,
        &["sampler.steps=10"],
        &tmp.path().join("full"),
    );
    let (mut flops, mut full_flops) = (0.0, 0.0);
    for case in CASES {
        let prefix = format!("{case}.");
        let (latent, r) = run_bundle(
            &tmp.path().join("tuned/manifest.json"),
            &inputs,
            &prefix,
            false,
        );
        let (full, f) = run_bundle(
            &tmp.path().join("full/manifest.json"),
            &inputs,
            &prefix,
            false,
        );
        let fidelity = compare(&latent, &full);
        eprintln!(
            "case {case}: rel-L2 {:.4}, PSNR {:.2} dB",
            fidelity.rel_l2, fidelity.psnr_db
        );
        assert!(
            fidelity.rel_l2 <= BUDGET,
            "case {case}: rel-L2 {}",
            fidelity.rel_l2
        );
        flops += r.scheduled.model_flops as f64 / CASES.len() as f64;
        full_flops += f.scheduled.model_flops as f64 / CASES.len() as f64;
    }
    // The search found something cheaper than the full model (else the FLOPs check is vacuous).
    assert!(flops < 0.95 * full_flops, "{flops} vs full {full_flops}");
    let mut met = 0;
    for c in candidates
        .iter()
        .filter(|c| c["meets"] == Value::Bool(true))
    {
        met += 1;
        let theirs = c["flops"].as_f64().unwrap();
        assert!(
            flops <= theirs * (1.0 + 1e-12),
            "candidate {}: {theirs} < tuned {flops}",
            c["index"]
        );
    }
    assert!(
        met >= 2,
        "the full model and at least one cached candidate meet the budget"
    );
    // Candidates that missed the budget were measured on real runs: some exist (the search bracketed).
    assert!(candidates.iter().any(|c| c["meets"] == Value::Bool(false)));
}

#[test]
fn bad_budgets_and_case_lists_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tuned.toml");
    for (budget, cases, extra, says) in [
        ("rel-l2", "0", &[][..], "expected METRIC=VALUE"),
        ("ssim=0.9", "0", &[][..], "unknown metric 'ssim'"),
        ("psnr=abc", "0", &[][..], "not a finite number"),
        (
            "rel-l2=0.1",
            "",
            &[][..],
            "list of calibration cases is empty",
        ),
        ("rel-l2=0.1", "7", &[][..], "no case '7'"),
        (
            "rel-l2=0.1",
            "0",
            &["--policies", "pab"][..],
            "unknown policy 'pab'",
        ),
    ] {
        assert_refused(&strs(&tune_args(&out, budget, cases, extra)), &[says]);
        assert!(!out.exists() && !tmp.path().join("tuned.json").exists());
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "no scratch left"
        );
    }
}
