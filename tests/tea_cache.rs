//! TeaCache (`broadcast-adaptive`, `policy = "tea-cache"`) on Wan: the rule on a hand-worked
//! indicator sequence, and a real wan-small run (CFG) whose traced decisions and metrics are
//! recomputed from the rule with the indicator taken from the graph itself (the timestep embedding as
//! tract computes it in the built model), not from the policy's own f64 evaluation.

mod common;

use common::{
    assert_refused, convert_wan_small, convert_wan_small_args, ditc_ok, repo_path, run_args, strs,
};
use ditc::ir::Tensor;
use ditc::schedule::tea_cache::{decisions, TeaCacheOptions};
use serde_json::Value;

fn options(threshold: f64, coefficients: Vec<f64>, use_ret_steps: bool) -> TeaCacheOptions {
    TeaCacheOptions {
        threshold,
        coefficients,
        use_ret_steps,
    }
}

/// Indicators whose relative L1 changes are exact binary fractions: each is `[1 ± d]` over four
/// values (mean |.| = 1), so `mean|m - prev| / mean|prev|` is exactly the change chosen.
fn indicators(changes: &[f64]) -> Vec<Vec<f32>> {
    let mut out = vec![vec![1.0f32; 4]];
    for (n, &c) in changes.iter().enumerate() {
        // Two values up by c and two down by c (alternating which): the mean stays 1 and every
        // value a binary fraction, so the change is exact.
        let prev = out.last().unwrap().clone();
        let next: Vec<f32> = (0..4)
            .map(|i| {
                let up = (i < 2) == (n % 2 == 0);
                prev[i] + if up { c as f32 } else { -(c as f32) }
            })
            .collect();
        out.push(next);
    }
    out
}

#[test]
fn decisions_follow_the_rule_on_a_hand_worked_sequence() {
    // Changes (rel) 0.125, 0.25, 0.0625, 0.5, 0.125, 0.125, 0.25 after the first step; polynomial 2x
    // (so each step adds 2 * rel), threshold 0.5, 8 steps: ret = 1, cutoff = 7 (last step computes).
    let changes = [0.125, 0.25, 0.0625, 0.5, 0.125, 0.125, 0.25];
    let ind = indicators(&changes);
    for (n, pair) in ind.windows(2).enumerate() {
        let rel = ditc::schedule::tea_cache::relative_l1(&pair[1], &pair[0]);
        assert!(
            (rel - changes[n]).abs() < 1e-12,
            "indicator {n}: {rel} vs {}",
            changes[n]
        );
    }
    let d = decisions(&options(0.5, vec![2.0, 0.0], false), &ind);
    // step 0: computes (no previous indicator), acc 0.
    // step 1: acc = 0.25 < 0.5: reuse.        step 2: acc = 0.75 >= 0.5: compute, acc = 0.
    // step 3: acc = 0.125: reuse.             step 4: acc = 1.125: compute, 0.
    // step 5: acc = 0.25: reuse.              step 6: acc = 0.5 (not < 0.5): compute, 0.
    // step 7: the last step always computes.
    assert_eq!(
        d.compute,
        [true, false, true, false, true, false, true, true]
    );
    assert_eq!(
        d.metric,
        [
            None,
            Some(0.25),
            Some(0.75),
            Some(0.125),
            Some(1.125),
            Some(0.25),
            Some(0.5),
            None
        ]
    );
    // use_ret_steps: the first five steps compute (acc 0); no forced last step: step 5 acc = 0.25
    // reuse, step 6 acc = 0.5 compute (0), step 7 acc = 0.5 compute.
    let d = decisions(&options(0.5, vec![2.0, 0.0], true), &ind);
    assert_eq!(d.compute, [true, true, true, true, true, false, true, true]);
    assert_eq!(d.metric[5], Some(0.25));
    assert_eq!(d.metric[6], Some(0.5));
    assert_eq!(d.metric[7], Some(0.5));
}

/// The built Wan graph's own timestep embedding (`condition_embedder.time_embedder.linear_2`'s
/// output) at `t`, run by tract.
fn graph_embedding(model: &ditc::ir::Model, t: f64) -> Vec<f32> {
    let mut m = model.clone();
    let node = m
        .graph
        .nodes
        .iter()
        .find(|n| n.name == "condition_embedder.time_embedder.linear_2")
        .expect("the time embedder's second linear layer");
    let value = node.outputs[0].clone();
    let types = ditc::ir::infer_types(&m.graph, m.default_opset());
    let shape = types[&value].shape.clone().expect("a static shape");
    m.graph.outputs = vec![ditc::ir::ValueInfo::tensor(
        &value,
        ditc::ir::DataType::F32,
        shape.into_iter().map(ditc::ir::Dim::Value).collect(),
    )];
    let feed: Vec<Tensor> = m
        .graph
        .runtime_inputs()
        .map(|i| {
            let dims: Vec<i64> = i
                .shape()
                .unwrap()
                .iter()
                .map(|d| d.value().unwrap())
                .collect();
            let n = dims.iter().product::<i64>() as usize;
            if i.name == "timestep" {
                Tensor::from_f32(&i.name, dims, &vec![t as f32; n])
            } else {
                Tensor::from_f32(&i.name, dims, &vec![0.0; n])
            }
        })
        .collect();
    ditc::runtime::run_once(&m, &feed).unwrap()[0]
        .to_f32_vec()
        .unwrap()
}

