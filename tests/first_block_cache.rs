//! `broadcast-adaptive` with `policy = "first-block-cache"` on the trained wan-small, without
//! classifier-free guidance: the bundle's in-graph decisions, metrics and final latent against an
//! independent hand loop written here, which runs the plain graph built from the checkpoint (with the
//! residual stream exposed as extra outputs, found by the Wan builder's node names) and applies the
//! rules of diffusers' FirstBlockCache and cache-dit's DBCache (spec §1, §11.3) itself, in f64.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_refused, ditc_ok, fixture};
use ditc::checkpoint::Checkpoint;
use ditc::ir::{infer_types, remove_dead_nodes, remove_unused_inputs, DataType, Dim, Model};
use ditc::ir::{Tensor, ValueInfo};
use ditc::metrics::compare;
use ditc::models::{build_model, BuildOptions};
use ditc::runtime::{sample, Bundle, Plan, StateSet, TractRunner};
use ditc::schedule::forecast::Taylor;
use ditc::schedule::guidance::Branch;

fn shapes() -> BuildOptions {
    BuildOptions {
        frames: Some(8),
        height: Some(16),
        width: Some(16),
        text_len: Some(4),
        ..Default::default()
    }
}

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("passes/fbc-flow.toml")
}

/// The same with WanPipeline's classifier-free guidance (scale 5, the negative from the inputs file).
fn cfg_recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("passes/fbc-wan-cfg.toml")
}

fn convert_args<'a>(model: &'a str, out: &'a str, recipe: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "convert",
        model,
        "--recipe",
        recipe,
        "-o",
        out,
        "--no-progress",
    ];
    args.extend(common::WAN_SMALL_SHAPES);
    args
}

/// `ditc convert` of wan-small's checkpoint with passes/fbc-flow.toml and `--set` overrides.
fn convert(dir: &Path, out: &Path, sets: &[String]) -> PathBuf {
    convert_with(&recipe(), dir, out, sets)
}

fn convert_with(recipe: &Path, dir: &Path, out: &Path, sets: &[String]) -> PathBuf {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    common::convert_wan_small(dir, recipe, &sets, out);
    out.join("manifest.json")
}

/// One configuration, as the test applies it.
#[derive(Clone, Debug)]
struct Rules {
    threshold: f64,
    first: usize,
    last: usize,
    warmup: usize,
    max_cached: Option<usize>,
    max_continuous: Option<usize>,
    steps: usize,
    forecast: Option<Taylor>,
}

impl Rules {
    fn diffusers(threshold: f64) -> Rules {
        Rules {
            threshold,
            first: 1,
            last: 0,
            warmup: 0,
            max_cached: None,
            max_continuous: None,
            steps: 50,
            forecast: None,
        }
    }

    fn sets(&self) -> Vec<String> {
        let mut s = vec![
            format!("broadcast-adaptive.threshold={:?}", self.threshold),
            format!("broadcast-adaptive.compute_first={}", self.first),
            format!("broadcast-adaptive.compute_last={}", self.last),
            format!("broadcast-adaptive.warmup_steps={}", self.warmup),
            format!("sampler.steps={}", self.steps),
        ];
        if let Some(m) = self.max_cached {
            s.push(format!("broadcast-adaptive.max_cached_steps={m}"));
        }
        if let Some(m) = self.max_continuous {
            s.push(format!(
                "broadcast-adaptive.max_continuous_cached_steps={m}"
            ));
        }
        if let Some(t) = self.forecast {
            s.push("broadcast-adaptive.forecast=\"taylor\"".into());
            s.push(format!("broadcast-adaptive.order={}", t.order));
        }
        s
    }
}

/// Why a call computed or skipped, by the rule that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Reason {
    FirstOrWarmup,
    MaxCached,
    MaxContinuous,
    MetricAbove,
    MetricAtOrBelow,
}

/// cache-dit's counters (spec §11.3), per branch.
#[derive(Default)]
struct Counters {
    cached: usize,
    continuous: usize,
    last_cached: Option<usize>,
}

