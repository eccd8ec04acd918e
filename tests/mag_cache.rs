//! MagCache (`broadcast-adaptive`, `policy = "mag-cache"`) with classifier-free guidance on the
//! trained wan-small, against diffusers' MagCache runs: every per-step, per-branch decision, the final
//! latents, and the calibration of the ratios. Also the baked graph's own decisions per branch
//! (`ditc.branch`), the `--trace` file, and the refusals of bad options and unfit models.

mod common;

use std::path::Path;

use common::{
    assert_refused, convert_wan_small, ditc, ditc_ok, f32_named, fixture, repo_path, run_bundle,
    WAN_SMALL_SHAPES,
};
use ditc::ir::Tensor;
use ditc::metrics::compare;
use ditc::schedule::guidance::Branch;
use ditc::tensors::read_safetensors;
use serde_json::Value;

fn sampling_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("sampling.json")).unwrap()).unwrap()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `--set` overrides giving broadcast-adaptive a diffusers MagCache config of the fixture.
fn config_sets(c: &Value) -> Vec<String> {
    let ratios: Vec<String> = floats(&c["mag_ratios"])
        .iter()
        .map(|r| format!("{r:?}"))
        .collect();
    vec![
        format!("broadcast-adaptive.threshold={}", c["threshold"]),
        format!("broadcast-adaptive.max_skip_steps={}", c["max_skip_steps"]),
        format!(
            "broadcast-adaptive.retention_ratio={}",
            c["retention_ratio"]
        ),
        format!("broadcast-adaptive.mag_ratios=[{}]", ratios.join(", ")),
    ]
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn mag_cache_decides_and_samples_as_diffusers() {
    let dir = fixture("wan-small");
    let sampling = sampling_json(&dir);
    let inputs = dir.join("sampling.safetensors");
    let reference = read_safetensors(&inputs).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for config in ["mag_0.06", "mag_0.12"] {
        let c = &sampling["configs"][config];
        let sets = config_sets(c);
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let out = tmp.path().join(config);
        let manifest = convert_wan_small(&dir, &repo_path("passes/wan-magcache.toml"), &sets, &out);
        let errors = ditc::manifest::validate_schema(&manifest);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(manifest["schedule"]["policy"], "mag-cache");
        assert_eq!(manifest["state"].as_array().unwrap().len(), 1);
        assert!(
            manifest["io"].get("branch").is_none(),
            "one table for both branches"
        );
        ditc_ok(&["lint", out.join("model.onnx").to_str().unwrap()]);
        for case in 0..3 {
            let (latent, report) = run_bundle(
                &out.join("manifest.json"),
                &inputs,
                &format!("{case}."),
                false,
            );
            let mut computed = 0;
            for branch in [Branch::Cond, Branch::Uncond] {
                let b = &report.scheduled.branches[&branch];
                let expected =
                    bools(&sampling["decisions"][config][case.to_string()][branch.as_str()]);
                assert_eq!(b.stack_decisions, expected, "{config} case {case} {branch}");
                computed += b.model_calls.computed;
            }
            let f = compare(
                &latent,
                &f32_named(&reference, &format!("{case}.{config}.final")),
            );
            let moved = compare(
                &latent,
                &f32_named(&reference, &format!("{case}.full.final")),
            );
            eprintln!(
                "{config} case {case}: 2 x 50 decisions as diffusers, {computed} of 100 calls computed; final vs diffusers' MagCache rel L2 {:.2e} (vs full {:.3})",
                f.rel_l2, moved.rel_l2
            );
            assert!(
                f.rel_l2 <= 1e-3,
                "{config} case {case}: rel L2 {}",
                f.rel_l2
            );
        }
    }
}

/// `ditc run --trace` on one MagCache run: per step the timestep, each branch's decision and its
/// accumulated error (null during the retention steps).
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn trace_records_decisions_metrics_and_timesteps() {
    let dir = fixture("wan-small");
    let sampling = sampling_json(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let sets = config_sets(&sampling["configs"]["mag_0.12"]);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let out = tmp.path().join("b");
    convert_wan_small(&dir, &repo_path("passes/wan-magcache.toml"), &sets, &out);
    let trace = tmp.path().join("trace.json");
    ditc_ok(&common::strs(&common::run_args(
        &out.join("manifest.json"),
        &dir.join("sampling.safetensors"),
        "1.",
        &tmp.path().join("s.safetensors"),
        &["--trace", trace.to_str().unwrap()],
    )));
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 50);
    let timesteps = floats(&sampling["timesteps"]);
    for branch in ["cond", "uncond"] {
        let expected = bools(&sampling["decisions"]["mag_0.12"]["1"][branch]);
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(s["step"], i);
            assert_eq!(s["timestep"].as_f64().unwrap(), timesteps[i]);
            assert_eq!(s[branch]["computed"], expected[i], "{branch} step {i}");
            let metric = &s[branch]["metric"];
            // Retention: int(0.2 * 50 + 0.5) = 10 steps without a metric.
            assert_eq!(metric.is_null(), i < 10, "{branch} step {i}: {metric}");
            if !expected[i] {
                assert!(
                    metric.as_f64().unwrap() <= 0.12,
                    "a skip's error is within the threshold"
                );
            }
        }
    }
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn calibration_reproduces_diffusers_ratios() {
    let dir = fixture("wan-small");
    let sampling = sampling_json(&dir);
    let case = sampling["magcache_calibration_case"]
        .as_u64()
        .unwrap()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ratios.json");
    let ckpt = dir.join("ckpt");
    let mut args = vec!["calibrate", ckpt.to_str().unwrap(), "--recipe"];
    let recipe = repo_path("passes/wan-cfg.toml");
    args.push(recipe.to_str().unwrap());
    let inputs = dir.join("sampling.safetensors");
    args.extend_from_slice(&[
        "--inputs",
        inputs.to_str().unwrap(),
        "--cases",
        &case,
        "--mag-ratios",
        "--no-progress",
        "-o",
        out.to_str().unwrap(),
    ]);
    args.extend_from_slice(&WAN_SMALL_SHAPES);
    let stdout = String::from_utf8(ditc_ok(&args)).unwrap();
    assert!(stdout.starts_with("mag_ratios = [1, "), "{stdout}");
    let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(got["format"], "ditc-mag-ratios");
    for branch in ["cond", "uncond"] {
        let (mine, theirs) = (
            floats(&got[branch]),
            floats(&sampling["magcache_calibration"][branch]),
        );
        assert_eq!(mine.len(), theirs.len());
        let err = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "calibration {branch}: max |ditc - diffusers| {err:.1e} over {} steps",
            mine.len()
        );
        assert!(err <= 1e-4, "{branch}: {err}");
    }
    // The file drives a recipe directly (both branches from its cond table, as diffusers does).
    let bundle = tmp.path().join("b");
    let set = format!("broadcast-adaptive.mag_ratios={:?}", out.to_str().unwrap());
    let m = convert_wan_small(
        &dir,
        &repo_path("passes/wan-magcache.toml"),
        &[&set],
        &bundle,
    );
    let expected = bools(&sampling["decisions"]["mag_0.06"]["0"]["cond"]);
    assert_eq!(bools(&m["schedule"]["tables"]["stack"]), expected);
}

