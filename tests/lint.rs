//! The TensorRT lint: one hand-made violating graph per rule, and conforming graphs pass.

use bytes::Bytes;
use ditc::ir::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use ditc::lint::{lint, Target};

fn model(nodes: Vec<Node>, initializers: Vec<Tensor>, opset: i64) -> Model {
    Model::new(
        Graph {
            inputs: vec![ValueInfo::tensor(
                "x",
                DataType::F32,
                vec![Dim::Value(2), Dim::Value(3)],
            )],
            outputs: vec![ValueInfo::tensor("y", DataType::F32, vec![])],
            initializers,
            nodes,
            ..Graph::default()
        },
        opset,
    )
}

fn i8s(name: &str, dims: Vec<i64>, v: &[i8]) -> Tensor {
    Tensor::from_raw(
        name,
        DataType::I8,
        dims,
        Bytes::from(v.iter().map(|&x| x as u8).collect::<Vec<_>>()),
    )
    .unwrap()
}

fn scalar(name: &str, v: f32) -> Tensor {
    Tensor::from_f32(name, vec![], &[v])
}

/// x -> Q(s, z) -> DQ(s, z) -> y, with the given zero point tensor.
fn qdq(z: Tensor) -> Model {
    let zn = z.name.clone();
    model(
        vec![
            Node::new("q", "QuantizeLinear", &["x", "s", &zn], &["xq"]),
            Node::new("dq", "DequantizeLinear", &["xq", "s", &zn], &["y"]),
        ],
        vec![scalar("s", 0.1), z],
        17,
    )
}

fn rules(m: &Model) -> Vec<(&'static str, String)> {
    lint(m, Target::Trt10, None)
        .into_iter()
        .map(|v| (v.rule, v.node))
        .collect()
}

fn assert_flags(m: &Model, rule: &str, node: &str) {
    let found = rules(m);
    assert!(
        found.iter().any(|(r, n)| *r == rule && n == node),
        "expected {rule} on '{node}', got {found:?}"
    );
}

#[test]
fn a_symmetric_int8_qdq_pair_conforms() {
    assert_eq!(rules(&qdq(i8s("z", vec![], &[0]))), vec![]);
}

#[test]
fn opset_range() {
    assert_flags(
        &model(vec![Node::new("id", "Identity", &["x"], &["y"])], vec![], 8),
        "opset",
        "",
    );
}

#[test]
fn unsupported_ops() {
    let m = model(
        vec![Node::new(
            "dq",
            "DynamicQuantizeLinear",
            &["x"],
            &["y", "s", "z"],
        )],
        vec![],
        17,
    );
    assert_flags(&m, "unsupported-op", "dq");
    let m = model(
        vec![Node::new("mmi", "MatMulInteger", &["x", "x"], &["y"])],
        vec![],
        17,
    );
    assert_flags(&m, "unsupported-op", "mmi");
}

/// x -> Q(sq, zq) -> DQ(sd, zd) -> y: each node has its own scale and zero point, so one bad constant
/// is exactly one violation.
fn qdq_with(sq: Tensor, zq: Tensor, sd: Tensor, zd: Tensor) -> Model {
    let names = [&sq, &zq, &sd, &zd].map(|t| t.name.clone());
    model(
        vec![
            Node::new("q", "QuantizeLinear", &["x", &names[0], &names[1]], &["xq"]),
            Node::new(
                "dq",
                "DequantizeLinear",
                &["xq", &names[2], &names[3]],
                &["y"],
            ),
        ],
        vec![sq, zq, sd, zd],
        17,
    )
}

/// The one violation `m` has; it must be of `rule`, on `node`, and its message must contain `text`.
fn assert_only(m: &Model, rule: &str, node: &str, text: &str) {
    let found = lint(m, Target::Trt10, None);
    assert_eq!(
        found.len(),
        1,
        "expected only {rule} on '{node}': {found:?}"
    );
    let v = &found[0];
    assert_eq!((v.rule, v.node.as_str()), (rule, node), "{v:?}");
    assert!(
        v.message.contains(text),
        "expected '{text}' in: {}",
        v.message
    );
}

fn zero() -> Tensor {
    i8s("zq", vec![], &[0])
}

