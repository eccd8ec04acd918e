//! TaylorSeer forecasting (`forecast = "taylor"`) baked into a MagCache bundle of wan-small: at a
//! skipped step the graph adds `Σ_j w_j · r_j` of its stored residuals, with the weights the
//! forecast rule gives for that step; checked against the plain MagCache bundle (same decisions) fed
//! that combination as its one cached residual. Plus the refusals.

mod common;

use common::{
    assert_refused, convert_wan_small, convert_wan_small_args, f32_named, repo_path, strs,
};
use ditc::ir::Tensor;
use ditc::metrics::compare;
use ditc::schedule::forecast::{coefficients, Taylor};
use serde_json::Value;

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect()
}

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

#[test]
fn order_two_forecast_in_the_graph_is_the_rule_s_combination() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let recipe = repo_path("passes/wan-magcache.toml");
    let (plain_dir, taylor_dir) = (tmp.path().join("plain"), tmp.path().join("taylor"));
    let plain = convert_wan_small(&example, &recipe, &[], &plain_dir);
    let taylor = convert_wan_small(
        &example,
        &recipe,
        &[
            "broadcast-adaptive.forecast=taylor",
            "broadcast-adaptive.order=2",
        ],
        &taylor_dir,
    );
    assert_eq!(taylor["schedule"]["options"]["forecast"], "taylor");
    let table = bools(&taylor["schedule"]["tables"]["stack"]);
    assert_eq!(table, bools(&plain["schedule"]["tables"]["stack"]));
    let states = taylor["state"].as_array().unwrap();
    assert_eq!(states.len(), 3, "the last three computed residuals");
    common::ditc_ok(&["lint", taylor_dir.join("model.onnx").to_str().unwrap()]);

    let weights = coefficients(&table, Taylor { order: 2 });
    // A skipped step late enough for both derivatives (second-order weights all non-zero).
    let step = (0..table.len())
        .find(|&s| !table[s] && weights[s].iter().all(|w| w.abs() > 1e-6))
        .expect("a step with a second-order forecast");
    let shape: Vec<i64> = states[0]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap())
        .collect();
    let n = shape.iter().product::<i64>() as usize;
    let residuals: Vec<Vec<f32>> = (0..3).map(|j| pseudo_random(n, 7 + j as u32)).collect();
    let inputs = ditc::tensors::read_safetensors(&example.join("inputs.safetensors")).unwrap();
    let common_feed = |model: &ditc::ir::Model| -> Vec<Tensor> {
        let mut feed = vec![
            Tensor {
                name: "hidden_states".into(),
                ..common::named(&inputs, "0.noise").clone()
            },
            Tensor {
                name: "encoder_hidden_states".into(),
                ..common::named(&inputs, "0.encoder_hidden_states").clone()
            },
            Tensor::from_f32("timestep", vec![1], &[500.0]),
            Tensor::from_i64("ditc.step", vec![], &[step as i64]),
        ];
        feed.retain(|t| model.graph.inputs.iter().any(|i| i.name == t.name));
        feed
    };

    let run = |dir: &std::path::Path, states: &[(String, Vec<f32>)]| -> Vec<f32> {
        let model = ditc::onnx::read_model(&dir.join("model.onnx")).unwrap();
        let mut feed = common_feed(&model);
        for (name, values) in states {
            feed.push(Tensor::from_f32(name, shape.clone(), values));
        }
        let plan = ditc::runtime::Plan::new(&model, &feed).unwrap();
        f32_named(&plan.run(&feed).unwrap().outputs, "sample")
    };
    let taylor_states: Vec<(String, Vec<f32>)> = states
        .iter()
        .zip(&residuals)
        .map(|(s, r)| (s["input"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    let forecast = run(&taylor_dir, &taylor_states);
    let combined: Vec<f32> = (0..n)
        .map(|i| {
            (0..3)
                .map(|j| weights[step][j] as f32 * residuals[j][i])
                .sum()
        })
        .collect();
    let plain_state = plain["state"][0]["input"].as_str().unwrap().to_string();
    let reused = run(&plain_dir, &[(plain_state, combined)]);
    let c = compare(&forecast, &reused);
    println!(
        "step {step}, weights {:?}: forecast bundle vs plain bundle fed the combination: rel L2 {:.2e}",
        weights[step], c.rel_l2
    );
    assert!(c.rel_l2 < 1e-5, "{}", c.rel_l2);
    // And it is not plain reuse of the newest residual.
    let newest = run(
        &plain_dir,
        &[(
            plain["state"][0]["input"].as_str().unwrap().to_string(),
            residuals[0].clone(),
        )],
    );
    assert!(compare(&forecast, &newest).rel_l2 > 1e-3);
}

#[test]
fn bad_forecast_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let out = tmp.path().join("never");
    let cases: [(&str, &[&str], &[&str]); 4] = [
        (
            "passes/wan-magcache.toml",
            &["broadcast-adaptive.forecast=linear"],
            &["forecast", "taylor"],
        ),
        (
            "passes/wan-magcache.toml",
            &[
                "broadcast-adaptive.forecast=taylor",
                "broadcast-adaptive.order=3",
            ],
            &["order must be 1 or 2"],
        ),
        (
            "passes/wan-magcache.toml",
            &["broadcast-adaptive.order=2"],
            &["forecast"],
        ),
        (
            "passes/fbc-wan-cfg.toml",
            &[
                "broadcast-adaptive.forecast=taylor",
                "broadcast-adaptive.order=3",
            ],
            &["order must be 1 or 2"],
        ),
    ];
    for (recipe, sets, expect) in cases {
        let args = convert_wan_small_args(&example, &repo_path(recipe), sets, &out);
        assert_refused(&strs(&args), expect);
        assert!(!out.exists());
    }
}

/// The fidelity rows of the README's forecasting table (MagCache on wan-small, CFG, case 0): the same
/// decisions with and without forecasting, and forecasting brings the final latent closer to the full
/// computation, order 2 closer than order 1.
#[test]
fn forecasting_brings_magcache_closer_to_the_full_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let recipe = repo_path("passes/wan-magcache.toml");
    let inputs = example.join("inputs.safetensors");
    let mut psnr = Vec::new();
    for (name, sets) in [
        ("plain", vec![]),
        ("order 1", vec!["broadcast-adaptive.forecast=taylor"]),
        (
            "order 2",
            vec![
                "broadcast-adaptive.forecast=taylor",
                "broadcast-adaptive.order=2",
            ],
        ),
    ] {
        let dir = tmp.path().join(name.replace(' ', "-"));
        let m = convert_wan_small(&example, &recipe, &sets, &dir);
        assert_eq!(m["schedule"]["calls"]["stack"]["computed"], 58, "{name}");
        let (_, report) = common::run_bundle(&dir.join("manifest.json"), &inputs, "0.", true);
        let f = report.fidelity.unwrap();
        println!(
            "MagCache {name}: PSNR {:.2} dB, cosine {:.5}, rel L2 {:.3}",
            f.psnr_db, f.cosine, f.rel_l2
        );
        psnr.push(f.psnr_db);
    }
    // Measured 21.08, 29.78, 34.29 dB.
    assert!(
        (psnr[0] - 21.08).abs() < 0.05,
        "plain MagCache {:.2}",
        psnr[0]
    );
    assert!(
        psnr[1] > psnr[0] + 5.0,
        "order 1 {:.2} vs {:.2}",
        psnr[1],
        psnr[0]
    );
    assert!(
        psnr[2] > psnr[1] + 2.0,
        "order 2 {:.2} vs {:.2}",
        psnr[2],
        psnr[1]
    );
}