/// README command 3's recipe (the preset's ratios, calibrated by ditc on the example's case) decides
/// exactly as diffusers' `mag_0.06` run, in both branches.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn the_example_recipe_decides_as_diffusers_mag_0_06() {
    let dir = fixture("wan-small");
    let sampling = sampling_json(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let m = convert_wan_small(
        &example,
        &repo_path("passes/wan-magcache.toml"),
        &[],
        &tmp.path().join("b"),
    );
    assert!(m["io"].get("branch").is_none());
    for case in ["0", "1", "2"] {
        let expected = bools(&sampling["decisions"]["mag_0.06"][case]["cond"]);
        assert_eq!(
            bools(&m["schedule"]["tables"]["stack"]),
            expected,
            "case {case}"
        );
    }
}

/// With `mag_ratios_uncond` the branches decide differently: the graph takes `ditc.branch` and picks
/// its table row by it. Checked on the baked graph itself (its `If`, run by tract), at a step where
/// the conditional branch skips and the unconditional one computes: the computing call equals the
/// plain model; the skipping call with the residual that call left reproduces it (to rounding), and
/// with a zero residual it does not.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn per_branch_tables_are_picked_by_the_branch_input() {
    let dir = fixture("wan-small");
    let sampling = sampling_json(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = config_sets(&sampling["configs"]["mag_0.06"]);
    // Ratio 2 everywhere: the error is 1 at once, so the unconditional branch always computes.
    sets.push("broadcast-adaptive.mag_ratios_uncond=[2.0]".into());
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let out = tmp.path().join("b");
    let m = convert_wan_small(&dir, &repo_path("passes/wan-magcache.toml"), &sets, &out);
    assert!(ditc::manifest::validate_schema(&m).is_empty());
    assert_eq!(m["io"]["branch"], "ditc.branch");
    let cond = bools(&m["schedule"]["tables"]["stack"]);
    assert_eq!(cond, bools(&sampling["decisions"]["mag_0.06"]["0"]["cond"]));
    assert!(bools(&m["schedule"]["uncond_tables"]["stack"])
        .iter()
        .all(|&c| c));
    assert_eq!(m["schedule"]["calls"]["stack"]["computed"], 29 + 50);
    ditc_ok(&["lint", out.join("model.onnx").to_str().unwrap()]);

    let step = cond.iter().position(|&c| !c).unwrap();
    let t = floats(&sampling["timesteps"])[step] as f32;
    let graph = ditc::onnx::read_model(&out.join("model.onnx")).unwrap();
    let state = &m["state"][0];
    let state_in = state["input"].as_str().unwrap();
    let state_out = state["output"].as_str().unwrap();
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let case = common::case(&io, 2);
    let latent = common::named(&case, "hidden_states").clone();
    let text = common::named(&case, "encoder_hidden_states").clone();
    let shape: Vec<i64> = floats(&state["shape"]).iter().map(|&d| d as i64).collect();
    let zeros = Tensor::from_f32(
        state_in,
        shape.clone(),
        &vec![0.0; shape.iter().product::<i64>() as usize],
    );
    let feed = |branch: i64, residual: &Tensor| {
        vec![
            latent.clone(),
            text.clone(),
            Tensor::from_f32("timestep", vec![1], &[t]),
            Tensor::from_i64("ditc.step", vec![], &[step as i64]),
            Tensor::from_i64("ditc.branch", vec![], &[branch]),
            Tensor {
                name: state_in.into(),
                ..residual.clone()
            },
        ]
    };
    let runner = ditc::runtime::TractRunner::new(&graph, &feed(1, &zeros)).unwrap();
    let outputs = runner.run(&feed(1, &zeros)).unwrap();
    let computed = f32_named(&outputs, "sample");
    let residual = common::named(&outputs, state_out).clone();
    let plain = ditc::models::read_model_or_checkpoint(
        &dir.join("ckpt"),
        &ditc::models::BuildOptions {
            frames: Some(8),
            height: Some(16),
            width: Some(16),
            text_len: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    let plain_feed = &feed(1, &zeros)[..3];
    let plain_out = ditc::runtime::TractRunner::new(&plain, plain_feed)
        .unwrap()
        .run(plain_feed)
        .unwrap();
    let full = compare(&computed, &f32_named(&plain_out, "sample"));
    assert!(full.rel_l2 <= 1e-6, "uncond computes: {}", full.rel_l2);
    let reused = f32_named(&runner.run(&feed(0, &residual)).unwrap(), "sample");
    let same = compare(&reused, &computed);
    let unfed = f32_named(&runner.run(&feed(0, &zeros)).unwrap(), "sample");
    let apart = compare(&unfed, &computed);
    eprintln!(
        "step {step}: uncond computes (vs plain {:.1e}); cond skips: with the residual {:.1e}, without {:.2}",
        full.rel_l2, same.rel_l2, apart.rel_l2
    );
    assert!(same.rel_l2 <= 1e-5, "{}", same.rel_l2);
    assert!(apart.rel_l2 > 0.1, "{}", apart.rel_l2);

    // The runtime feeds each branch its own table (10 steps: R = 2).
    let short = tmp.path().join("short");
    let mut sets = sets.clone();
    sets.push("sampler.steps=10");
    convert_wan_small(&dir, &repo_path("passes/wan-magcache.toml"), &sets, &short);
    let (_, report) = run_bundle(
        &short.join("manifest.json"),
        &dir.join("sampling.safetensors"),
        "0.",
        false,
    );
    let b = &report.scheduled.branches;
    assert!(b[&Branch::Uncond].stack_decisions.iter().all(|&c| c));
    assert!(b[&Branch::Cond].stack_decisions.contains(&false));
}

#[test]
fn bad_options_and_unfit_models_are_refused() {
    let recipe = repo_path("passes/wan-magcache.toml");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Option errors come before the model is opened.
    let cases: [(&str, &str); 6] = [
        ("broadcast-adaptive.threshold=-0.1", "threshold = -0.1"),
        ("broadcast-adaptive.threshold=nan", "threshold = NaN"),
        ("broadcast-adaptive.mag_ratios=[1.0, nan]", "mag_ratios[1]"),
        ("broadcast-adaptive.mag_ratios=[]", "mag_ratios is empty"),
        ("broadcast-adaptive.retention_ratio=2.0", "retention_ratio"),
        (
            "broadcast-adaptive.policy=\"no-such-cache\"",
            "unknown policy 'no-such-cache'",
        ),
    ];
    for (set, expect) in cases {
        let err = assert_refused(
            &[
                "convert",
                "/nonexistent/ckpt",
                "--recipe",
                recipe.to_str().unwrap(),
                "--set",
                set,
                "-o",
                out.to_str().unwrap(),
            ],
            &[expect],
        );
        assert!(
            !err.contains("nonexistent"),
            "{set}: the model was read first: {err}"
        );
        assert!(!out.exists());
    }
    // A graph without attention has no blocks at all.
    let latte_recipe = tmp.path().join("latte.toml");
    std::fs::write(
        &latte_recipe,
        "[sampler]\nkind = \"ddim\"\nsteps = 50\n[[passes]]\nname = \"broadcast-adaptive\"\n[passes.options]\npolicy = \"mag-cache\"\nmag_ratios = [1.0]\n",
    )
    .unwrap();
    let latte = repo_path("examples/latte-tiny/model.onnx");
    let convert = |model: &Path, recipe: &Path| -> Vec<String> {
        vec![
            "convert".into(),
            model.to_str().unwrap().into(),
            "--recipe".into(),
            recipe.to_str().unwrap().into(),
            "-o".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let args = convert(&latte, &latte_recipe);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Latte's spatial and temporal blocks alternate layouts; the stack is followed across them
    // (`tests/analysis.rs` checks where), so MagCache bakes there.
    common::ditc_ok(&args);
    assert!(out.join("manifest.json").exists());
    std::fs::remove_dir_all(&out).unwrap();
    let plain = tmp.path().join("plain.onnx");
    std::fs::write(
        &plain,
        ditc::onnx::model_to_bytes_inline(&no_attention_model()).unwrap(),
    )
    .unwrap();
    let args = convert(&plain, &latte_recipe);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&args, &["no transformer blocks"]);
    assert!(!out.exists());
    // mag_ratios_uncond without guidance: there is no unconditional branch.
    let wan = repo_path("examples/wan-small/ckpt");
    let unguided = tmp.path().join("unguided.toml");
    std::fs::write(
        &unguided,
        "[sampler]\nkind = \"flow_euler\"\nsteps = 50\nshift = 3.0\n[[passes]]\nname = \"broadcast-adaptive\"\n[passes.options]\npolicy = \"mag-cache\"\nmag_ratios = [1.0]\nmag_ratios_uncond = [1.0]\n",
    )
    .unwrap();
    let mut args = convert(&wan, &unguided);
    args.extend(WAN_SMALL_SHAPES.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = ditc(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("mag_ratios_uncond needs classifier-free guidance"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `sample = latent * sin(timestep)`: a model with a latent and a timestep but no attention.
fn no_attention_model() -> ditc::ir::Model {
    use ditc::ir::{DataType, Dim, Graph, Model, Node, ValueInfo};
    let dims = |d: &[i64]| d.iter().map(|&v| Dim::Value(v)).collect::<Vec<_>>();
    let graph = Graph {
        name: "plain".into(),
        inputs: vec![
            ValueInfo::tensor("hidden_states", DataType::F32, dims(&[1, 4, 2, 4, 4])),
            ValueInfo::tensor("timestep", DataType::F32, dims(&[1])),
        ],
        nodes: vec![
            Node::new("sin", "Sin", &["timestep"], &["s"]),
            Node::new("mul", "Mul", &["hidden_states", "s"], &["sample"]),
        ],
        outputs: vec![ValueInfo::tensor(
            "sample",
            DataType::F32,
            dims(&[1, 4, 2, 4, 4]),
        )],
        ..Graph::default()
    };
    Model::new(graph, 17)
}