#[test]
fn separate_good_scales_and_zero_points_conform() {
    let m = qdq_with(
        scalar("sq", 0.1),
        zero(),
        scalar("sd", 1e-30),
        i8s("zd", vec![], &[0]),
    );
    assert_eq!(rules(&m), vec![]);
}

#[test]
fn quantize_zero_points_must_be_zero() {
    let m = qdq_with(
        scalar("sq", 0.1),
        i8s("zq", vec![], &[3]),
        scalar("sd", 0.1),
        i8s("zd", vec![], &[0]),
    );
    assert_only(&m, "qdq-zero-point", "q", "zero point 'zq' is 3:");
}

#[test]
fn dequantize_zero_points_must_be_zero() {
    let m = qdq_with(
        scalar("sq", 0.1),
        zero(),
        scalar("sd", 0.1),
        i8s("zd", vec![], &[-1]),
    );
    assert_only(&m, "qdq-zero-point", "dq", "zero point 'zd' is -1:");
}

#[test]
fn per_channel_zero_points_name_the_first_nonzero_index() {
    let w = weight_dequantize(
        Tensor::from_f32("s", vec![3], &[0.1, 0.2, 0.3]),
        i8s("z", vec![3], &[0, 0, 5]),
    );
    assert_only(
        &w,
        "qdq-zero-point",
        "dqw",
        "zero point 'z' is 5 at index 2 ([2])",
    );
}

#[test]
fn zero_scales_are_refused() {
    let m = qdq_with(
        scalar("sq", 0.0),
        zero(),
        scalar("sd", 0.1),
        i8s("zd", vec![], &[0]),
    );
    assert_only(&m, "qdq-scale", "q", "scale 'sq' is 0:");
}

#[test]
fn negative_scales_are_refused() {
    let m = qdq_with(
        scalar("sq", 0.1),
        zero(),
        scalar("sd", -0.5),
        i8s("zd", vec![], &[0]),
    );
    assert_only(&m, "qdq-scale", "dq", "scale 'sd' is -0.5:");
}

#[test]
fn nan_scales_are_refused() {
    let m = qdq_with(
        scalar("sq", f32::NAN),
        zero(),
        scalar("sd", 0.1),
        i8s("zd", vec![], &[0]),
    );
    assert_only(&m, "qdq-scale", "q", "scale 'sq' is NaN:");
}

#[test]
fn infinite_scales_are_refused() {
    let m = qdq_with(
        scalar("sq", 0.1),
        zero(),
        scalar("sd", f32::INFINITY),
        i8s("zd", vec![], &[0]),
    );
    assert_only(&m, "qdq-scale", "dq", "scale 'sd' is +Inf:");
}

/// An INT8 weight w [3, 3] -> DequantizeLinear(s, z, axis 1) -> MatMul with x.
fn weight_dequantize(s: Tensor, z: Tensor) -> Model {
    model(
        vec![
            Node::new("dqw", "DequantizeLinear", &["w", "s", "z"], &["wd"])
                .with_attr("axis", AttrValue::Int(1)),
            Node::new("mm", "MatMul", &["x", "wd"], &["y"]),
        ],
        vec![s, z, i8s("w", vec![3, 3], &[1; 9])],
        17,
    )
}

#[test]
fn per_channel_scales_name_the_bad_channel() {
    let s = Tensor::from_f32("s", vec![3], &[0.1, 0.2, f32::NEG_INFINITY]);
    let w = weight_dequantize(s, i8s("z", vec![3], &[0, 0, 0]));
    assert_only(&w, "qdq-scale", "dqw", "scale 's' is -Inf at index 2 ([2])");
}

#[test]
fn constant_node_scales_are_checked_too() {
    let m = model(
        vec![
            Node::new("s", "Constant", &[], &["s"])
                .with_attr("value", AttrValue::Tensor(scalar("s", 0.0))),
            Node::new("q", "QuantizeLinear", &["x", "s", "zq"], &["xq"]),
            Node::new("dq", "DequantizeLinear", &["xq", "sd", "zd"], &["y"]),
        ],
        vec![zero(), scalar("sd", 0.1), i8s("zd", vec![], &[0])],
        17,
    );
    assert_only(&m, "qdq-scale", "q", "scale 's' is 0:");
}