/// The decision of call `step` (true = compute), first matching rule wins.
fn decide(rules: &Rules, step: usize, metric: f64, c: &mut Counters) -> (bool, Reason) {
    if step == 0 || step < rules.warmup {
        return (true, Reason::FirstOrWarmup);
    }
    if rules.max_cached.is_some_and(|m| c.cached >= m) {
        return (true, Reason::MaxCached);
    }
    if rules.max_continuous.is_some_and(|m| c.continuous >= m) {
        c.continuous = 0;
        return (true, Reason::MaxContinuous);
    }
    if metric > rules.threshold {
        return (true, Reason::MetricAbove);
    }
    // cache-dit's add_cached_step.
    match c.last_cached {
        None => c.continuous += 1,
        Some(previous) if step - previous == 1 => {
            c.continuous += if c.continuous == 0 { 2 } else { 1 };
        }
        Some(_) => {}
    }
    c.last_cached = Some(step);
    c.cached += 1;
    (false, Reason::MetricAtOrBelow)
}

/// The residual stream entering block `k` of the Wan builder's graph (its node names).
fn stream_value(model: &Model, k: usize) -> String {
    if k == 0 {
        let node = model
            .graph
            .nodes
            .iter()
            .find(|n| n.name == "blocks.0.attn1/residual")
            .expect("the Wan builder names block 0's first residual add");
        node.inputs[0].clone()
    } else {
        format!("blocks.{}.ffn/residual", k - 1)
    }
}

/// The plain graph, run two ways: whole with the stream values as extra outputs, and from the stream
/// value entering the first always-running tail block (or the output layer) onward.
struct HandLoop {
    probe: TractRunner,
    rest: TractRunner,
    head_in: String,
    head_out: String,
    middle_out: String,
}

impl HandLoop {
    fn new(plain: &Model, rules: &Rules, blocks: usize, example: &[Tensor]) -> HandLoop {
        let head_in = stream_value(plain, 0);
        let head_out = stream_value(plain, rules.first);
        let middle_out = stream_value(plain, blocks - rules.last);
        let types = infer_types(&plain.graph, 17);
        let shape: Vec<Dim> = types[&head_out]
            .shape
            .clone()
            .unwrap()
            .into_iter()
            .map(Dim::Value)
            .collect();
        let mut probe = plain.clone();
        for v in [&head_in, &head_out, &middle_out] {
            probe
                .graph
                .outputs
                .push(ValueInfo::tensor(v, DataType::F32, shape.clone()));
        }
        let mut rest = plain.clone();
        rest.graph
            .nodes
            .retain(|n| !n.outputs.contains(&middle_out));
        rest.graph
            .inputs
            .push(ValueInfo::tensor(&middle_out, DataType::F32, shape.clone()));
        remove_dead_nodes(&mut rest.graph);
        remove_unused_inputs(&mut rest.graph);
        let mut rest_example = example.to_vec();
        let numel: i64 = shape.iter().map(|d| d.value().unwrap()).product();
        rest_example.push(Tensor::from_f32(
            &middle_out,
            shape.iter().map(|d| d.value().unwrap()).collect(),
            &vec![0.0; numel as usize],
        ));
        HandLoop {
            probe: TractRunner::new(&probe, example).unwrap(),
            rest: TractRunner::new(&rest, &rest_example).unwrap(),
            head_in,
            head_out,
            middle_out,
        }
    }
}

fn values(outputs: &[Tensor], name: &str) -> Vec<f32> {
    common::named(outputs, name).to_f32_vec().unwrap()
}

/// What the hand loop did: per call the decision, the rule and the metric (f64); the final latent.
struct HandRun {
    decisions: Vec<bool>,
    reasons: Vec<Reason>,
    metrics: Vec<f64>,
    latent: Vec<f32>,
}

