//! `ditc tune` on wan-small (10 steps, CFG 5.0): the recipe it writes converts as it is, and running
//! it meets the budget on every calibration case, recomputed here by converting and sampling the tuned
//! recipe and the full model independently of the tuner's report; its FLOPs are at most those of every
//! candidate the report says met the budget. Plus the refusals of bad budgets, metrics and case lists.

mod common;

use common::{
    assert_refused, calibrate_args, convert_wan_small, ditc_ok, repo_path, run_bundle, strs,
    WAN_SMALL_SHAPES,
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

    check_tuned(tmp.path(), &tuned, &CASES, candidates, BUDGET);
    // Candidates that missed the budget were measured on real runs: some exist (the search bracketed).
    assert!(candidates.iter().any(|c| c["meets"] == Value::Bool(false)));
}

/// Independently of the report: the recipe at `tuned` converts as it is, and so does the full
/// model; sampled on every calibration case, the tuned one stays within rel-L2 `bound` of the full
/// one, computes fewer FLOPs, and at most the FLOPs of every candidate the report says met the budget.
fn check_tuned(
    dir: &std::path::Path,
    tuned: &std::path::Path,
    cases: &[&str],
    candidates: &[Value],
    bound: f64,
) {
    // Independently of the report: the written recipe converts as it is, and so does the full model.
    let wan = repo_path("examples/wan-small");
    let inputs = repo_path("examples/wan-small/inputs.safetensors");
    convert_wan_small(&wan, tuned, &[], &dir.join("tuned"));
    let full_recipe = repo_path("passes/wan-cfg.toml");
    convert_wan_small(&wan, &full_recipe, &["sampler.steps=10"], &dir.join("full"));
    let (mut flops, mut full_flops) = (0.0, 0.0);
    for &case in cases {
        let prefix = format!("{case}.");
        let (latent, r) = run_bundle(&dir.join("tuned/manifest.json"), &inputs, &prefix, false);
        let (full, f) = run_bundle(&dir.join("full/manifest.json"), &inputs, &prefix, false);
        let fidelity = compare(&latent, &full);
        eprintln!(
            "case {case}: rel-L2 {:.4}, PSNR {:.2} dB",
            fidelity.rel_l2, fidelity.psnr_db
        );
        assert!(
            fidelity.rel_l2 <= bound,
            "case {case}: rel-L2 {}",
            fidelity.rel_l2
        );
        flops += r.scheduled.model_flops as f64 / cases.len() as f64;
        full_flops += f.scheduled.model_flops as f64 / cases.len() as f64;
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
}

/// AdaCache's and PAB's ladders, tuned with a margin: every candidate is checked against the budget
/// scaled by the margin (rel-L2 0.35 x 0.8 = 0.28), the winner meets it when recomputed here, PAB's
/// static tables are searched (presets and period pyramids), and no ladder runs a rung after one
/// that missed.
#[test]
fn ada_cache_and_pab_ladders_with_a_margin() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned = tmp.path().join("tuned.toml");
    let budget = format!("rel-l2={BUDGET}");
    ditc_ok(&strs(&tune_args(
        &tuned,
        &budget,
        "0",
        &["--policies", "ada-cache,pab", "--margin", "0.8"],
    )));
    let report: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("tuned.json")).unwrap()).unwrap();
    let tightened = BUDGET * 0.8;
    assert!((report["budget"]["bound"].as_f64().unwrap() - tightened).abs() < 1e-12);
    assert_eq!(report["target"]["bound"].as_f64().unwrap(), BUDGET);
    let candidates = report["candidates"].as_array().unwrap();
    let winner = &candidates[report["winner"].as_u64().unwrap() as usize];
    eprintln!(
        "{} candidates; winner {} at {:.3} of full FLOPs",
        candidates.len() - 1,
        winner["label"],
        winner["flops_relative"]
    );
    for c in &candidates[1..] {
        eprintln!(
            "  {} {}: meets {} pruned {} flops {:.3} worst rel-L2 {}",
            c["index"],
            c["label"],
            c["meets"],
            c["pruned"],
            c["flops_relative"],
            c["worst"]["rel_l2"]
        );
        let policy = c["policy"].as_str().unwrap();
        assert!(policy == "ada-cache" || policy == "pab", "{policy}");
        if c["meets"] == Value::Bool(true) {
            assert!(c["worst"]["rel_l2"].as_f64().unwrap() <= tightened);
        }
    }
    assert!(candidates.iter().any(|c| c["policy"] == "pab"));
    assert!(candidates.iter().any(|c| c["policy"] == "ada-cache"));
    // Rungs of one ada-cache ladder share the label after the codebook: after a miss, none follows.
    let ladder = |label: &str| label.split_once(", ").map_or("", |x| x.1).to_string();
    let mut missed: Vec<String> = Vec::new();
    for c in candidates.iter().filter(|c| c["policy"] == "ada-cache") {
        let l = ladder(c["label"].as_str().unwrap());
        assert!(!missed.contains(&l), "a rung after a miss: {}", c["label"]);
        if c["meets"] == Value::Bool(false) && c["pruned"] == Value::Bool(false) {
            missed.push(l);
        }
    }
    check_tuned(tmp.path(), &tuned, &["0"], candidates, tightened);
}

/// The accumulate-and-reset rule the README gives for a static table, written out again here: step 0
/// computes; a later step reuses while the drift summed since the last computed step (its own
/// included) stays within `threshold`; a step without a measured drift computes.
fn table_by_hand(drift: &[Option<f64>], threshold: f64) -> String {
    let mut sum = 0.0;
    let mut out = String::new();
    for (step, d) in drift.iter().enumerate() {
        match d {
            Some(d) if step > 0 && sum + d <= threshold => {
                sum += d;
                out.push('R');
            }
            _ => {
                sum = 0.0;
                out.push('C');
            }
        }
    }
    out
}

