//! W8A8 quantization: the Q/DQ structure on a hand-made graph, and tract's result against a fake-quant
//! computation written out here.

mod common;

use std::path::Path;

use ditc::analysis::analyse;
use ditc::ir::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use ditc::passes::{create, run_pipeline, PassContext};
use ditc::runtime::run_once;

const W: [f32; 6] = [0.5, -1.27, 0.03, -0.25, 0.8, 0.0]; // [2, 3]: column absmax 0.5, 1.27, 0.03

fn model() -> Model {
    let graph = Graph {
        inputs: vec![ValueInfo::tensor(
            "x",
            DataType::F32,
            vec![Dim::Value(4), Dim::Value(2)],
        )],
        outputs: vec![ValueInfo::tensor(
            "y",
            DataType::F32,
            vec![Dim::Value(4), Dim::Value(3)],
        )],
        initializers: vec![Tensor::from_f32("w", vec![2, 3], &W)],
        nodes: vec![Node::new("layer.mm", "MatMul", &["x", "w"], &["y"])],
        ..Graph::default()
    };
    Model::new(graph, 17)
}

/// Run `quantize-w8a8` on `m` with these calibration stats (JSON) and extra options.
fn quantize(m: &mut Model, stats_json: &str, extra: &[(&str, toml::Value)]) -> PassContext {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    std::fs::write(&stats, stats_json).unwrap();
    let mut options = toml::Table::new();
    options.insert(
        "calibration_stats".into(),
        stats.display().to_string().into(),
    );
    for (k, v) in extra {
        options.insert(k.to_string(), v.clone());
    }
    let pass = create("quantize-w8a8", &options).unwrap();
    let mut cx = PassContext {
        dit_map: analyse(m),
        sampler: None,
        guidance: None,
        schedule: None,
        state: vec![],
        step_input: None,
        branch_input: None,
        precision: None,
        sparse_attention: None,
        plugins: Vec::new(),
    };
    run_pipeline(m, &[pass], &mut cx).unwrap();
    cx
}

const X_STATS: &str =
    r#"{"format":"ditc-calibration","version":1,"method":"max","tensors":{"x":{"amax":2.54}}}"#;

fn layer() -> (&'static str, toml::Value) {
    ("include", toml::Value::Array(vec!["layer.".into()]))
}

fn quantized() -> (Model, PassContext) {
    let mut m = model();
    let cx = quantize(&mut m, X_STATS, &[layer()]);
    (m, cx)
}

#[test]
fn qdq_structure_and_scales() {
    let (m, cx) = quantized();
    let g = &m.graph;
    let node = |op: &str| {
        g.nodes
            .iter()
            .filter(|n| n.op_type == op)
            .collect::<Vec<_>>()
    };
    assert_eq!(node("QuantizeLinear").len(), 1);
    assert_eq!(node("DequantizeLinear").len(), 2);
    // Weight: INT8 initializer, per-channel scale along the output axis 1, zero points 0.
    let w_dq = node("DequantizeLinear")
        .into_iter()
        .find(|n| n.inputs[0] == "w.int8")
        .unwrap();
    assert_eq!(w_dq.attr("axis"), Some(&AttrValue::Int(1)));
    let q = g.initializer("w.int8").unwrap();
    assert_eq!(q.dtype, DataType::I8);
    let scales = g.initializer("w.scale").unwrap().to_f32_vec().unwrap();
    let want = [0.5 / 127.0, 1.27 / 127.0, 0.03 / 127.0];
    for (s, w) in scales.iter().zip(want) {
        assert!((s - w).abs() < 1e-9, "{scales:?}");
    }
    let zero = g.initializer("w.zero").unwrap();
    assert_eq!(
        (zero.dtype, zero.to_i64_vec().unwrap()),
        (DataType::I8, vec![0, 0, 0])
    );
    let int8: Vec<i64> = q.to_i64_vec().unwrap();
    assert_eq!(int8, vec![127, -127, 127, -64, 80, 0]); // round(W / scale) per column
    assert!(g.initializer("w").is_none(), "the float weight is gone");
    // Activation: static per-tensor scale amax/127 = 0.02, int8 zero point 0.
    assert!((g.initializer("x.act_scale").unwrap().to_f32_vec().unwrap()[0] - 0.02).abs() < 1e-9);
    let az = g.initializer("x.act_zero").unwrap();
    assert_eq!((az.dtype, az.dims.len()), (DataType::I8, 0));
    assert_eq!(
        g.nodes
            .iter()
            .find(|n| n.name == "layer.mm")
            .unwrap()
            .inputs,
        vec!["x.dq", "w.dq"]
    );
    let p = cx.precision.unwrap();
    assert_eq!(p.quantized.len(), 1);
}