#[test]
fn quantized_type_must_be_int8_or_fp8() {
    let z = Tensor::from_raw("z", DataType::U8, vec![], Bytes::from(vec![0u8])).unwrap();
    assert_flags(&qdq(z), "qdq-type", "q");
}

#[test]
fn scales_must_be_static() {
    let m = model(
        vec![
            Node::new("amax", "ReduceMax", &["x"], &["s"]),
            Node::new("q", "QuantizeLinear", &["x", "s", "z"], &["xq"]),
            Node::new("dq", "DequantizeLinear", &["xq", "s", "z"], &["y"]),
        ],
        vec![i8s("z", vec![], &[0])],
        17,
    );
    assert_flags(&m, "qdq-static-scale", "q");
}

#[test]
fn per_channel_scales_only_on_weights() {
    let s = Tensor::from_f32("s", vec![3], &[0.1, 0.2, 0.3]);
    let m = model(
        vec![
            Node::new("q", "QuantizeLinear", &["x", "s", "z"], &["xq"])
                .with_attr("axis", AttrValue::Int(1)),
            Node::new("dq", "DequantizeLinear", &["xq", "s", "z"], &["y"])
                .with_attr("axis", AttrValue::Int(1)),
        ],
        vec![s.clone(), i8s("z", vec![3], &[0, 0, 0])],
        17,
    );
    assert_flags(&m, "qdq-per-channel", "q");
    // The same scale on an INT8 weight initializer is fine.
    let w = model(
        vec![
            Node::new("dqw", "DequantizeLinear", &["w", "s", "z"], &["wd"])
                .with_attr("axis", AttrValue::Int(1)),
            Node::new("mm", "MatMul", &["x", "wd"], &["y"]),
        ],
        vec![
            s,
            i8s("z", vec![3], &[0, 0, 0]),
            i8s("w", vec![3, 3], &[1; 9]),
        ],
        17,
    );
    assert_eq!(rules(&w), vec![]);
}

#[test]
fn no_block_quantization() {
    let mut m = qdq(i8s("z", vec![], &[0]));
    m.graph.nodes[0] = m.graph.nodes[0]
        .clone()
        .with_attr("block_size", AttrValue::Int(32));
    assert_flags(&m, "qdq-block", "q");
}

#[test]
fn quantize_feeds_dequantize() {
    let m = model(
        vec![
            Node::new("q", "QuantizeLinear", &["x", "s", "z"], &["xq"]),
            Node::new("cast", "Cast", &["xq"], &["y"]).with_attr("to", AttrValue::Int(1)),
        ],
        vec![scalar("s", 0.1), i8s("z", vec![], &[0])],
        17,
    );
    assert_flags(&m, "qdq-pair", "q");
}

#[test]
fn if_branch_ranks_and_condition() {
    let branch = |name: &str, dims: Vec<Dim>| Graph {
        name: name.into(),
        nodes: vec![Node::new(
            &format!("{name}_id"),
            "Identity",
            &["x"],
            &[&format!("{name}_out")],
        )],
        outputs: vec![ValueInfo::tensor(
            &format!("{name}_out"),
            DataType::F32,
            dims,
        )],
        ..Graph::default()
    };
    let m = model(
        vec![
            Node::new("cond", "Constant", &[], &["c"]).with_attr(
                "value",
                AttrValue::Tensor(
                    Tensor::from_raw("c", DataType::Bool, vec![1], Bytes::from(vec![1u8])).unwrap(),
                ),
            ),
            Node::new("if", "If", &["c"], &["y"])
                .with_attr(
                    "then_branch",
                    AttrValue::Graph(branch("a", vec![Dim::Value(2), Dim::Value(3)])),
                )
                .with_attr(
                    "else_branch",
                    AttrValue::Graph(branch("b", vec![Dim::Value(6)])),
                ),
        ],
        vec![],
        17,
    );
    let found = rules(&m);
    assert_eq!(
        found
            .iter()
            .filter(|(r, n)| *r == "if-branches" && n == "if")
            .count(),
        2,
        "{found:?}"
    );
}