/// Sample `rules.steps` flow-matching steps from `noise`, deciding each call by `rules`.
fn hand_loop(
    bundle: &Bundle,
    plain: &Model,
    rules: &Rules,
    noise: &Tensor,
    text: &Tensor,
) -> HandRun {
    let blocks = bundle.manifest.dit_map["blocks"].as_array().unwrap().len();
    let timestep = |i: usize| {
        ditc::runtime::sampling::timestep_tensor(plain, "timestep", bundle.sampler.timesteps[i])
            .unwrap()
    };
    let inputs = |x: &[f32], i: usize| {
        vec![
            Tensor::from_f32("hidden_states", noise.dims.clone(), x),
            timestep(i),
            text.clone(),
        ]
    };
    let mut x = noise.to_f32_vec().unwrap();
    let hand = HandLoop::new(plain, rules, blocks, &inputs(&x, 0));
    let mut reference: Vec<f32> = Vec::new();
    let mut tail = common::Forecaster::new(rules.forecast);
    let mut counters = Counters::default();
    let mut run = HandRun {
        decisions: Vec::new(),
        reasons: Vec::new(),
        metrics: Vec::new(),
        latent: Vec::new(),
    };
    for i in 0..rules.steps {
        let step_inputs = inputs(&x, i);
        let out = hand.probe.run(&step_inputs).unwrap();
        let (s_in, s_head) = (values(&out, &hand.head_in), values(&out, &hand.head_out));
        let r: Vec<f32> = s_head.iter().zip(&s_in).map(|(a, b)| a - b).collect();
        let metric = if reference.is_empty() {
            f64::NAN
        } else {
            let change: f64 = r
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum();
            let size: f64 = reference.iter().map(|a| a.abs() as f64).sum();
            change / size
        };
        if i > 0 {
            let distance = (metric - rules.threshold).abs() / rules.threshold.max(1e-12);
            assert!(
                distance > 1e-4,
                "step {i}: metric {metric} lies within 1e-4 of the threshold {}: float rounding may decide it; pick another threshold",
                rules.threshold
            );
        }
        let (compute, reason) = decide(rules, i, metric, &mut counters);
        let prediction = if compute {
            let middle = values(&out, &hand.middle_out);
            let residual: Vec<f32> = middle.iter().zip(&s_head).map(|(a, b)| a - b).collect();
            tail.computed(&residual);
            reference = r;
            values(&out, "sample")
        } else {
            let estimate = tail.skipped(i);
            let middle: Vec<f32> = s_head.iter().zip(&estimate).map(|(a, b)| a + b).collect();
            let mut rest_inputs = step_inputs.clone();
            rest_inputs.push(Tensor::from_f32(
                &hand.middle_out,
                common::named(&out, &hand.middle_out).dims.clone(),
                &middle,
            ));
            values(&hand.rest.run(&rest_inputs).unwrap(), "sample")
        };
        bundle.sampler.step(i, &mut x, &prediction);
        run.decisions.push(compute);
        run.reasons.push(reason);
        run.metrics.push(metric);
    }
    run.latent = x;
    run
}

/// The case-0 noise and caption of wan-small's trajectories.
fn case_inputs(dir: &Path) -> (Tensor, Tensor) {
    let tensors = ditc::tensors::read_safetensors(&dir.join("sampling.safetensors")).unwrap();
    let get = |name: &str, as_name: &str| {
        let mut t = common::named(&tensors, name).clone();
        t.name = as_name.into();
        t
    };
    (
        get("0.noise", "noise"),
        get("0.encoder_hidden_states", "encoder_hidden_states"),
    )
}

/// Run `rules` both ways and compare: every decision, the metrics, the final latent.
fn check_against_hand_loop(label: &str, rules: &Rules) -> HandRun {
    let dir = fixture("wan-small");
    let tmp = tempfile::tempdir().unwrap();
    let manifest = convert(&dir, &tmp.path().join("b"), &rules.sets());
    let bundle = Bundle::open(&manifest).unwrap();
    let plain = build_model(&Checkpoint::open(&dir.join("ckpt")).unwrap(), &shapes()).unwrap();
    let (noise, text) = case_inputs(&dir);
    let (latent, report) =
        sample(&bundle, &noise, std::slice::from_ref(&text), false, false).unwrap();
    let hand = hand_loop(&bundle, &plain, rules, &noise, &text);

    let cond: Vec<&ditc::runtime::sampling::TraceCall> = report
        .trace
        .iter()
        .map(|s| &s.branches[&Branch::Cond])
        .collect();
    let decisions: Vec<bool> = cond.iter().map(|c| c.computed).collect();
    let show = |d: &[bool]| -> String { d.iter().map(|&c| if c { 'C' } else { '-' }).collect() };
    eprintln!("{label}: ditc  {}", show(&decisions));
    eprintln!("{label}: hand  {}", show(&hand.decisions));
    assert_eq!(decisions, hand.decisions, "{label}: decisions per step");
    let mut worst = 0.0f64;
    for (call, &want) in cond.iter().zip(&hand.metrics).skip(1) {
        let got = call.metric.expect("a finite metric after the first call");
        worst = worst.max((got - want).abs() / want.abs());
    }
    let f = compare(&latent.to_f32_vec().unwrap(), &hand.latent);
    let computed = decisions.iter().filter(|&&c| c).count();
    eprintln!(
        "{label}: {computed}/{} calls computed; metric max relative difference {worst:.2e}; final latent rel-L2 {:.2e}",
        decisions.len(),
        f.rel_l2
    );
    assert!(worst <= 5e-5, "{label}: metric differs by {worst}");
    // With a forecast, the graph's f32 weights and the f64 table's rounded to f32 may differ in the
    // last bit.
    let bound = if rules.forecast.is_some() { 5e-5 } else { 1e-5 };
    assert!(
        f.rel_l2 <= bound,
        "{label}: final latent rel-L2 {}",
        f.rel_l2
    );
    assert_eq!(
        report.model_flops < report.model_flops_full,
        computed < decisions.len(),
        "{label}: FLOPs count what ran"
    );
    hand
}