#[test]
fn tract_equals_hand_written_fake_quant() {
    let (m, _) = quantized();
    let x: Vec<f32> = vec![0.013, -2.6, 1.0, 0.499, -0.31, 2.54, 0.0, -0.01];
    let out = run_once(&m, &[Tensor::from_f32("x", vec![4, 2], &x)]).unwrap();
    let got = out[0].to_f32_vec().unwrap();
    let sx = 2.54f32 / 127.0;
    let xq: Vec<f32> = x
        .iter()
        .map(|v| (v / sx).round_ties_even().clamp(-128.0, 127.0) * sx)
        .collect();
    let sw = [0.5f32 / 127.0, 1.27 / 127.0, 0.03 / 127.0];
    let wq: Vec<f32> = W
        .iter()
        .enumerate()
        .map(|(i, v)| (v / sw[i % 3]).round_ties_even().clamp(-127.0, 127.0) * sw[i % 3])
        .collect();
    for r in 0..4 {
        for c in 0..3 {
            let want = xq[r * 2] * wq[c] + xq[r * 2 + 1] * wq[3 + c];
            let g = got[r * 3 + c];
            assert!(
                (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                "y[{r},{c}] = {g}, fake-quant {want}"
            );
        }
    }
    // -2.6 saturates at -128 * sx: quantization is really applied.
    assert!((xq[1] + 128.0 * sx).abs() < 1e-7);
}

/// One W8A8 configuration of the latte-tiny trajectory test and the bounds it must meet.
struct W8a8Case {
    label: &'static str,
    recipe: &'static str,
    args: &'static [&'static str],
    format: &'static str,
    min_psnr_db: f64,
    min_cosine: f64,
    /// Where the README row states a relative L2 error.
    max_rel_l2: Option<f64>,
}

/// Count the nodes of one op type in a graph file, If branches included.
fn count_ops(graph: &Path, op: &str) -> usize {
    fn count(g: &Graph, op: &str) -> usize {
        g.nodes
            .iter()
            .map(|n| {
                usize::from(n.op_type == op) + n.subgraphs().map(|s| count(s, op)).sum::<usize>()
            })
            .sum()
    }
    count(&ditc::onnx::read_model(graph).unwrap().graph, op)
}

