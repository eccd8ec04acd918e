//! AdaCache + MoReg (`broadcast-adaptive`, `policy = "ada-cache"`): the rule (`ditc::schedule::
//! ada_cache::Rule`, f64) on a hand-worked sequence and on distances and motions recorded from a real
//! wan-small run, every decision and rate worked out by hand; then real wan-small runs with CFG
//! (`ditc run --trace`) against a hand loop written here: the plain graph built from the checkpoint,
//! run call by call with the block stack's input and output and the measured block's values exposed,
//! the distance and motion measured from those values, the rule applied per branch, the stack's
//! residual added on skipped calls. Every traced decision (both branches) and distance must be the
//! hand loop's, and so must the final latent. Plus the README's rows and the refusals.

mod common;

use common::{
    assert_refused, convert_wan_small, convert_wan_small_args, repo_path, strs, StackProbe,
};
use ditc::ir::{Model, Tensor};
use ditc::metrics::compare;
use ditc::runtime::sampling::Bundle;
use ditc::schedule::ada_cache::{AdaCacheOptions, Codebook, Residual, Rule};
use ditc::schedule::forecast::Taylor;
use ditc::schedule::guidance::combine;
use serde_json::Value;

/// Drive `rule` over `steps`; `measured[k]` is the (distance, motion) of the k-th computed step that
/// measures. Returns the decisions and the distances the codebook saw.
fn drive(rule: &mut Rule, steps: usize, measured: &[(f64, f64)]) -> (Vec<bool>, Vec<Option<f64>>) {
    let (mut decisions, mut distances) = (Vec::new(), Vec::new());
    let mut next = measured.iter();
    for step in 0..steps {
        let (compute, measures) = rule.decide(step);
        let d = if compute {
            let m = if measures { next.next().copied() } else { None };
            rule.computed(step, m)
        } else {
            None
        };
        decisions.push(compute);
        distances.push(d);
    }
    (decisions, distances)
}

#[test]
fn the_rule_on_a_hand_worked_sequence() {
    // 16 steps, codebook {0.25: 4, 0.5: 2, 1.0: 1}, MoReg in 1-based steps [4, 12], norm 0.5,
    // power 2, mograd 1 (binary fractions: exact).
    let o = AdaCacheOptions {
        codebook: Some(Codebook::Entries(vec![(0.25, 4), (0.5, 2), (1.0, 1)])),
        moreg_steps: Some([4, 12]),
        moreg_norm: 0.5,
        moreg_power: 2.0,
        mograd_mul: 1.0,
        ..Default::default()
    };
    let mut rule = Rule::new(&o, 16).unwrap();
    let measured = [
        // n = 2 (rate 1): outside the window: m = 1, g = 1 * (1 - 1) / 1 = 0: d = 0.125 < 0.25: rate 4.
        (0.125, 0.9),
        // n = 6: d = 0.5 / 4 = 0.125; m = (0.25 / 0.5)^2 = 0.25, g = (0.25 - 1) / 4 = -0.1875:
        //        d = 0.125 * (0.25 + 0.1875) = 0.0546875 < 0.25: rate 4.
        (0.5, 0.25),
        // n = 10: d = 1.0 / 4 = 0.25; m = (0.5 / 0.5)^2 = 1, g = (1 - 0.25) / 4 = 0.1875:
        //         d = 0.25 * 1.1875 = 0.296875: not < 0.25, < 0.5: rate 2.
        (1.0, 0.5),
        // n = 12: d = 0.5 / 2 = 0.25; m = (0.5 / 0.5)^2 = 1 (12 is in the window), g = 0: d = 0.25:
        //         not < 0.25: rate 2.
        (0.5, 0.5),
        // n = 14: d = 3.0 / 2 = 1.5; outside: m = 1, g = 0: d = 1.5: the last value, rate 1.
        (3.0, 0.5),
        // n = 15 (forced, the last two): d = 0.25 / 1; m = 1: rate 2 (no step left to use it).
        (0.25, 0.5),
        // n = 16 (forced): d = 0.25 / 2 = 0.125.
        (0.25, 0.5),
    ];
    let (d, m) = drive(&mut rule, 16, &measured);
    // n = 1 computes (no reference), 2 = 1 + rate 1, 6 = 2 + 4, 10 = 6 + 4, 12 = 10 + 2, 14, 15, 16.
    assert_eq!(common::show_decisions(&d), "CC---C---C-C-CCC");
    let got: Vec<f64> = m.iter().flatten().copied().collect();
    assert_eq!(got, [0.125, 0.0546875, 0.296875, 0.25, 1.5, 0.25, 0.125]);
    assert_eq!(m[0], None, "the first step measures nothing");
    assert_eq!(rule.prev_moreg, 1.0);
    // Without MoReg the distances are the per-step changes alone.
    let mut plain = Rule::new(&AdaCacheOptions { moreg: false, ..o }, 16).unwrap();
    let (_, m) = drive(&mut plain, 16, &measured);
    assert_eq!(
        m.iter().flatten().copied().collect::<Vec<_>>()[..3],
        [0.125, 0.125, 0.25]
    );
}