/// diffusers' defaults (block 0 always runs, nothing else): the two fixture thresholds, both with calls
/// computed and skipped.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hand_loop_diffusers_rule() {
    for threshold in [0.05, 0.2] {
        let hand = check_against_hand_loop(
            &format!("threshold {threshold}"),
            &Rules::diffusers(threshold),
        );
        assert!(hand.decisions.contains(&false) && hand.reasons.contains(&Reason::MetricAbove));
    }
}

/// TaylorSeer forecasting (orders 1 and 2) at threshold 0.2: on a skipped call the graph adds the
/// forecast of the cached blocks' last computed residuals, its weights computed in the graph from the
/// steps of the computed calls; the hand loop takes them from `forecast::coefficients`. The metric is
/// the head's residual, which the forecast does not change until the first forecast call feeds the
/// sampler, so the decisions may differ from the plain run's: both are the hand loop's.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hand_loop_forecast() {
    for order in [1, 2] {
        let rules = Rules {
            forecast: Some(Taylor { order }),
            ..Rules::diffusers(0.2)
        };
        let hand = check_against_hand_loop(&format!("threshold 0.2 + taylor {order}"), &rules);
        assert!(hand.decisions.iter().filter(|&&c| !c).count() >= 3);
    }
}

/// Threshold 0 never skips: every call computes and the result is the plain graph's trajectory.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hand_loop_threshold_zero_never_skips() {
    let rules = Rules {
        steps: 12,
        ..Rules::diffusers(0.0)
    };
    let hand = check_against_hand_loop("threshold 0", &rules);
    assert!(hand.decisions.iter().all(|&c| c));
}

/// cache-dit's generalisation: two head blocks, one tail block, warm-up, a budget of cached calls and a
/// limit on cached calls in a row; every rule decides at least one call.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hand_loop_dbcache_options() {
    let rules = Rules {
        threshold: 0.3,
        first: 2,
        last: 1,
        warmup: 3,
        max_cached: Some(9),
        max_continuous: Some(2),
        steps: 30,
        forecast: None,
    };
    let hand = check_against_hand_loop("dbcache", &rules);
    for reason in [
        Reason::FirstOrWarmup,
        Reason::MaxCached,
        Reason::MaxContinuous,
        Reason::MetricAtOrBelow,
    ] {
        assert!(
            hand.reasons.contains(&reason),
            "no call decided by {reason:?}: {:?}",
            hand.reasons
        );
    }
}