/// latte-tiny W8A8: calibrated on cases 1 and 2, evaluated on the held-out case 0 over the 50-step DDIM
/// trajectory against the float model, for INT8 (`--target ampere`), FP8 (the default target, hopper),
/// SmoothQuant, and W8A8 + PAB through the same runtime. The bounds are the README's rows.
#[test]
fn latte_w8a8_over_a_sampling_trajectory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = root.join("examples/latte-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let ditc = common::ditc_ok;
    let model = demo.join("model.onnx");
    let inputs = demo.join("sampling.safetensors");
    let (m, i, s) = (
        model.to_str().unwrap(),
        inputs.to_str().unwrap(),
        stats.to_str().unwrap(),
    );
    ditc(&[
        "calibrate",
        m,
        "--recipe",
        root.join("passes/w8a8.toml").to_str().unwrap(),
        "--inputs",
        i,
        "--cases",
        "1,2",
        "-o",
        s,
        "--no-progress",
    ]);
    let cases = [
        W8a8Case {
            label: "int8",
            recipe: "passes/w8a8.toml",
            args: &["--target", "ampere"],
            format: "w8a8-int8",
            min_psnr_db: 50.0,
            min_cosine: 0.998,
            max_rel_l2: Some(0.06),
        },
        W8a8Case {
            label: "fp8 (default target hopper)",
            recipe: "passes/w8a8.toml",
            args: &[],
            format: "w8a8-fp8-e4m3",
            min_psnr_db: 45.0,
            min_cosine: 0.994,
            max_rel_l2: None,
        },
        W8a8Case {
            label: "int8 + SmoothQuant 0.5",
            recipe: "passes/w8a8.toml",
            args: &[
                "--target",
                "ampere",
                "--set",
                "quantize-w8a8.smooth_quant_alpha=0.5",
            ],
            format: "w8a8-int8",
            min_psnr_db: 45.0,
            min_cosine: 0.995,
            max_rel_l2: None,
        },
        W8a8Case {
            // No --target: SmoothQuant is INT8 only, so INT8 even for the default (FP8) target.
            label: "int8 + SmoothQuant 0.8",
            recipe: "passes/w8a8.toml",
            args: &["--set", "quantize-w8a8.smooth_quant_alpha=0.8"],
            format: "w8a8-int8",
            min_psnr_db: 40.0,
            min_cosine: 0.99,
            max_rel_l2: None,
        },
        W8a8Case {
            label: "int8 + PAB",
            recipe: "passes/pab-w8a8.toml",
            args: &["--target", "ampere"],
            format: "w8a8-int8",
            min_psnr_db: 45.0,
            min_cosine: 0.995,
            max_rel_l2: None,
        },
    ];
    for case in &cases {
        let out = tmp
            .path()
            .join(case.label.replace([' ', '(', ')', '+', '.'], "_"));
        let o = out.to_str().unwrap();
        let recipe = root.join(case.recipe);
        let mut args = vec![
            "convert",
            m,
            "--recipe",
            recipe.to_str().unwrap(),
            "--calibration-stats",
            s,
            "-o",
            o,
            "--no-progress",
        ];
        args.extend_from_slice(case.args);
        ditc(&args);
        // The emitted graph conforms to TensorRT's rules (convert checked it too).
        let graph = out.join("model.onnx");
        for target in ["trt10", "trt11"] {
            ditc(&["lint", graph.to_str().unwrap(), "--target", target]);
        }
        // Q/DQ by structure: 64 layers (4 projections x 12 sites + 2 linears x 8 FFNs) each get a weight
        // DequantizeLinear. Activations are quantized once per value: per self-attention site one for
        // Q/K/V (same input) and one for the output projection (8 sites -> 16); per cross-attention site
        // one for Q and one for the output projection (4 sites -> 8), plus ONE for K/V of all four (they
        // read the same caption embedding); per FFN two (8 -> 16). 41 activation Q/DQ pairs.
        let smooth = case.label.contains("SmoothQuant");
        let (q, dq) = (
            count_ops(&graph, "QuantizeLinear"),
            count_ops(&graph, "DequantizeLinear"),
        );
        assert_eq!(
            (q, dq),
            (41, 41 + 64),
            "{}: QuantizeLinear, DequantizeLinear",
            case.label
        );
        assert_eq!(
            count_ops(&graph, "Mul") - count_ops(&model, "Mul"),
            if smooth { 41 } else { 0 },
            "{}: one SmoothQuant Mul per quantized activation",
            case.label
        );
        let manifest = out.join("manifest.json");
        let sample = out.join("sample.safetensors");
        let report: serde_json::Value = serde_json::from_slice(&ditc(&[
            "run",
            manifest.to_str().unwrap(),
            "--inputs",
            i,
            "--prefix",
            "0.",
            "-o",
            sample.to_str().unwrap(),
            "--compare-full",
            "--json",
        ]))
        .unwrap();
        let f = &report["fidelity"];
        let (psnr, cosine) = (
            f["psnr_db"].as_f64().unwrap(),
            f["cosine"].as_f64().unwrap(),
        );
        eprintln!(
            "{}: PSNR {psnr:.2} dB, cosine {cosine:.5}, rel L2 {:.4}",
            case.label, f["rel_l2"]
        );
        assert!(
            psnr >= case.min_psnr_db && cosine >= case.min_cosine && cosine < 1.0 - 1e-7,
            "{}: {f} (bounds PSNR >= {}, cosine >= {}; exactly 1 would mean nothing was quantized)",
            case.label,
            case.min_psnr_db,
            case.min_cosine
        );
        if let Some(max) = case.max_rel_l2 {
            let rel_l2 = f["rel_l2"].as_f64().unwrap();
            assert!(
                rel_l2 <= max,
                "{}: rel L2 {rel_l2} (bound {max})",
                case.label
            );
        }
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        assert_eq!(m["precision"]["format"], case.format, "{}", case.label);
        assert_eq!(m["precision"]["quantized"].as_array().unwrap().len(), 64);
    }
}