#[test]
fn topk_rules() {
    let k = |v: i64| Tensor::from_i64("k", vec![1], &[v]);
    let m = model(
        vec![Node::new("topk", "TopK", &["x", "k"], &["y", "i"])],
        vec![k(4000)],
        17,
    );
    assert_flags(&m, "topk", "topk");
    let m = model(
        vec![Node::new("topk", "TopK", &["x", "k"], &["y", "i"])
            .with_attr("sorted", AttrValue::Int(0))],
        vec![k(2)],
        17,
    );
    assert_flags(&m, "topk", "topk");
    let ok = model(
        vec![Node::new("topk", "TopK", &["x", "k"], &["y", "i"])],
        vec![k(2)],
        17,
    );
    assert_eq!(rules(&ok), vec![]);
}

#[test]
fn reduce_axes_must_be_initializers() {
    let m = model(
        vec![
            Node::new("shape", "Shape", &["x"], &["axes"]),
            Node::new("sum", "ReduceSum", &["x", "axes"], &["y"]),
        ],
        vec![],
        18,
    );
    assert_flags(&m, "reduce-axes", "sum");
}

/// An opset-23 `Attention` node `attn` on `inputs`, among graph inputs `q`, `k`, `v`, `pk`, `pv` (4-D
/// `[1, 2, 3, 4]`) and `q3` (3-D), with an optional softcap.
fn attention_model(inputs: &[&str], softcap: Option<f32>) -> Model {
    let dims = |rank: usize| vec![Dim::Value(2); rank];
    let mut node = Node::new("attn", "Attention", inputs, &["y"]);
    if let Some(c) = softcap {
        node = node.with_attr("softcap", AttrValue::Float(c));
    }
    let mut graph_inputs: Vec<ValueInfo> = ["q", "k", "v", "pk", "pv"]
        .iter()
        .map(|n| ValueInfo::tensor(n, DataType::F32, dims(4)))
        .collect();
    graph_inputs.push(ValueInfo::tensor("q3", DataType::F32, dims(3)));
    Model::new(
        Graph {
            inputs: graph_inputs,
            outputs: vec![ValueInfo::tensor("y", DataType::F32, vec![])],
            nodes: vec![node],
            ..Graph::default()
        },
        23,
    )
}

/// `m` has exactly one violation: `rule` on `node`, its message giving the reason `why`.
fn assert_single_violation(m: &Model, rule: &str, node: &str, why: &str) {
    let found = lint(m, Target::Trt10, None);
    assert_eq!(found.len(), 1, "expected one violation, got {found:?}");
    let v = &found[0];
    assert_eq!((v.rule, v.node.as_str()), (rule, node), "{v:?}");
    assert!(v.message.contains(why), "expected '{why}' in: {v:?}");
}

#[test]
fn attention_on_4d_inputs_without_past_or_softcap_conforms() {
    assert_eq!(rules(&attention_model(&["q", "k", "v"], None)), vec![]);
}

#[test]
fn attention_with_past_key_value_is_flagged() {
    let m = attention_model(&["q", "k", "v", "", "pk", "pv"], None);
    assert_single_violation(&m, "attention", "attn", "past key/value is not supported");
}

#[test]
fn attention_with_softcap_is_flagged() {
    let m = attention_model(&["q", "k", "v"], Some(30.0));
    assert_single_violation(&m, "attention", "attn", "softcap is not supported");
}

#[test]
fn attention_on_3d_inputs_is_flagged() {
    let m = attention_model(&["q3", "k", "v"], None);
    assert_single_violation(&m, "attention", "attn", "input 'q3' must be 4-D");
}

#[test]
fn cumsum_axis_constant() {
    let m = model(
        vec![
            Node::new("shape", "Shape", &["x"], &["ax"]),
            Node::new("cs", "CumSum", &["x", "ax"], &["y"]),
        ],
        vec![],
        17,
    );
    assert_flags(&m, "cumsum-axis", "cs");
}

#[test]
fn graph_files_above_2gb_are_flagged() {
    let m = model(
        vec![Node::new("id", "Identity", &["x"], &["y"])],
        vec![],
        17,
    );
    assert_flags_with_size(&m, 3 << 30);
}

fn assert_flags_with_size(m: &Model, bytes: u64) {
    let v = lint(m, Target::Trt11, Some(bytes));
    assert!(v.iter().any(|v| v.rule == "size-limit"), "{v:?}");
    assert!(lint(m, Target::Trt11, Some(1 << 20)).is_empty());
}
