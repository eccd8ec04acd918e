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
        schedule: None,
        state: vec![],
        step_input: None,
        precision: None,
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

/// latte-tiny W8A8: calibrated on cases 1 and 2, evaluated on case 0 over the 50-step DDIM trajectory
/// against the float model; then combined with PAB through the same runtime.
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
    for recipe in ["passes/w8a8.toml", "passes/pab-w8a8.toml"] {
        let out = tmp.path().join(recipe.replace('/', "_"));
        let o = out.to_str().unwrap();
        ditc(&[
            "convert",
            m,
            "--recipe",
            root.join(recipe).to_str().unwrap(),
            "--calibration-stats",
            s,
            "-o",
            o,
            "--no-progress",
        ]);
        // The emitted graph conforms to TensorRT's rules (convert checked it too).
        let graph = out.join("model.onnx");
        for target in ["trt10", "trt11"] {
            ditc(&["lint", graph.to_str().unwrap(), "--target", target]);
        }
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
        eprintln!(
            "{recipe}: PSNR {} dB, cosine {}, rel L2 {}",
            f["psnr_db"], f["cosine"], f["rel_l2"]
        );
        assert!(f["psnr_db"].as_f64().unwrap() >= 30.0, "{recipe}: {f}");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        assert_eq!(
            m["precision"]["quantized"].as_array().unwrap().len(),
            64,
            "4 projections x 12 sites + 2 linear layers x 8 FFNs"
        );
    }
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
        "-o",
        o,
        "--no-progress",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let kept = manifest["precision"]["excluded"].as_array().unwrap().len();
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
        "budget kept {kept} layers in float; held-out case 0: PSNR {} dB, cosine {}",
        f["psnr_db"], f["cosine"]
    );
    assert!(
        f["psnr_db"].as_f64().unwrap() >= 30.0 && f["cosine"].as_f64().unwrap() >= 0.999,
        "{f}"
    );
}

/// SmoothQuant: s_j = max|W_j|^(1-a) / amax_j^a per input channel; x / s is quantized per tensor and
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
            ((w as f64).powf(1.0 - alpha) / (a as f64).powf(alpha)).clamp(1e-4, 1e4) as f32
        })
        .collect();
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