/// The split plan (prefix, then only the taken outcome) gives the outputs tract gives running the `If`
/// itself, on computed and skipped calls; the emitted graph passes the graph check, the TensorRT lint
/// (`ditc lint`) and the manifest schema, and its condition is a 0-D bool.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn bundle_is_valid_and_split_plan_equals_the_if_graph() {
    let dir = fixture("wan-small");
    let tmp = tempfile::tempdir().unwrap();
    // A threshold no metric reaches: call 0 computes, every later call skips.
    let manifest_path = convert(
        &dir,
        &tmp.path().join("b"),
        &[
            "broadcast-adaptive.threshold=1e9".into(),
            "sampler.steps=4".into(),
        ],
    );
    // `ditc run --trace` writes each call's decision and metric.
    let trace_path = tmp.path().join("trace.json");
    ditc_ok(&[
        "run",
        manifest_path.to_str().unwrap(),
        "--inputs",
        dir.join("sampling.safetensors").to_str().unwrap(),
        "--prefix",
        "0.",
        "-o",
        tmp.path().join("s.safetensors").to_str().unwrap(),
        "--trace",
        trace_path.to_str().unwrap(),
        "--no-progress",
    ]);
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace_path).unwrap()).unwrap();
    let steps = trace["steps"].as_array().unwrap();
    let computed: Vec<bool> = steps
        .iter()
        .map(|s| s["cond"]["computed"].as_bool().unwrap())
        .collect();
    assert_eq!(computed, [true, false, false, false]);
    assert!(steps[0]["cond"]["metric"].is_null());
    assert!(steps[1..].iter().all(|s| s["cond"]["metric"].is_f64()));
    assert!(steps.iter().enumerate().all(|(i, s)| s["step"] == i));
    assert!(steps[1]["cond"]["groups"]["blocks"] == false);
    let graph_file = tmp.path().join("b/model.onnx");
    let stdout = ditc_ok(&["lint", graph_file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&stdout).contains("conforms"));
    let model = ditc::onnx::read_model(&graph_file).unwrap();
    ditc::ir::check_graph(&model.graph).unwrap();
    let types = infer_types(&model.graph, model.default_opset());
    let condition = &types["ditc.decision"];
    assert_eq!(
        (condition.dtype, condition.shape.as_deref()),
        (Some(DataType::Bool), Some(&[][..]))
    );
    let ifs: Vec<_> = model
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "If")
        .collect();
    assert_eq!(ifs.len(), 1);
    assert_eq!(ifs[0].inputs, ["ditc.decision"]);
    assert_eq!(
        ditc::lint::lint(&model, ditc::lint::Target::Trt10, None),
        []
    );
    // The If rules see this graph: a float condition, and an else-branch short of an output.
    let if_index = model
        .graph
        .nodes
        .iter()
        .position(|n| n.op_type == "If")
        .unwrap();
    let mut float_condition = model.clone();
    float_condition.graph.nodes[if_index].inputs[0] = "ditc.metric".into();
    let mut short_else = model.clone();
    for a in &mut short_else.graph.nodes[if_index].attributes {
        if let ditc::ir::AttrValue::Graph(g) = &mut a.value {
            if a.name == "else_branch" {
                g.outputs.pop();
            }
        }
    }
    for (broken, expect) in [
        (float_condition, "0-D bool"),
        (short_else, "else_branch has 2 outputs, the If 3"),
    ] {
        let found = ditc::lint::lint(&broken, ditc::lint::Target::Trt10, None);
        assert!(
            found
                .iter()
                .any(|v| v.rule == "if-branches" && v.message.contains(expect)),
            "{expect}: {found:?}"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(
        ditc::manifest::validate_schema(&manifest),
        Vec::<String>::new()
    );
    assert_eq!(manifest["schedule"]["policy"], "first-block-cache");
    assert_eq!(
        manifest["schedule"]["adaptive"]["cached_blocks"],
        serde_json::json!([1, 2, 3, 4, 5])
    );
    let states: Vec<&str> = manifest["state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["input"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "ditc.state.fbc.head_residual",
            "ditc.state.fbc.tail_residual"
        ]
    );

    let bundle = Bundle::open(&manifest_path).unwrap();
    let (noise, text) = case_inputs(&dir);
    let mut common_inputs = vec![text, noise.clone()];
    common_inputs[1].name = "hidden_states".into();
    let mut split_state = StateSet::zeros(&bundle.model, &bundle.manifest.state).unwrap();
    let mut if_state = split_state.clone();
    let step_inputs = |i: usize| {
        let mut v = common_inputs.clone();
        v.push(
            ditc::runtime::sampling::timestep_tensor(
                &bundle.model,
                "timestep",
                bundle.sampler.timesteps[i],
            )
            .unwrap(),
        );
        v.push(Tensor::from_i64("ditc.step", vec![], &[i as i64]));
        v
    };
    let example = [&step_inputs(0)[..], split_state.tensors()].concat();
    let plan = Plan::new(&bundle.model, &example).unwrap();
    assert!(matches!(plan, Plan::Split(_)));
    let tract_if = TractRunner::new(&bundle.model, &example).unwrap();
    for i in 0..3 {
        let split = ditc::runtime::conditional::call(
            &plan,
            &step_inputs(i),
            &mut split_state,
            &bundle.manifest.state,
        )
        .unwrap();
        let direct = tract_if
            .run(&[&step_inputs(i)[..], if_state.tensors()].concat())
            .unwrap();
        if_state.update(&bundle.manifest.state, &direct);
        let decision = common::named(&split.outputs, "ditc.decision")
            .raw()
            .unwrap()[0]
            != 0;
        assert_eq!(decision, i == 0, "call {i}");
        for d in &direct {
            let s = common::named(&split.outputs, &d.name);
            assert_eq!((s.dtype, &s.dims), (d.dtype, &d.dims), "{}", d.name);
            if d.dtype == DataType::F32 && s.raw() != d.raw() {
                let f = compare(&s.to_f32_vec().unwrap(), &d.to_f32_vec().unwrap());
                assert!(
                    f.max_rel <= 1e-6 || f.max_abs == 0.0,
                    "call {i} '{}': {f:?}",
                    d.name
                );
            } else {
                assert_eq!(s.raw(), d.raw(), "call {i} '{}'", d.name);
            }
        }
    }
}