/// The distances and motions the conditional branch measured in the run of
/// `traced_run_follows_the_hand_loop` (wan-small, case 0, CFG 5.0, 50 steps, defaults: the 30-step
/// fast codebook, MoReg in 1-based steps 5-45, norm 0.385, power 8, mograd 10; its hand loop prints
/// them), driven through the rule.
#[test]
fn the_rule_on_a_recorded_sequence() {
    #[rustfmt::skip]
    let measured = [
        (5.145099399390335e-2, 3.556864067979288e-2),
        (2.711241339284919e-1, 4.0080232419072194e-2),
        (3.029251031365557e-1, 5.198773511418611e-2),
        (3.250667003541591e-1, 7.704417916936158e-2),
        (2.4835168655193957e-1, 8.467211132979392e-2),
        (3.030370481880641e-1, 1.0616046631247794e-1),
        (3.5979635316367964e-1, 1.2346308913832964e-1),
        (4.76499409632926e-1, 1.2857433783472133e-1),
        (6.022736220817656e-1, 1.1985984796576368e-1),
        (3.590838839006285e-1, 1.0447693016911686e-1),
    ];
    let mut rule = Rule::new(&AdaCacheOptions::default(), 50).unwrap();
    let (d, m) = drive(&mut rule, 50, &measured);
    // n = 1 computes; n = 2 (rate 1): d = 0.051451, outside the window (m = 1, g = 0): < 0.08: rate 6.
    // n = 8: d = 0.271124 / 6 = 0.045187; m = (0.040080 / 0.385)^8 = 1.3796e-8,
    //        g = 10 (m - 1) / 6 = -1.666667: d = 0.045187 * 1.666667 = 0.075312 < 0.08: rate 6.
    // n = 14: d = 0.302925 / 6 = 0.050488; m = (0.051988 / 0.385)^8 = 1.1054e-7, g = 1.6124e-7:
    //         d = 1.3722e-8: rate 6. So on to n = 44 (m stays below 2e-4: the rate stays 6).
    // n = 49 (forced, the last two): d = 0.602274 / 6 = 0.100379; outside: m = 1,
    //        g = 10 (1 - 1.5472e-4) / 6 = 1.666409: d = 0.267651: < 0.32: rate 3.
    // n = 50: d = 0.359084 / 3 = 0.119695, m = 1, g = 0: rate 5.
    assert_eq!(
        common::show_decisions(&d),
        "CC-----C-----C-----C-----C-----C-----C-----C----CC"
    );
    let got: Vec<f64> = m.iter().flatten().copied().collect();
    let want = [
        (0.051451, 1e-6),
        (0.075312, 1e-6),
        (1.3722e-8, 1e-11),
        (3.6157e-7, 1e-10),
        (4.2670e-7, 1e-10),
        (4.0405e-6, 1e-9),
        (1.45447e-5, 1e-9),
        (1.79626e-5, 1e-9),
        (0.267651, 1e-6),
        (0.119695, 1e-6),
    ];
    assert_eq!(got.len(), want.len());
    for (k, (g, (w, tolerance))) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < tolerance, "measure {k}: {g} vs {w}");
    }
    assert_eq!(rule.rate, 5);
    assert!((rule.prev_moreg - 1.0).abs() < 1e-12);
}