/// FP8 needs Ada or newer: an FP8 request for an Ampere target is refused before anything is written,
/// and the lint flags an FP8 graph for Ampere.
#[test]
fn fp8_is_refused_for_ampere() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    std::fs::write(&stats, X_STATS).unwrap();
    let out = tmp.path().join("out");
    common::assert_refused(
        &[
            "convert",
            root.join("examples/latte-tiny/model.onnx")
                .to_str()
                .unwrap(),
            "--recipe",
            root.join("passes/w8a8.toml").to_str().unwrap(),
            "--calibration-stats",
            stats.to_str().unwrap(),
            "--target",
            "ampere",
            "--set",
            "quantize-w8a8.format=\"fp8\"",
            "-o",
            out.to_str().unwrap(),
        ],
        &[
            "--target ampere has no FP8 tensor cores",
            "quantize-w8a8.format",
        ],
    );
    assert!(!out.exists());
    let mut m = model();
    quantize(&mut m, X_STATS, &[layer(), ("format", "fp8".into())]);
    let v = ditc::lint::lint_gpu(&m, ditc::target::Gpu::Ampere);
    assert_eq!(
        v.len(),
        3,
        "the weight's DQ and the activation's Q and DQ: {v:?}"
    );
    assert!(v.iter().all(|v| v.rule == "gpu-fp8"));
    assert!(ditc::lint::lint_gpu(&m, ditc::target::Gpu::Hopper).is_empty());
}

