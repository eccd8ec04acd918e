//! EasyCache (`broadcast-adaptive`, `policy = "easy-cache"`): the rule (`ditc::schedule::easy_cache::
//! Rule`, f64) on a hand-worked sequence and on a sequence recorded from a real wan-small run, each
//! decision worked out by hand; then real wan-small runs with CFG (`ditc run --trace`) against a
//! hand loop written here: the plain graph built from the checkpoint, run call by call with the block
//! stack's input and output exposed, the rule applied to the latents and predictions the loop itself
//! sees, the stack's cached residual added on skipped calls, guidance and the sampler applied. Every
//! traced decision (both branches) and metric must be the hand loop's, and so must the final latent.
//! Plus the fidelity row of the README and the refusals.

mod common;

use common::{
    assert_refused, convert_wan_small, convert_wan_small_args, ditc_ok, repo_path, run_args, strs,
    StackProbe,
};
use ditc::ir::{Model, Tensor};
use ditc::metrics::compare;
use ditc::runtime::sampling::Bundle;
use ditc::schedule::easy_cache::{EasyCacheOptions, Rule};
use ditc::schedule::forecast::Taylor;
use ditc::schedule::guidance::combine;
use serde_json::Value;

fn options(threshold: f64, warmup_steps: usize, last_steps: usize) -> EasyCacheOptions {
    EasyCacheOptions {
        threshold,
        warmup_steps,
        last_steps,
        per_branch: false,
    }
}

/// One call as the rule sees it: `‖x - prev_in‖`, `‖prev_out‖`, and for a computed call
/// `‖out - prev_out‖` and `‖x - computed_in‖` (NaN where the call has no previous output).
type Call = (f64, f64, f64, f64);

/// Drive `rule` through `calls`; returns the decisions and the metrics.
fn drive(rule: &mut Rule, calls: &[Call]) -> (Vec<bool>, Vec<Option<f64>>) {
    let (mut decisions, mut metrics) = (Vec::new(), Vec::new());
    for (step, &(input_change, output_norm, output_change, computed_change)) in
        calls.iter().enumerate()
    {
        let (compute, metric) = rule.decide(step, input_change, output_norm);
        if compute {
            rule.computed(output_change, computed_change);
        }
        decisions.push(compute);
        metrics.push(metric);
    }
    (decisions, metrics)
}

#[test]
fn the_rule_on_a_hand_worked_sequence() {
    // 8 steps, warm-up 2, the last step forced, threshold 0.5; binary fractions, so all exact.
    let nan = f64::NAN;
    #[rustfmt::skip]
    let calls: [Call; 8] = [
        (nan, nan, nan, nan),     // 0: warm-up; first computed call: no k yet
        (0.25, 1.0, 0.5, 0.25),   // 1: warm-up; k = 0.5 / 0.25 = 2
        (0.0625, 0.5, nan, nan),  // 2: acc = 2 * 0.125 = 0.25 < 0.5: reuse
        (0.125, 0.5, 0.25, 0.25), // 3: acc = 0.25 + 2 * 0.25 = 0.75: compute, E = 0; k = 1
        (0.25, 0.5, 0.125, 0.5),  // 4: acc = 0 + 1 * 0.5 = 0.5, not < 0.5: compute; k = 0.25
        (0.25, 0.5, nan, nan),    // 5: acc = 0.25 * 0.5 = 0.125: reuse
        (0.5, 0.5, nan, nan),     // 6: acc = 0.125 + 0.25 = 0.375: reuse
        (1.0, 0.5, 1.0, 1.0),     // 7: the last step computes whatever acc is (E = 0)
    ];
    let mut rule = Rule::new(options(0.5, 2, 1), 8);
    let (d, m) = drive(&mut rule, &calls);
    assert_eq!(d, [true, true, false, true, true, false, false, true]);
    assert_eq!(
        m,
        [
            None,
            None,
            Some(0.25),
            Some(0.75),
            Some(0.5),
            Some(0.125),
            Some(0.375),
            None
        ]
    );
    assert_eq!(rule.accumulated, 0.0, "a forced call resets E");
    // Without warm-up, the first call still computes (no rate yet) and so does the second (one
    // computed call: still no rate); a NaN estimate computes (not < threshold).
    let mut rule = Rule::new(options(0.5, 0, 1), 8);
    let (d, m) = drive(&mut rule, &calls[..3]);
    assert_eq!(d, [true, true, false]);
    assert_eq!(m, [None, None, Some(0.25)]);
    let (compute, metric) = rule.decide(3, nan, 1.0);
    assert!(compute && metric.unwrap().is_nan());
}