/// `--policies static-table`: the drift the report gives for every attention site's and MLP's output
/// is the one `ditc calibrate --profile` measures on the same case (per step, the largest change over
/// the branches; per group, the mean over its values), and every candidate's tables (per group and per
/// block) are the hand rule's tables of that drift at the candidate's threshold times its family's
/// scale; tables that never reuse are left out.
#[test]
fn static_tables_are_built_from_the_profiled_drift() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned = tmp.path().join("tuned.toml");
    ditc_ok(&strs(&tune_args(
        &tuned,
        "rel-l2=0.35",
        "0",
        &["--policies", "static-table", "--iterations", "2"],
    )));
    let report: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("tuned.json")).unwrap()).unwrap();
    // The same drift from `ditc calibrate --profile` (another command, its own run).
    let profile_path = tmp.path().join("profile.json");
    let args = calibrate_args(&profile_path, &["--set", "sampler.steps=10"]);
    ditc_ok(&strs(&args));
    let profile: Value = serde_json::from_slice(&std::fs::read(&profile_path).unwrap()).unwrap();
    let values = report["drift"]["static_table"]["values"]
        .as_object()
        .unwrap();
    let mut members: std::collections::BTreeMap<String, Vec<Vec<Option<f64>>>> = Default::default();
    let mut mlps = 0;
    for q in profile["quantities"].as_array().unwrap() {
        let name = q["name"].as_str().unwrap();
        if !(name.starts_with("attention.") || name.starts_with("mlp.")) {
            continue;
        }
        mlps += name.starts_with("mlp.") as usize;
        let per_branch: Vec<Vec<Option<f64>>> = q["values"]
            .as_object()
            .unwrap()
            .values()
            .map(|cases| serde_json::from_value(cases[0].clone()).unwrap())
            .collect();
        let largest: Vec<Option<f64>> = (0..10)
            .map(|i| {
                per_branch
                    .iter()
                    .filter_map(|b| b[i])
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            })
            .collect();
        let v = &values[name];
        let reported: Vec<Option<f64>> = serde_json::from_value(v["drift"].clone()).unwrap();
        for (i, (a, b)) in largest.iter().zip(&reported).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-9 * a.abs().max(1e-12),
                    "{name} step {i}: {a} vs {b}"
                ),
                (None, None) => {}
                _ => panic!("{name} step {i}: {a:?} vs {b:?}"),
            }
        }
        members
            .entry(v["group"].as_str().unwrap().to_string())
            .or_default()
            .push(reported);
    }
    assert_eq!(values.len(), 12 + 6, "12 attention sites and 6 MLPs");
    assert_eq!(mlps, 6, "the profile records every block's MLP");
    for (group, drifts) in &members {
        let reported: Vec<Option<f64>> =
            serde_json::from_value(report["drift"]["static_table"]["groups"][group].clone())
                .unwrap();
        for i in 0..10 {
            let v: Vec<f64> = drifts.iter().filter_map(|d| d[i]).collect();
            let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            match (mean, reported[i]) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-12 * a.abs().max(1e-12),
                    "{group} step {i}"
                ),
                (a, b) => assert_eq!(a, b, "{group} step {i}"),
            }
        }
    }
    // Every candidate's tables, recomputed from the reported drift.
    let families = report["families"].as_array().unwrap();
    let (mut per_group, mut per_block) = (0, 0);
    for c in report["candidates"].as_array().unwrap().iter().skip(1) {
        let label = c["label"].as_str().unwrap();
        let family = families.iter().find(|f| f["label"] == label).unwrap();
        let threshold = c["threshold"].as_f64().unwrap();
        let table = &c["options"]["table"];
        if let Some(scales) = family["value_scales"].as_object() {
            per_block += 1;
            for (name, scale) in scales {
                let v = &values[name];
                let drift: Vec<Option<f64>> = serde_json::from_value(v["drift"].clone()).unwrap();
                let want = table_by_hand(&drift, threshold * scale.as_f64().unwrap());
                let got = &table["blocks"][v["block"].to_string()][v["group"].as_str().unwrap()];
                match want.contains('R') {
                    true => assert_eq!(got.as_str(), Some(want.as_str()), "{label}: {name}"),
                    false => assert!(got.is_null(), "{label}: {name} never reuses: left out"),
                }
            }
        } else {
            per_group += 1;
            for (group, scale) in family["scales"].as_object().unwrap() {
                let drift: Vec<Option<f64>> = serde_json::from_value(
                    report["drift"]["static_table"]["groups"][group].clone(),
                )
                .unwrap();
                let want = table_by_hand(&drift, threshold * scale.as_f64().unwrap());
                match want.contains('R') {
                    true => assert_eq!(
                        table[group].as_str(),
                        Some(want.as_str()),
                        "{label}: {group}"
                    ),
                    false => assert!(table[group].is_null(), "{label}: {group}"),
                }
            }
        }
    }
    eprintln!("{per_group} per-group and {per_block} per-block candidates checked");
    assert!(per_group >= 4 && per_block >= 4, "{per_group} {per_block}");
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
            &["--policies", "nope"][..],
            "unknown policy 'nope'",
        ),
        (
            "rel-l2=0.1",
            "0",
            &["--margin", "0"][..],
            "expected a factor in (0, 1]",
        ),
        (
            "rel-l2=0.1",
            "0",
            &["--margin", "1.5"][..],
            "expected a factor in (0, 1]",
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