/// MoReg's raw motion of a `[1, tokens, channels]` residual over frames of `per_frame` tokens.
fn motion(r: &[f32], per_frame: usize, channels: usize) -> f64 {
    let shift = per_frame * channels;
    let (later, earlier) = (&r[shift..], &r[..r.len() - shift]);
    common::mean_abs_diff(later, earlier) / (common::mean_abs(later) + common::mean_abs(earlier))
}

/// What the hand loop did: per branch the decisions and distances, the measured (distance, motion)
/// of the conditional branch, the final latent.
struct HandRun {
    decisions: [Vec<bool>; 2],
    distances: [Vec<Option<f64>>; 2],
    recorded: Vec<(f64, f64)>,
    latent: Vec<f32>,
}

/// Sample with the hand loop; the distance is measured on block `block`'s residual `residual`.
fn hand_loop(
    bundle: &Bundle,
    plain: &Model,
    o: &AdaCacheOptions,
    block: usize,
    texts: [&Tensor; 2],
    noise: &Tensor,
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
    // The Wan builder's names: block k's input is block k-1's output; its first residual add.
    let block_in = format!("blocks.{}.ffn/residual", block - 1);
    let after_attn = format!("blocks.{block}.attn1/residual");
    let block_out = format!("blocks.{block}.ffn/residual");
    let mut x = noise.to_f32_vec().unwrap();
    let p = StackProbe::new(
        plain,
        &inputs(&x, 0, texts[0]),
        &[&block_in, &after_attn, &block_out],
    );
    let (tokens, channels) = (p.dims[1] as usize, p.dims[2] as usize);
    let per_frame = tokens / noise.dims[2] as usize;
    let mut rules = [Rule::new(o, steps).unwrap(), Rule::new(o, steps).unwrap()];
    let mut references: [Vec<f32>; 2] = Default::default();
    let mut caches = [
        common::Forecaster::new(forecast),
        common::Forecaster::new(forecast),
    ];
    let mut run = HandRun {
        decisions: Default::default(),
        distances: Default::default(),
        recorded: Vec::new(),
        latent: Vec::new(),
    };
    for i in 0..steps {
        let mut predictions = Vec::new();
        for k in 0..2 {
            let step_inputs = inputs(&x, i, texts[k]);
            let out = p.probe.run(&step_inputs).unwrap();
            let (s_in, s_out) = (
                common::f32_named(&out, &p.stack_in),
                common::f32_named(&out, &p.stack_out),
            );
            let (compute, measures) = rules[k].decide(i);
            let mut distance = None;
            let prediction = if compute {
                let (a, b) = match o.residual {
                    Residual::Attention => (
                        common::f32_named(&out, &after_attn),
                        common::f32_named(&out, &block_in),
                    ),
                    Residual::CrossMlp => (
                        common::f32_named(&out, &block_out),
                        common::f32_named(&out, &after_attn),
                    ),
                };
                let r: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a - b).collect();
                let measured = measures.then(|| {
                    let change = common::mean_abs_diff(&references[k], &r)
                        / common::mean_abs(&references[k]);
                    (change, motion(&r, per_frame, channels))
                });
                if let (0, Some(m)) = (k, measured) {
                    run.recorded.push(m);
                }
                distance = rules[k].computed(i, measured);
                if let Some(d) = distance {
                    for (key, _) in &rules[k].codebook {
                        assert!((d - key).abs() / key > 1e-4, "step {i}: distance {d} within 1e-4 of a codebook key: rounding may decide it");
                    }
                }
                references[k] = r;
                let residual: Vec<f32> = s_out.iter().zip(&s_in).map(|(a, b)| a - b).collect();
                caches[k].computed(&residual);
                common::f32_named(&out, "sample")
            } else {
                p.reuse(&step_inputs, &s_in, &caches[k].skipped(i))
            };
            run.decisions[k].push(compute);
            run.distances[k].push(distance);
            predictions.push(prediction);
        }
        let velocity = combine(scale, &predictions[0], &predictions[1]);
        bundle.sampler.step(i, &mut x, &velocity);
    }
    run.latent = x;
    run
}