/// The first 16 conditional calls of the run of `traced_run_follows_the_hand_loop` (wan-small, case 0,
/// CFG 5.0, 50 steps, defaults: threshold 0.05, warm-up 10), as its hand loop records them (f64 from
/// the f32 latents and predictions; it prints them), driven through the rule.
#[test]
fn the_rule_on_a_recorded_sequence() {
    let nan = f64::NAN;
    #[rustfmt::skip]
    let calls: [Call; 16] = [
        (nan, nan, nan, nan),
        (6.863433511256289e-3, 1.006539070517423e0, 1.7278321030719468e-2, 6.863433511256289e-3),
        (6.946224039708682e-3, 9.938401060631179e-1, 9.611720528184264e-3, 6.946224039708682e-3),
        (7.155934249709617e-3, 9.937858399809585e-1, 1.036292389666471e-2, 7.155934249709617e-3),
        (7.323818448313091e-3, 9.909277353410744e-1, 9.740748843682923e-3, 7.323818448313091e-3),
        (7.567833194435991e-3, 9.92880753172841e-1, 1.0305081594879084e-2, 7.567833194435991e-3),
        (7.819022801193398e-3, 9.948052656097843e-1, 1.2108272244116591e-2, 7.819022801193398e-3),
        (8.026437290510557e-3, 9.919247276813472e-1, 1.1301268361673777e-2, 8.026437290510557e-3),
        (8.302386955762131e-3, 9.913213960522569e-1, 1.8083622935222365e-2, 8.302386955762131e-3),
        (8.684318393648027e-3, 9.959695809810114e-1, 1.719255764646732e-2, 8.684318393648027e-3),
        (8.975994252438113e-3, 9.914676070486053e-1, nan, nan),
        (9.256142071478735e-3, 9.914676070486053e-1, nan, nan),
        (9.605437383896742e-3, 9.914676070486053e-1, 4.565143829893259e-2, 2.783666361762016e-2),
        (1.0221051771935663e-2, 9.990868549608081e-1, nan, nan),
        (1.057870016944662e-2, 9.990868549608081e-1, nan, nan),
        (1.0968759105281833e-2, 9.990868549608081e-1, 5.087898320320505e-2, 3.1766618634208044e-2),
    ];
    let mut rule = Rule::new(options(0.05, 10, 1), 50);
    let (d, m) = drive(&mut rule, &calls);
    // Steps 0-9: warm-up, computed. The rate after step 9: k = 1.719256e-2 / 8.684318e-3 = 1.979724.
    // Step 10: acc = 1.979724 * 8.975994e-3 / 0.9914676 = 0.0179229 < 0.05: reuse.
    // Step 11: acc = 0.0179229 + 1.979724 * 9.256142e-3 / 0.9914676 = 0.0364052: reuse.
    // Step 12: acc = 0.0364052 + 1.979724 * 9.605437e-3 / 0.9914676 = 0.0555850 >= 0.05: compute,
    //          E = 0; k = 4.565144e-2 / 2.783666e-2 = 1.639975 (output and input changes since step 9).
    // Step 13: acc = 1.639975 * 1.022105e-2 / 0.9990869 = 0.0167776: reuse.
    // Step 14: acc = 0.0167776 + 1.639975 * 1.057870e-2 / 0.9990869 = 0.0341423: reuse.
    // Step 15: acc = 0.0341423 + 1.639975 * 1.096876e-2 / 0.9990869 = 0.0521472: compute.
    let mut want = vec![true; 10];
    want.extend([false, false, true, false, false, true]);
    assert_eq!(d, want);
    assert!(
        m[..10].iter().all(Option::is_none),
        "no metric in the warm-up"
    );
    let expect = [
        0.0179229, 0.0364052, 0.0555850, 0.0167776, 0.0341423, 0.0521472,
    ];
    for (n, (got, want)) in m[10..].iter().zip(expect).enumerate() {
        let got = got.unwrap();
        assert!(
            (got - want).abs() < 1e-6,
            "step {}: {got} vs {want}",
            n + 10
        );
    }
    assert!((rule.k - 5.087898e-2 / 3.176662e-2).abs() < 1e-5);
}