/// Bad options and models without the block structure are refused by name, with nothing written.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn bad_options_and_models_are_refused() {
    let dir = fixture("wan-small");
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, recipe, out) = (dir.join("ckpt"), recipe(), tmp.path().join("o"));
    let base = convert_args(
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
        recipe.to_str().unwrap(),
    );
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["broadcast-adaptive.threshold=nan"],
            &["threshold must be a finite number >= 0", "NaN"],
        ),
        (
            &["broadcast-adaptive.threshold=-0.1"],
            &["threshold must be a finite number >= 0", "-0.1"],
        ),
        (
            &["broadcast-adaptive.compute_first=0"],
            &["compute_first must be at least 1"],
        ),
        (
            &[
                "broadcast-adaptive.compute_first=4",
                "broadcast-adaptive.compute_last=2",
            ],
            &["compute_first (4) + compute_last (2) must be below the model's 6 blocks"],
        ),
        (
            &["broadcast-adaptive.policy=\"no-such-cache\""],
            &["unknown policy", "no-such-cache"],
        ),
        (
            &["broadcast-adaptive.treshold=0.1"],
            &["unknown field", "treshold"],
        ),
        (
            &["broadcast-adaptive.max_cached_steps=-2"],
            &["invalid first-block-cache options"],
        ),
    ];
    for (sets, expect) in cases {
        let mut args = base.clone();
        for s in sets {
            args.extend(["--set", s]);
        }
        assert_refused(&args, expect);
        assert!(!out.exists(), "{sets:?}: nothing may be written");
    }
    // latte-tiny's temporal blocks read the spatial blocks' output in another layout: block 0 alone
    // cannot be the head (compute_first = 2, a spatial and a temporal block, can).
    let onnx = common::demo().join("model.onnx");
    let args = convert_args(
        onnx.to_str().unwrap(),
        out.to_str().unwrap(),
        recipe.to_str().unwrap(),
    );
    assert_refused(&args[..7], &["changes type or shape", "compute_first = 2"]);
    assert!(!out.exists());
    // A graph without transformer blocks.
    let plain = {
        let graph = ditc::ir::Graph {
            inputs: vec![ValueInfo::tensor(
                "x",
                DataType::F32,
                vec![Dim::Value(1), Dim::Value(4)],
            )],
            outputs: vec![ValueInfo::tensor(
                "y",
                DataType::F32,
                vec![Dim::Value(1), Dim::Value(4)],
            )],
            nodes: vec![ditc::ir::Node::new("relu", "Relu", &["x"], &["y"])],
            ..Default::default()
        };
        Model::new(graph, 17)
    };
    let mut model = plain.clone();
    let mut cx = ditc::passes::PassContext {
        dit_map: ditc::analysis::analyse(&model),
        sampler: None,
        guidance: None,
        schedule: None,
        state: Vec::new(),
        step_input: None,
        branch_input: None,
        precision: None,
        sparse_attention: None,
        plugins: Vec::new(),
    };
    let options = ditc::schedule::first_block_cache::FbcOptions::default();
    let e =
        ditc::schedule::first_block_cache::bake(&mut model, &mut cx, &options, None).unwrap_err();
    assert!(e.to_string().contains("no transformer blocks"), "{e}");
    assert_eq!(model, plain, "a refused model is left as it was");
}