/// A real run on wan-small with CFG and the published Wan2.1-T2V-1.3B coefficients: every traced
/// decision and metric, per branch, recomputed here from the rule (written out again below) and the
/// graph's own embedding at each of the sampler's timesteps.
#[test]
fn a_traced_wan_run_obeys_the_rule_at_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("b");
    let example = repo_path("examples/wan-small");
    let manifest = convert_wan_small(&example, &repo_path("passes/wan-teacache.toml"), &[], &out);
    assert_eq!(manifest["schedule"]["policy"], "tea-cache");
    let trace = tmp.path().join("trace.json");
    ditc_ok(&strs(&run_args(
        &out.join("manifest.json"),
        &example.join("inputs.safetensors"),
        "0.",
        &tmp.path().join("s.safetensors"),
        &["--trace", trace.to_str().unwrap()],
    )));
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 50);

    let preset: toml::Table = toml::from_str(
        &std::fs::read_to_string(repo_path("schedules/teacache/wan2.1-t2v-1.3b.toml")).unwrap(),
    )
    .unwrap();
    let threshold = preset["threshold"].as_float().unwrap();
    let coefficients: Vec<f64> = preset["coefficients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_float().unwrap())
        .collect();
    let options = ditc::models::BuildOptions {
        frames: Some(8),
        height: Some(16),
        width: Some(16),
        text_len: Some(4),
        ..Default::default()
    };
    let model = ditc::models::read_model_or_checkpoint(&example.join("ckpt"), &options).unwrap();
    let embeddings: Vec<Vec<f32>> = steps
        .iter()
        .map(|s| graph_embedding(&model, s["timestep"].as_f64().unwrap()))
        .collect();

    let (mut computed, mut worst) = (0, 0f64);
    for branch in ["cond", "uncond"] {
        let mut acc = 0.0f64;
        for (n, s) in steps.iter().enumerate() {
            let call = &s[branch];
            let (want, metric) = if n == 0 || n == 49 {
                acc = 0.0;
                (true, None)
            } else {
                let (m, prev) = (&embeddings[n], &embeddings[n - 1]);
                let diff: f64 = m
                    .iter()
                    .zip(prev)
                    .map(|(a, b)| (*a as f64 - *b as f64).abs())
                    .sum();
                let base: f64 = prev.iter().map(|b| (*b as f64).abs()).sum();
                let rel = diff / base;
                acc += coefficients.iter().fold(0.0, |y, c| y * rel + c);
                let skip = acc < threshold;
                let seen = acc;
                if !skip {
                    acc = 0.0;
                }
                (!skip, Some(seen))
            };
            assert_eq!(call["computed"], want, "{branch} step {n}: {call}");
            computed += want as usize;
            match metric {
                None => assert!(call["metric"].is_null(), "{branch} step {n}: {call}"),
                Some(m) => {
                    let traced = call["metric"].as_f64().unwrap();
                    worst = worst.max((traced - m).abs() / m.abs().max(1e-12));
                }
            }
        }
    }
    println!(
        "tea-cache on wan-small (published 1.3B coefficients, threshold {threshold}): {computed} of 100 calls computed; traced metric vs recomputed from the graph's embedding: worst relative difference {worst:.2e}"
    );
    assert!(worst < 1e-4, "{worst:.2e}");
    assert!(computed < 100, "some calls must be skipped");
    assert_eq!(
        manifest["schedule"]["calls"]["stack"]["computed"].as_u64(),
        Some(computed as u64)
    );
}

#[test]
fn bad_options_and_unfit_models_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo_path("passes/wan-teacache.toml");
    let out = tmp.path().join("never");
    let args = convert_wan_small_args(
        &repo_path("examples/wan-small"),
        &recipe,
        &["broadcast-adaptive.threshold=-1"],
        &out,
    );
    assert_refused(&strs(&args), &["threshold"]);
    assert!(!out.exists());
    // A model without Wan's timestep embedder (latte-tiny's ONNX export).
    let latte = repo_path("examples/latte-tiny/model.onnx");
    let args = [
        "convert",
        latte.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    assert_refused(&args, &["tea-cache", "condition_embedder.time_embedder"]);
    assert!(!out.exists());
}