/// One guidance branch of the hand loop.
#[derive(Default)]
struct BranchState {
    rule: Rule,
    prev_in: Vec<f32>,
    computed_in: Vec<f32>,
    prev_out: Vec<f32>,
    /// The cached residual (forecast or reused).
    cache: common::Forecaster,
}

/// What the hand loop did: per branch the decisions and metrics; the final latent; the conditional
/// branch's calls as the rule saw them.
struct HandRun {
    decisions: [Vec<bool>; 2],
    metrics: [Vec<Option<f64>>; 2],
    latent: Vec<f32>,
    recorded: Vec<Call>,
    /// With `follow`: what the unconditional branch's own rule would have decided.
    own_uncond: Vec<bool>,
}

/// Sample the bundle's sampler from `noise` with the hand loop; `follow`: the unconditional call
/// takes the conditional call's decision.
fn hand_loop(
    bundle: &Bundle,
    plain: &Model,
    o: &EasyCacheOptions,
    texts: [&Tensor; 2],
    noise: &Tensor,
    follow: bool,
    forecast: Option<Taylor>,
) -> HandRun {
    let steps = bundle.sampler.steps();
    let scale = bundle.manifest.guidance().unwrap().scale;
    let inputs = |x: &[f32], i: usize, text: &Tensor| {
        let mut text = text.clone();
        text.name = "encoder_hidden_states".into();
        vec![
            Tensor::from_f32("hidden_states", noise.dims.clone(), x),
            ditc::runtime::sampling::timestep_tensor(
                plain,
                "timestep",
                bundle.sampler.timesteps[i],
            )
            .unwrap(),
            text,
        ]
    };
    let mut x = noise.to_f32_vec().unwrap();
    let p = StackProbe::new(plain, &inputs(&x, 0, texts[0]), &[]);
    let mut branches: [BranchState; 2] = Default::default();
    for b in &mut branches {
        b.rule = Rule::new(o.clone(), steps);
        b.cache = common::Forecaster::new(forecast);
    }
    let mut run = HandRun {
        decisions: Default::default(),
        metrics: Default::default(),
        latent: Vec::new(),
        recorded: Vec::new(),
        own_uncond: Vec::new(),
    };
    for i in 0..steps {
        let mut predictions = Vec::new();
        let mut cond_compute = true;
        for (k, b) in branches.iter_mut().enumerate() {
            let step_inputs = inputs(&x, i, texts[k]);
            let out = p.probe.run(&step_inputs).unwrap();
            let (s_in, s_out) = (
                common::f32_named(&out, &p.stack_in),
                common::f32_named(&out, &p.stack_out),
            );
            let input_change = if b.prev_in.is_empty() {
                f64::NAN
            } else {
                common::mean_abs_diff(&x, &b.prev_in)
            };
            let output_norm = if b.prev_out.is_empty() {
                f64::NAN
            } else {
                common::mean_abs(&b.prev_out)
            };
            let (compute, metric) = if follow && k == 1 {
                // What this branch's own rule would decide (the graph's unused own decision).
                let (own, _) = b.rule.decide(i, input_change, output_norm);
                run.own_uncond.push(own);
                (cond_compute, None)
            } else {
                let (c, m) = b.rule.decide(i, input_change, output_norm);
                if let Some(m) = m {
                    let distance = (m - o.threshold).abs() / o.threshold;
                    assert!(
                        distance > 1e-4,
                        "step {i}: metric {m} within 1e-4 of the threshold: rounding may decide it"
                    );
                }
                (c, m)
            };
            if k == 0 {
                cond_compute = compute;
            }
            b.prev_in = x.clone();
            let prediction = if compute {
                let prediction = common::f32_named(&out, "sample");
                let (output_change, computed_change) = if b.prev_out.is_empty() {
                    (f64::NAN, f64::NAN)
                } else {
                    (
                        common::mean_abs_diff(&prediction, &b.prev_out),
                        common::mean_abs_diff(&x, &b.computed_in),
                    )
                };
                if k == 0 {
                    run.recorded
                        .push((input_change, output_norm, output_change, computed_change));
                }
                b.rule.computed(output_change, computed_change);
                let residual: Vec<f32> = s_out.iter().zip(&s_in).map(|(a, b)| a - b).collect();
                b.cache.computed(&residual);
                b.prev_out = prediction.clone();
                b.computed_in = x.clone();
                prediction
            } else {
                if k == 0 {
                    run.recorded
                        .push((input_change, output_norm, f64::NAN, f64::NAN));
                }
                p.reuse(&step_inputs, &s_in, &b.cache.skipped(i))
            };
            run.decisions[k].push(compute);
            run.metrics[k].push(metric);
            predictions.push(prediction);
        }
        let velocity = combine(scale, &predictions[0], &predictions[1]);
        bundle.sampler.step(i, &mut x, &velocity);
    }
    run.latent = x;
    run
}