/// Convert with `sets`, run `ditc run --trace --compare-full --json`, run the hand loop, compare every
/// decision and distance and the final latent. Returns the run's report (JSON) and the hand run.
fn check_against_hand_loop(
    label: &str,
    sets: &[&str],
    o: &AdaCacheOptions,
    forecast: Option<Taylor>,
) -> (Value, HandRun) {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let out = tmp.path().join("b");
    let manifest = convert_wan_small(&example, &repo_path("passes/wan-adacache.toml"), sets, &out);
    assert_eq!(manifest["schedule"]["policy"], "ada-cache");
    let block = manifest["schedule"]["options"]["block"].as_u64().unwrap() as usize;
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
        block,
        [&text, &negative],
        &noise,
        forecast,
    );

    let worst = common::traced_metrics_worst(label, &steps, &hand.decisions, &hand.distances);
    let latent = ditc::tensors::read_safetensors(&tmp.path().join("s.safetensors")).unwrap();
    let f = compare(&common::f32_named(&latent, "sample"), &hand.latent);
    eprintln!("{label}: traced distance vs hand loop worst relative {worst:.2e}; final latent vs hand loop rel-L2 {:.2e}", f.rel_l2);
    // MoReg's 8th power multiplies the f32 motion's relative rounding by 8.
    assert!(worst < 2e-4, "{label}: distance differs by {worst:.2e}");
    // With a forecast, the graph's f32 weights and the f64 table's rounded to f32 may differ in the
    // last bit.
    let bound = if forecast.is_some() { 5e-5 } else { 1e-5 };
    assert!(
        f.rel_l2 < bound,
        "{label}: final latent rel-L2 {:.2e}",
        f.rel_l2
    );
    (report, hand)
}

fn fidelity(report: &Value) -> (f64, f64, f64) {
    let f = &report["fidelity"];
    (
        f["psnr_db"].as_f64().unwrap(),
        f["cosine"].as_f64().unwrap(),
        f["rel_l2"].as_f64().unwrap(),
    )
}

/// The recipe's defaults (50 steps: the 30-step fast codebook, MoReg in steps 5-45, block 2 of 6, the
/// attention residual), each branch on its own state. Also the README's row.
#[test]
fn traced_run_follows_the_hand_loop() {
    let (report, hand) =
        check_against_hand_loop("ada-cache defaults", &[], &AdaCacheOptions::default(), None);
    for (n, c) in hand.recorded.iter().enumerate() {
        eprintln!("recorded cond measure {n}: ({:e}, {:e})", c.0, c.1);
    }
    let computed: usize = hand.decisions.iter().flatten().filter(|&&c| c).count();
    let (psnr, cosine, rel_l2) = fidelity(&report);
    println!("ada-cache on wan-small (CFG, 50 steps, case 0, defaults): {computed} / 100 calls computed; vs full PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel_l2:.3}");
    assert_eq!(computed, 22);
    assert!(
        psnr > 13.0 && cosine > 0.92 && rel_l2 < 0.4,
        "{psnr} {cosine} {rel_l2}"
    );
}

/// The slow codebook on the cross-attention + MLP residual of block 4, MoReg off; the README's row.
#[test]
fn options_follow_the_hand_loop() {
    let o = AdaCacheOptions {
        codebook: Some(Codebook::Preset("30-step-slow".into())),
        block: Some(4),
        residual: Residual::CrossMlp,
        moreg: false,
        ..Default::default()
    };
    let sets = [
        "broadcast-adaptive.codebook=\"30-step-slow\"",
        "broadcast-adaptive.block=4",
        "broadcast-adaptive.residual=\"cross-mlp\"",
        "broadcast-adaptive.moreg=false",
    ];
    let (report, hand) = check_against_hand_loop("ada-cache slow", &sets, &o, None);
    let computed: usize = hand.decisions.iter().flatten().filter(|&&c| c).count();
    let (psnr, cosine, rel_l2) = fidelity(&report);
    println!("ada-cache on wan-small (CFG, 50 steps, case 0, 30-step-slow, cross-mlp of block 4, no MoReg): {computed} / 100 calls computed; vs full PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel_l2:.3}");
    assert_eq!(computed, 38);
    assert!(
        psnr > 22.5 && cosine > 0.99 && rel_l2 < 0.13,
        "{psnr} {cosine} {rel_l2}"
    );
}