/// diffusers' FirstBlockCache runs of wan-small with classifier-free guidance (`sampling.json`:
/// `fbc_0.05`, `fbc_0.2`; 3 cases; per step a `cond` then an `uncond` call, each with its own cache
/// state, then `u + 5 (c - u)`), sampled by the runtime (passes/fbc-wan-cfg.toml): every per-step,
/// per-branch decision in its trace equals diffusers', except where diffusers' metric lies within 1e-4
/// relative of the threshold (after such a flip, every later decision must obey `metric > threshold`
/// and the latent must stay finite); otherwise the final latent matches diffusers' cached final latent
/// to relative L2 1e-3. Also bounds how far ditc's metric is from diffusers' (1e-4 relative).
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn cfg_decisions_and_latents_match_diffusers() {
    let dir = fixture("wan-small");
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sampling.json")).unwrap()).unwrap();
    let tensors = ditc::tensors::read_safetensors(&dir.join("sampling.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for config in ["fbc_0.05", "fbc_0.2"] {
        let threshold = sampling["configs"][config]["threshold"].as_f64().unwrap();
        let manifest = convert_with(
            &cfg_recipe(),
            &dir,
            &tmp.path().join(config),
            &[format!("broadcast-adaptive.threshold={threshold:?}")],
        );
        let bundle = Bundle::open(&manifest).unwrap();
        let cases = sampling["decisions"][config].as_object().unwrap().len();
        for case in 0..cases {
            let label = format!("{config} case {case}");
            let inputs = common::case(&tensors, case);
            let noise = common::named(&inputs, "noise").clone();
            let (latent, report) = sample(&bundle, &noise, &inputs, false, false).unwrap();
            let latent = latent.to_f32_vec().unwrap();
            let want = common::named(&tensors, &format!("{case}.{config}.final"))
                .to_f32_vec()
                .unwrap();
            let mut flipped = false;
            let mut worst_metric = 0.0f64;
            let mut computed = Vec::new();
            for branch in [Branch::Cond, Branch::Uncond] {
                let name = branch.as_str();
                let recorded = |key: &str| -> Vec<serde_json::Value> {
                    sampling[key][config][case.to_string()][name]
                        .as_array()
                        .unwrap()
                        .clone()
                };
                let want_decisions: Vec<bool> = recorded("decisions")
                    .iter()
                    .map(|d| d.as_bool().unwrap())
                    .collect();
                let want_metrics: Vec<f64> = recorded("fbc_metrics")
                    .iter()
                    .map(|m| m.as_f64().unwrap())
                    .collect();
                let calls: Vec<&ditc::runtime::sampling::TraceCall> =
                    report.trace.iter().map(|s| &s.branches[&branch]).collect();
                let got: Vec<bool> = calls.iter().map(|c| c.computed).collect();
                let metric = |k: usize| calls[k].metric.expect("a metric after the first call");
                computed.push(got.iter().filter(|&&c| c).count());
                let first_flip = (0..got.len()).find(|&k| got[k] != want_decisions[k]);
                for k in 1..first_flip.unwrap_or(got.len()) {
                    let want = want_metrics[k - 1];
                    worst_metric = worst_metric.max((metric(k) - want).abs() / want);
                }
                let Some(k) = first_flip else { continue };
                assert!(k > 0, "{label} {name}: the first call must compute");
                let diffusers_metric = want_metrics[k - 1];
                assert!(
                    (diffusers_metric - threshold).abs() <= 1e-4 * threshold,
                    "{label} {name}: step {k} decided {} where diffusers decided {} (its metric {diffusers_metric}, ditc's {})",
                    got[k],
                    want_decisions[k],
                    metric(k)
                );
                for (j, &decided) in got.iter().enumerate().skip(k + 1) {
                    assert_eq!(
                        decided,
                        metric(j) > threshold,
                        "{label} {name}: step {j} does not obey the rule after the flip at {k}"
                    );
                }
                flipped = true;
            }
            let f = compare(&latent, &want);
            eprintln!(
                "{label}: computed {}+{} of 100 calls; metric max relative difference from diffusers {worst_metric:.2e}; final latent rel-L2 {:.2e}{}",
                computed[0],
                computed[1],
                f.rel_l2,
                if flipped { " (a near-threshold flip: finiteness only)" } else { "" }
            );
            if flipped {
                assert!(latent.iter().all(|v| v.is_finite()), "{label}");
            } else {
                assert!(f.rel_l2 <= 1e-3, "{label}: rel-L2 {}", f.rel_l2);
            }
            assert!(
                worst_metric <= 1e-4,
                "{label}: metric differs by {worst_metric}"
            );
        }
    }
}