/// Convert with `sets`, run `ditc run --trace --compare-full --json`, run the hand loop, and compare
/// every decision and metric and the final latent. Returns the run's report (JSON) and the hand run.
fn check_against_hand_loop(
    label: &str,
    sets: &[&str],
    o: &EasyCacheOptions,
    follow: bool,
    forecast: Option<Taylor>,
) -> (Value, HandRun) {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let out = tmp.path().join("b");
    let manifest = convert_wan_small(
        &example,
        &repo_path("passes/wan-easycache.toml"),
        sets,
        &out,
    );
    assert_eq!(manifest["schedule"]["policy"], "easy-cache");
    assert_eq!(
        manifest["schedule"]["adaptive"]["follow"].is_string(),
        follow,
        "{label}"
    );
    let (report, steps) =
        common::run_traced_case0(&out.join("manifest.json"), &example, tmp.path());

    let bundle = Bundle::open(&out.join("manifest.json")).unwrap();
    let plain = ditc::models::read_model_or_checkpoint(
        &example.join("ckpt"),
        &common::wan_small_build_options(),
    )
    .unwrap();
    let (noise, text, negative) = common::wan_small_case0(&example);
    let hand = hand_loop(
        &bundle,
        &plain,
        o,
        [&text, &negative],
        &noise,
        follow,
        forecast,
    );

    let worst = common::traced_metrics_worst(label, &steps, &hand.decisions, &hand.metrics);
    let latent = ditc::tensors::read_safetensors(&tmp.path().join("s.safetensors")).unwrap();
    let f = compare(&common::f32_named(&latent, "sample"), &hand.latent);
    eprintln!("{label}: traced metric vs hand loop worst relative {worst:.2e}; final latent vs hand loop rel-L2 {:.2e}", f.rel_l2);
    assert!(worst < 1e-4, "{label}: metric differs by {worst:.2e}");
    // Without a forecast the same graphs compute the same values: bit-identical. With one, the
    // graph's f32 weights and the f64 table's rounded to f32 may differ in the last bit.
    let bound = if forecast.is_some() { 5e-5 } else { 1e-5 };
    assert!(
        f.rel_l2 < bound,
        "{label}: final latent rel-L2 {:.2e}",
        f.rel_l2
    );
    (report, hand)
}

/// The recipe's defaults (EasyCache4Wan2.1's), CFG: the unconditional call follows the conditional
/// one. Also the README's row (fidelity vs the full computation, calls computed).
#[test]
fn traced_run_follows_the_hand_loop() {
    let (report, hand) = check_against_hand_loop(
        "easy-cache 0.05",
        &[],
        &EasyCacheOptions::default(),
        true,
        None,
    );
    assert_eq!(
        hand.decisions[0], hand.decisions[1],
        "the unconditional call follows"
    );
    for (n, c) in hand.recorded.iter().enumerate().take(16) {
        eprintln!(
            "recorded cond call {n}: ({:e}, {:e}, {:e}, {:e})",
            c.0, c.1, c.2, c.3
        );
    }
    let computed: usize = hand.decisions.iter().flatten().filter(|&&c| c).count();
    let f = &report["fidelity"];
    let (psnr, cosine, rel_l2) = (
        f["psnr_db"].as_f64().unwrap(),
        f["cosine"].as_f64().unwrap(),
        f["rel_l2"].as_f64().unwrap(),
    );
    println!("easy-cache on wan-small (CFG, 50 steps, case 0, defaults): {computed} / 100 calls computed; vs full PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel_l2:.3}");
    assert_eq!(computed, 44);
    assert!(psnr > 23.0 && cosine > 0.992 && rel_l2 < 0.125, "{f}");
}