/// TaylorSeer forecasting on the slow codebook's options (the README's rows): on a skipped step the
/// graph adds the forecast of the last computed stack residuals (the sum of every block's residuals,
/// so forecasting it forecasts each block's and sums them: the forecast is linear) with weights it
/// computes from the steps of its computed calls; the hand loop takes them from
/// `forecast::coefficients` over its own decisions. The decisions do not depend on the cached value,
/// so they are the plain run's (38 calls).
#[test]
fn forecast_follows_the_hand_loop() {
    let o = AdaCacheOptions {
        codebook: Some(Codebook::Preset("30-step-slow".into())),
        block: Some(4),
        residual: Residual::CrossMlp,
        moreg: false,
        ..Default::default()
    };
    for order in [1, 2] {
        let order_set = format!("broadcast-adaptive.order={order}");
        let sets = [
            "broadcast-adaptive.codebook=\"30-step-slow\"",
            "broadcast-adaptive.block=4",
            "broadcast-adaptive.residual=\"cross-mlp\"",
            "broadcast-adaptive.moreg=false",
            "broadcast-adaptive.forecast=\"taylor\"",
            &order_set,
        ];
        let label = format!("ada-cache slow + taylor {order}");
        let (report, hand) = check_against_hand_loop(&label, &sets, &o, Some(Taylor { order }));
        let computed: usize = hand.decisions.iter().flatten().filter(|&&c| c).count();
        let (psnr, cosine, rel_l2) = fidelity(&report);
        println!("{label} on wan-small (CFG, 50 steps, case 0): {computed} / 100 calls computed; vs full PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel_l2:.3}");
        assert_eq!(computed, 38);
        // The README's case-0 rows: forecasting lifts the plain run's 22.9 dB (rel-L2 0.126).
        assert!(
            psnr > 28.5 && cosine > 0.997 && rel_l2 < 0.07,
            "{psnr} {cosine} {rel_l2}"
        );
    }
}

#[test]
fn bad_options_and_unfit_models_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let recipe = repo_path("passes/wan-adacache.toml");
    let out = tmp.path().join("never");
    for (set, expect) in [
        ("broadcast-adaptive.codebook=\"fast\"", "not a preset"),
        (
            "broadcast-adaptive.codebook=[[0.2, 2], [0.1, 1]]",
            "increase strictly",
        ),
        (
            "broadcast-adaptive.block=6",
            "block 6 does not exist: the model has 6 blocks",
        ),
        (
            "broadcast-adaptive.residual=\"t-attn\"",
            "invalid ada-cache options",
        ),
        ("broadcast-adaptive.cache_loc=[13]", "unknown field"),
        (
            "broadcast-adaptive.order=2",
            "give forecast = \"taylor\" with it",
        ),
    ] {
        assert_refused(
            &strs(&convert_wan_small_args(&example, &recipe, &[set], &out)),
            &[expect],
        );
        assert!(!out.exists());
    }
    // latte-tiny: its spatial and temporal blocks alternate layouts.
    let recipe = tmp.path().join("latte.toml");
    std::fs::write(
        &recipe,
        "name = \"l\"\nversion = 1\n[sampler]\nkind = \"ddim\"\nsteps = 20\nnum_train_timesteps = 1000\nbeta_schedule = \"linear\"\nbeta_start = 0.0001\nbeta_end = 0.02\n[[passes]]\nname = \"broadcast-adaptive\"\n[passes.options]\npolicy = \"ada-cache\"\n",
    )
    .unwrap();
    let latte = repo_path("examples/latte-tiny/model.onnx");
    let args = [
        "convert",
        latte.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    assert_refused(&args, &["alternate layouts", "not implemented"]);
    assert!(!out.exists());
}