/// Sensitivity ranking and the fidelity budget: with the budget met on the calibration case, the
/// held-out case 0 reaches PSNR >= 30 dB and cosine >= 0.999 against the float model.
#[test]
fn sensitivity_budget_meets_the_fidelity_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = root.join("examples/latte-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let ditc = common::ditc_ok;
    let (model, inputs, recipe) = (
        demo.join("model.onnx"),
        demo.join("sampling.safetensors"),
        root.join("passes/w8a8.toml"),
    );
    let (m, i, r, s) = (
        model.to_str().unwrap(),
        inputs.to_str().unwrap(),
        recipe.to_str().unwrap(),
        stats.to_str().unwrap(),
    );
    ditc(&[
        "calibrate",
        m,
        "--recipe",
        r,
        "--inputs",
        i,
        "--cases",
        "1,2",
        "--sensitivity",
        "--target",
        "ampere",
        "-o",
        s,
        "--no-progress",
    ]);
    let table: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let ranked: Vec<f64> = table["sensitivity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["rel_l2"].as_f64().unwrap())
        .collect();
    assert_eq!(ranked.len(), 64);
    assert!(
        ranked.windows(2).all(|w| w[0] >= w[1]),
        "most sensitive first"
    );
    let budget = table["budget"].as_array().unwrap();
    let all_float = budget.last().unwrap();
    assert_eq!(all_float["keep_float"].as_array().unwrap().len(), 64);
    assert!(
        (all_float["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "nothing quantized is the float model"
    );

    let out = tmp.path().join("bundle");
    let o = out.to_str().unwrap();
    ditc(&[
        "convert",
        m,
        "--recipe",
        r,
        "--calibration-stats",
        s,
        "--set",
        "quantize-w8a8.budget_psnr=30",
        "--set",
        "quantize-w8a8.budget_cosine=0.999",
        "--target",
        "ampere",
        "-o",
        o,
        "--no-progress",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let kept = manifest["precision"]["excluded"].as_array().unwrap().len();
    // The budget is met by a measurement, and by the fewest layers: the measured point with `kept`
    // float layers meets it, every point with fewer misses it, and something is still quantized.
    assert!(
        (1..64).contains(&kept),
        "the budget kept {kept} of 64 layers in float (all-INT8 misses cosine 0.999 on this model; all-float is no quantization)"
    );
    let meets = |b: &serde_json::Value| {
        b["psnr_db"].as_f64().unwrap() >= 30.0 && b["cosine"].as_f64().unwrap() >= 0.999
    };
    let chosen = budget
        .iter()
        .find(|b| b["keep_float"].as_array().unwrap().len() == kept)
        .expect("the kept count is a measured point of the budget table");
    assert!(meets(chosen), "{chosen}");
    for b in budget
        .iter()
        .filter(|b| b["keep_float"].as_array().unwrap().len() < kept)
    {
        assert!(!meets(b), "a smaller set already met the budget: {b}");
    }
    assert_eq!(
        manifest["precision"]["quantized"].as_array().unwrap().len(),
        64 - kept
    );
    let sample = out.join("sample.safetensors");
    let report: serde_json::Value = serde_json::from_slice(&ditc(&[
        "run",
        out.join("manifest.json").to_str().unwrap(),
        "--inputs",
        i,
        "--prefix",
        "0.",
        "-o",
        sample.to_str().unwrap(),
        "--compare-full",
        "--json",
    ]))
    .unwrap();
    let f = &report["fidelity"];
    eprintln!(
        "budget kept {kept} layers in float ({}); held-out case 0: PSNR {} dB, cosine {}",
        manifest["precision"]["excluded"], f["psnr_db"], f["cosine"]
    );
    assert!(
        f["psnr_db"].as_f64().unwrap() >= 30.0 && f["cosine"].as_f64().unwrap() >= 0.999,
        "{f}"
    );
}

/// SmoothQuant: s_j = amax_j^a / max|W_j|^(1-a) per input channel; x / s is quantized per tensor and
/// diag(s) W per output channel. tract's result equals that computation written out here.
#[test]
fn smooth_quant_equals_hand_written_computation() {
    let (a0, a1) = (2.54f32, 0.4f32);
    let stats = format!(
        r#"{{"format":"ditc-calibration","version":1,"method":"max","tensors":{{"x":{{"amax":{a0},"channel_amax":[{a0},{a1}]}}}}}}"#
    );
    let mut m = model();
    quantize(
        &mut m,
        &stats,
        &[layer(), ("smooth_quant_alpha", 0.8.into())],
    );
    assert_eq!(
        m.graph.nodes.iter().filter(|n| n.op_type == "Mul").count(),
        1,
        "one inserted Mul"
    );

    let alpha = 0.8f64;
    // Rows of W[2, 3] are the input channels.
    let w_row_max = [0.5f32.max(1.27).max(0.03), 0.25f32.max(0.8).max(0.0)];
    let s: Vec<f32> = [(w_row_max[0], a0), (w_row_max[1], a1)]
        .iter()
        .map(|&(w, a)| {
            ((a as f64).powf(alpha) / (w as f64).powf(1.0 - alpha)).clamp(1e-4, 1e4) as f32
        })
        .collect();
    assert!(
        s[0] > s[1],
        "the wider activation channel is divided by more"
    );
    let ws: Vec<f32> = W.iter().enumerate().map(|(i, w)| w * s[i / 3]).collect();
    let mut sw = [0f32; 3];
    for (i, w) in ws.iter().enumerate() {
        sw[i % 3] = sw[i % 3].max(w.abs());
    }
    let sw: Vec<f32> = sw.iter().map(|m| m / 127.0).collect();
    let sx = (a0 / s[0]).max(a1 / s[1]) / 127.0;
    let x: Vec<f32> = vec![0.013, -0.3, 1.0, 0.399, -2.31, 0.1, 2.54, -0.01];
    let out = run_once(&m, &[Tensor::from_f32("x", vec![4, 2], &x)]).unwrap();
    let got = out[0].to_f32_vec().unwrap();
    let fq = |v: f32, s: f32, lo: f32| (v / s).round_ties_even().clamp(lo, 127.0) * s;
    for r in 0..4 {
        for c in 0..3 {
            let want: f32 = (0..2)
                .map(|j| {
                    fq(x[r * 2 + j] * (1.0 / s[j]), sx, -128.0) * fq(ws[j * 3 + c], sw[c], -127.0)
                })
                .sum();
            let g = got[r * 3 + c];
            assert!(
                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                "y[{r},{c}] = {g}, expected {want}"
            );
        }
    }
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), so the outlier tests need no random crate.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// x [rows, k] @ w [k, n] with activation channel 3 scaled by `outlier`; the stats measured from x.
fn outlier_layer(outlier: f32) -> (Model, Vec<f32>, String) {
    let (rows, k, n) = (64usize, 16usize, 24usize);
    let mut x = pseudo_random(rows * k, 7);
    for r in 0..rows {
        x[r * k + 3] *= outlier;
    }
    let w = pseudo_random(k * n, 11);
    let graph = Graph {
        inputs: vec![ValueInfo::tensor(
            "x",
            DataType::F32,
            vec![Dim::Value(rows as i64), Dim::Value(k as i64)],
        )],
        outputs: vec![ValueInfo::tensor(
            "y",
            DataType::F32,
            vec![Dim::Value(rows as i64), Dim::Value(n as i64)],
        )],
        initializers: vec![Tensor::from_f32("w", vec![k as i64, n as i64], &w)],
        nodes: vec![Node::new("layer.mm", "MatMul", &["x", "w"], &["y"])],
        ..Graph::default()
    };
    let channel_amax: Vec<f32> = (0..k)
        .map(|j| (0..rows).map(|r| x[r * k + j].abs()).fold(0f32, f32::max))
        .collect();
    let amax = channel_amax.iter().copied().fold(0f32, f32::max);
    let stats = serde_json::json!({
        "format": "ditc-calibration", "version": 1, "method": "max",
        "tensors": { "x": { "amax": amax, "channel_amax": channel_amax } }
    });
    (Model::new(graph, 17), x, stats.to_string())
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Before any quantization, SmoothQuant's rewrite is an identity: (X / s)(diag(s) W) = X W.
#[test]
fn smooth_quant_rewrite_is_a_float_identity() {
    let (mut m, x, stats) = outlier_layer(80.0);
    let input = Tensor::from_f32("x", vec![64, 16], &x);
    let before = run_once(&m, std::slice::from_ref(&input)).unwrap()[0]
        .to_f32_vec()
        .unwrap();
    let stats: ditc::calibration::CalibrationStats = serde_json::from_str(&stats).unwrap();
    let target = ditc::passes::quantize_w8a8::Target {
        node: "layer.mm".into(),
        activation: "x".into(),
        weight: "w".into(),
        axis: 1,
        block: None,
    };
    let (retargeted, _) =
        ditc::passes::smooth_quant::apply(&mut m, &[target], &stats, 0.5).unwrap();
    // Wire the smoothed activation and weight into the layer, as quantize-w8a8 does, without Q/DQ.
    let mm = m
        .graph
        .nodes
        .iter_mut()
        .find(|n| n.name == "layer.mm")
        .unwrap();
    mm.inputs = vec![
        retargeted[0].activation.clone(),
        retargeted[0].weight.clone(),
    ];
    assert_ne!(retargeted[0].weight, "w", "a smoothed copy of the weight");
    let after = run_once(&m, &[input]).unwrap()[0].to_f32_vec().unwrap();
    let err = relative_l2(&after, &before);
    eprintln!("SmoothQuant float identity: relative L2 {err:.2e}");
    assert!(err <= 1e-6, "relative L2 {err}");
}

/// One activation channel 80x the others: per-tensor INT8 spends its range on it, and SmoothQuant
/// (alpha 0.5) must cut the error of the quantized layer against the float layer (measured).
#[test]
fn smooth_quant_reduces_int8_error_on_an_outlier_channel() {
    let (float_model, x, stats) = outlier_layer(80.0);
    let input = Tensor::from_f32("x", vec![64, 16], &x);
    let run = |m: &Model| {
        run_once(m, std::slice::from_ref(&input)).unwrap()[0]
            .to_f32_vec()
            .unwrap()
    };
    let reference = run(&float_model);
    let mut plain = float_model.clone();
    quantize(&mut plain, &stats, &[layer()]);
    let mut smoothed = float_model.clone();
    quantize(
        &mut smoothed,
        &stats,
        &[layer(), ("smooth_quant_alpha", 0.5.into())],
    );
    let (e_plain, e_smooth) = (
        relative_l2(&run(&plain), &reference),
        relative_l2(&run(&smoothed), &reference),
    );
    eprintln!(
        "outlier channel x80: W8A8 relative L2 {e_plain:.3e}, with SmoothQuant {e_smooth:.3e}"
    );
    assert!(
        e_plain > 1e-3,
        "the outlier must hurt plain W8A8 ({e_plain})"
    );
    assert!(
        e_smooth < 0.5 * e_plain,
        "SmoothQuant {e_smooth} vs plain {e_plain}"
    );
}

/// FP8 E4M3: per-tensor Q/DQ at opset 19. tract has no FLOAT8, so ditc runs the graph through an
/// op-level emulation; its result must equal the bit-level E4M3 rounding implemented separately.
#[test]
fn fp8_emulation_equals_bit_level_rounding() {
    let mut m = model();
    quantize(&mut m, X_STATS, &[layer(), ("format", "fp8".into())]);
    assert_eq!(m.default_opset(), 19);
    assert_eq!(
        m.graph.initializer("w.fp8").unwrap().dtype,
        DataType::F8E4M3FN
    );
    assert_eq!(
        m.graph.initializer("x.act_zero").unwrap().dtype,
        DataType::F8E4M3FN
    );
    assert!(ditc::lint::lint(&m, ditc::lint::Target::Trt10, None).is_empty());

    // Values around every binade, ties, subnormals and saturation (x / sx reaches 448 at 2.54).
    let x: Vec<f32> = vec![0.013, -2.6, 1.0, 0.499, -0.31, 2.54, 1e-4, -0.0101];
    let out = run_once(&m, &[Tensor::from_f32("x", vec![4, 2], &x)]).unwrap();
    let got = out[0].to_f32_vec().unwrap();
    let sx = 2.54f32 / 448.0;
    let sw = 1.27f32 / 448.0;
    let q = |v: f32, s: f32| ditc::fp8::round_e4m3(v / s) * s;
    for r in 0..4 {
        for c in 0..3 {
            let want = q(x[r * 2], sx) * q(W[c], sw) + q(x[r * 2 + 1], sx) * q(W[3 + c], sw);
            let g = got[r * 3 + c];
            assert!(
                (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                "y[{r},{c}] = {g}, E4M3 {want}"
            );
        }
    }
}

/// The op-level FP8 emulation agrees with bit-level E4M3 rounding on every representable value, every
/// midpoint between neighbours (ties to even), beyond-range values (saturation) and zero.
#[test]
fn fp8_emulation_is_exact_on_all_values_and_ties() {
    let mut values: Vec<f32> = (0..=0x7Eu8).map(ditc::fp8::decode).collect();
    let mids: Vec<f32> = values.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    values.extend(mids);
    values.extend([449.0, 470.0, 1e6, 3e-4]);
    let negatives: Vec<f32> = values.iter().map(|v| -v).collect();
    values.extend(negatives);
    let n = values.len() as i64;
    let zero = Tensor::from_raw(
        "z",
        DataType::F8E4M3FN,
        vec![],
        bytes::Bytes::from(vec![0u8]),
    )
    .unwrap();
    let mut m = model();
    m.opsets = vec![(String::new(), 19)];
    m.graph.inputs = vec![ValueInfo::tensor("x", DataType::F32, vec![Dim::Value(n)])];
    m.graph.outputs = vec![ValueInfo::tensor("y", DataType::F32, vec![Dim::Value(n)])];
    m.graph.initializers = vec![Tensor::from_f32("s", vec![], &[1.0]), zero];
    m.graph.nodes = vec![
        Node::new("q", "QuantizeLinear", &["x", "s", "z"], &["xq"]),
        Node::new("dq", "DequantizeLinear", &["xq", "s", "z"], &["y"]),
    ];
    let out = run_once(&m, &[Tensor::from_f32("x", vec![n], &values)]).unwrap();
    for (x, y) in values.iter().zip(out[0].to_f32_vec().unwrap()) {
        assert_eq!(y, ditc::fp8::round_e4m3(*x), "x = {x}");
    }
}

/// Conv layers (when included) get per-output-channel INT8 weights on axis 0; tract equals a
/// fake-quant convolution written out here.
#[test]
fn conv_weights_per_output_channel() {
    let w: Vec<f32> = (0..24)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / (3.0 + (i / 8) as f32))
        .collect(); // [3, 2, 2, 2]
    let mut m = model();
    m.graph.inputs = vec![ValueInfo::tensor(
        "x",
        DataType::F32,
        [1, 2, 4, 4].iter().map(|&d| Dim::Value(d)).collect(),
    )];
    m.graph.outputs = vec![ValueInfo::tensor("y", DataType::F32, vec![])];
    m.graph.initializers = vec![Tensor::from_f32("cw", vec![3, 2, 2, 2], &w)];
    m.graph.nodes = vec![Node::new("patch.conv", "Conv", &["x", "cw"], &["y"])];
    let stats =
        r#"{"format":"ditc-calibration","version":1,"method":"max","tensors":{"x":{"amax":1.5}}}"#;
    quantize(
        &mut m,
        stats,
        &[("include", toml::Value::Array(vec!["patch.".into()]))],
    );
    let dq = m
        .graph
        .nodes
        .iter()
        .find(|n| n.inputs.first().is_some_and(|i| i == "cw.int8"))
        .unwrap();
    assert_eq!(dq.attr("axis"), Some(&AttrValue::Int(0)));
    assert_eq!(m.graph.initializer("cw.scale").unwrap().dims, vec![3]);

    let x: Vec<f32> = (0..32).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
    let out = run_once(&m, &[Tensor::from_f32("x", vec![1, 2, 4, 4], &x)]).unwrap();
    let got = out[0].to_f32_vec().unwrap();
    let sx = 1.5f32 / 127.0;
    let xq: Vec<f32> = x
        .iter()
        .map(|v| (v / sx).round_ties_even().clamp(-128.0, 127.0) * sx)
        .collect();
    let sw: Vec<f32> = (0..3)
        .map(|o| w[o * 8..o * 8 + 8].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0)
        .collect();
    let wq: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / sw[i / 8]).round_ties_even() * sw[i / 8])
        .collect();
    for o in 0..3 {
        for r in 0..3 {
            for c in 0..3 {
                let mut want = 0f32;
                for ci in 0..2 {
                    for kr in 0..2 {
                        for kc in 0..2 {
                            want += xq[ci * 16 + (r + kr) * 4 + c + kc]
                                * wq[o * 8 + ci * 4 + kr * 2 + kc];
                        }
                    }
                }
                let g = got[o * 9 + r * 3 + c];
                assert!(
                    (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "y[{o},{r},{c}] = {g}, expected {want}"
                );
            }
        }
    }
}

/// Per-channel ranges of another width than the weights' input channels are refused (they used to
/// pass when shorter, and the inserted Mul then had the wrong length).
#[test]
fn smooth_quant_refuses_channel_ranges_of_the_wrong_width() {
    let mut m = model();
    let stats: ditc::calibration::CalibrationStats = serde_json::from_str(
        r#"{"format":"ditc-calibration","version":1,"method":"max","tensors":{"x":{"amax":2.0,"channel_amax":[2.0]}}}"#,
    )
    .unwrap();
    let target = ditc::passes::quantize_w8a8::Target {
        node: "layer.mm".into(),
        activation: "x".into(),
        weight: "w".into(),
        axis: 1,
        block: None,
    };
    let e = ditc::passes::smooth_quant::apply(&mut m, &[target], &stats, 0.5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 calibrated channels") && e.contains("'w' has 2 input channels"),
        "{e}"
    );
}