/// `per_branch = true`: each branch decides on its own state (20 steps, warm-up 4, threshold 0.1).
#[test]
fn per_branch_decisions_follow_the_hand_loop() {
    let o = EasyCacheOptions {
        threshold: 0.1,
        warmup_steps: 4,
        last_steps: 1,
        per_branch: true,
    };
    let sets = [
        "sampler.steps=20",
        "broadcast-adaptive.per_branch=true",
        "broadcast-adaptive.warmup_steps=4",
        "broadcast-adaptive.threshold=0.1",
    ];
    let (_, hand) = check_against_hand_loop("per-branch", &sets, &o, false, None);
    for d in &hand.decisions {
        assert!(d.contains(&false), "some calls of each branch skip");
    }
}

/// TaylorSeer forecasting (order 2) on the defaults: on a skipped call the graph adds the forecast
/// of the last three computed residuals with weights it computes from the steps of its computed calls;
/// the hand loop takes the weights from `forecast::coefficients` (the static-table function, tested
/// on closed forms) over its own decisions. Also the README's rows with forecasting (order 1: measured
/// by `ditc run` alone).
#[test]
fn forecast_follows_the_hand_loop() {
    let sets = [
        "broadcast-adaptive.forecast=\"taylor\"",
        "broadcast-adaptive.order=2",
    ];
    let (report, hand) = check_against_hand_loop(
        "easy-cache + taylor 2",
        &sets,
        &EasyCacheOptions::default(),
        true,
        Some(Taylor { order: 2 }),
    );
    let computed: usize = hand.decisions.iter().flatten().filter(|&&c| c).count();
    let f = &report["fidelity"];
    let (psnr, cosine, rel_l2) = (
        f["psnr_db"].as_f64().unwrap(),
        f["cosine"].as_f64().unwrap(),
        f["rel_l2"].as_f64().unwrap(),
    );
    println!("easy-cache + taylor order 2 on wan-small (CFG, 50 steps, case 0): {computed} / 100 calls computed; vs full PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel_l2:.3}");
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let out = tmp.path().join("b");
    convert_wan_small(
        &example,
        &repo_path("passes/wan-easycache.toml"),
        &["broadcast-adaptive.forecast=\"taylor\""],
        &out,
    );
    let stdout = ditc_ok(&strs(&run_args(
        &out.join("manifest.json"),
        &example.join("inputs.safetensors"),
        "0.",
        &tmp.path().join("s.safetensors"),
        &["--compare-full", "--json"],
    )));
    let one: Value = serde_json::from_slice(&stdout).unwrap();
    let calls = |r: &Value| -> u64 {
        ["cond", "uncond"]
            .iter()
            .map(|b| {
                r["scheduled"]["branches"][b]["model_calls"]["computed"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    let f1 = &one["fidelity"];
    println!(
        "easy-cache + taylor order 1: {} / 100 calls computed; vs full PSNR {:.2} dB, cosine {:.5}, rel-L2 {:.3}",
        calls(&one),
        f1["psnr_db"].as_f64().unwrap(),
        f1["cosine"].as_f64().unwrap(),
        f1["rel_l2"].as_f64().unwrap()
    );
    assert_eq!(calls(&report) as usize, computed);
    assert_eq!((computed, calls(&one)), (44, 44));
    assert!(psnr > 25.0 && cosine > 0.995 && rel_l2 < 0.1, "{f}");
    let f1 = (
        f1["psnr_db"].as_f64().unwrap(),
        f1["rel_l2"].as_f64().unwrap(),
    );
    assert!(f1.0 > 26.5 && f1.1 < 0.09, "{f1:?}");
}

/// latte-tiny (no guidance, DDIM 50, held-out case 1 of its trajectories): its blocks alternate layouts,
/// and the stack (checked by name in `tests/analysis.rs`) leaves at the reshape back to the input's
/// layout. `ditc run --trace` follows a hand loop on the plain exported graph, decision for decision,
/// with the rule's defaults; the README's latte row.
#[test]
fn latte_traced_run_follows_the_hand_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let latte = repo_path("examples/latte-tiny");
    let recipe = tmp.path().join("latte.toml");
    let pab = std::fs::read_to_string(repo_path("passes/pab.toml")).unwrap();
    let sampler = &pab[..pab.find("[[passes]]").unwrap()];
    std::fs::write(
        &recipe,
        format!("{sampler}[[passes]]\nname = \"broadcast-adaptive\"\n[passes.options]\npolicy = \"easy-cache\"\n"),
    )
    .unwrap();
    let out = tmp.path().join("b");
    ditc_ok(&[
        "convert",
        latte.join("model.onnx").to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let inputs = latte.join("sampling.safetensors");
    let trace = tmp.path().join("trace.json");
    let stdout = ditc_ok(&strs(&run_args(
        &out.join("manifest.json"),
        &inputs,
        "1.",
        &tmp.path().join("s.safetensors"),
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--compare-full",
            "--json",
        ],
    )));
    let report: Value = serde_json::from_slice(&stdout).unwrap();
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let steps = t["steps"].as_array().unwrap();

    let bundle = Bundle::open(&out.join("manifest.json")).unwrap();
    let plain = ditc::onnx::read_model(&latte.join("model.onnx")).unwrap();
    let tensors = ditc::tensors::read_safetensors(&inputs).unwrap();
    let noise = common::named(&tensors, "1.noise").clone();
    let mut text = common::named(&tensors, "1.encoder_hidden_states").clone();
    text.name = "encoder_hidden_states".into();
    let call_inputs = |x: &[f32], i: usize| {
        vec![
            Tensor::from_f32("hidden_states", noise.dims.clone(), x),
            ditc::runtime::sampling::timestep_tensor(
                &plain,
                "timestep",
                bundle.sampler.timesteps[i],
            )
            .unwrap(),
            text.clone(),
        ]
    };
    let mut x = noise.to_f32_vec().unwrap();
    let p = StackProbe::at(
        &plain,
        &call_inputs(&x, 0),
        "/m/pos_embed/Cast_output_0",
        "/m/Reshape_20_output_0",
        &[],
    );
    let o = EasyCacheOptions::default();
    let mut rule = Rule::new(o.clone(), bundle.sampler.steps());
    let mut cache = common::Forecaster::new(None);
    let (mut prev_in, mut prev_out, mut computed_in) = (Vec::new(), Vec::new(), Vec::new());
    let (mut decisions, mut metrics) = (Vec::new(), Vec::new());
    for i in 0..bundle.sampler.steps() {
        let step_inputs = call_inputs(&x, i);
        let out = p.probe.run(&step_inputs).unwrap();
        let (s_in, s_out) = (
            common::f32_named(&out, &p.stack_in),
            common::f32_named(&out, &p.stack_out),
        );
        let change = |a: &[f32], b: &Vec<f32>| {
            if b.is_empty() {
                f64::NAN
            } else {
                common::mean_abs_diff(a, b)
            }
        };
        let norm = if prev_out.is_empty() {
            f64::NAN
        } else {
            common::mean_abs(&prev_out)
        };
        let (compute, metric) = rule.decide(i, change(&x, &prev_in), norm);
        if let Some(m) = metric {
            assert!(
                (m - o.threshold).abs() / o.threshold > 1e-4,
                "step {i}: {m} at the threshold"
            );
        }
        prev_in = x.clone();
        let prediction = if compute {
            let prediction = common::f32_named(&out, "sample");
            rule.computed(change(&prediction, &prev_out), change(&x, &computed_in));
            let residual: Vec<f32> = s_out.iter().zip(&s_in).map(|(a, b)| a - b).collect();
            cache.computed(&residual);
            prev_out = prediction.clone();
            computed_in = x.clone();
            prediction
        } else {
            p.reuse(&step_inputs, &s_in, &cache.skipped(i))
        };
        decisions.push(compute);
        metrics.push(metric);
        bundle.sampler.step(i, &mut x, &prediction);
    }
    let traced: Vec<bool> = steps
        .iter()
        .map(|s| s["cond"]["computed"].as_bool().unwrap())
        .collect();
    eprintln!("latte: ditc {}", common::show_decisions(&traced));
    eprintln!("latte: hand {}", common::show_decisions(&decisions));
    assert_eq!(traced, decisions);
    for (s, want) in steps.iter().zip(&metrics) {
        match want {
            None => assert!(s["cond"]["metric"].is_null()),
            Some(w) => {
                let got = s["cond"]["metric"].as_f64().unwrap();
                assert!((got - w).abs() / w.abs() < 1e-4, "{got} vs {w}");
            }
        }
    }
    let latent = ditc::tensors::read_safetensors(&tmp.path().join("s.safetensors")).unwrap();
    let f = compare(&common::f32_named(&latent, "sample"), &x);
    assert!(
        f.rel_l2 < 1e-5,
        "final latent vs hand loop rel-L2 {:.2e}",
        f.rel_l2
    );
    let computed = decisions.iter().filter(|&&c| c).count();
    let fid = &report["fidelity"];
    println!(
        "easy-cache on latte-tiny (DDIM 50, case 1, defaults): {computed} / 50 calls computed; vs full PSNR {:.2} dB, rel-L2 {:.3}",
        fid["psnr_db"].as_f64().unwrap(),
        fid["rel_l2"].as_f64().unwrap()
    );
    assert_eq!(computed, 19);
    assert!(fid["psnr_db"].as_f64().unwrap() > 25.5 && fid["rel_l2"].as_f64().unwrap() < 0.09);
}

#[test]
fn bad_options_and_unfit_models_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let recipe = repo_path("passes/wan-easycache.toml");
    let out = tmp.path().join("never");
    for (set, expect) in [
        ("broadcast-adaptive.threshold=-1", "finite number >= 0"),
        ("broadcast-adaptive.thresh=0.1", "unknown field"),
        (
            "broadcast-adaptive.warmup_steps=49",
            "below the sampler's 50 steps",
        ),
        ("broadcast-adaptive.order=3", "forecast"),
    ] {
        assert_refused(
            &strs(&convert_wan_small_args(&example, &recipe, &[set], &out)),
            &[expect],
        );
        assert!(!out.exists());
    }
    // per_branch without guidance.
    let args = convert_wan_small_args(
        &example,
        &repo_path("passes/fbc-flow.toml"),
        &[
            "broadcast-adaptive.policy=\"easy-cache\"",
            "broadcast-adaptive.threshold=0.05",
            "broadcast-adaptive.per_branch=true",
        ],
        &out,
    );
    assert_refused(&strs(&args), &["per_branch needs classifier-free guidance"]);
    // No policy: easy-cache is the default; it bakes on wan-small and on latte-tiny (whose stack
    // leaves in its input's layout).
    let recipe = tmp.path().join("default.toml");
    std::fs::write(
        &recipe,
        "name = \"d\"\nversion = 1\n[sampler]\nkind = \"flow_euler\"\nsteps = 20\nnum_train_timesteps = 1000\nshift = 3.0\n[[passes]]\nname = \"broadcast-adaptive\"\n",
    )
    .unwrap();
    let latte = repo_path("examples/latte-tiny/model.onnx");
    let latte_out = tmp.path().join("latte");
    ditc_ok(&[
        "convert",
        latte.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        latte_out.to_str().unwrap(),
    ]);
    let latte_manifest: Value =
        serde_json::from_slice(&std::fs::read(latte_out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(latte_manifest["schedule"]["policy"], "easy-cache");
    assert_eq!(
        latte_manifest["schedule"]["blocks"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    let manifest = convert_wan_small(&example, &recipe, &[], &out);
    assert_eq!(manifest["schedule"]["policy"], "easy-cache");
    assert!(
        manifest["schedule"]["adaptive"]["follow"].is_null(),
        "no guidance: nothing to follow"
    );
}
