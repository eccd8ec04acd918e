//! TensorRT conformance lint: the rules of reference.md §4 that an ONNX producer must follow.
//!
//! Each rule is a function over the graph that reports violations with the node they concern. Rules:
//! `opset` (TensorRT's ONNX parser takes opsets 9-24), `unsupported-op` (DynamicQuantizeLinear,
//! MatMulInteger, QLinearMatMul, ConvInteger, QLinearConv), `qdq-zero-point` (symmetric: zero points 0),
//! `qdq-scale` (constant scales, per tensor or per channel, are positive and finite: a zero, negative,
//! NaN or infinite scale names its index and value),
//! `qdq-type` (INT8 or FP8 E4M3 only), `qdq-static-scale` (scales are constants), `qdq-per-channel`
//! (per-channel scales only on constant weights; activations per tensor), `qdq-block` (no block
//! quantization), `qdq-pair` (every QuantizeLinear feeds DequantizeLinear), `if-branches` (0-D bool
//! condition, both branches with as many outputs as the If, of equal rank), `topk` (sorted=1, constant K < 3840), `reduce-axes`
//! (axes are an initializer), `attention` (4-D Q/K/V, no past key/value, no softcap), `cumsum-axis`
//! (constant axis), `size-limit` (a graph file above 2 GB must keep weights external).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, Tensor, TypeMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Trt10,
    Trt11,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Violation {
    pub rule: &'static str,
    pub node: String,
    pub message: String,
}

/// Every violation of the TensorRT rules in `model` (subgraphs included).
pub fn lint(model: &Model, target: Target, graph_file_bytes: Option<u64>) -> Vec<Violation> {
    let mut out = Vec::new();
    let opset = model.default_opset();
    if !(9..=24).contains(&opset) {
        out.push(v(
            "opset",
            "",
            format!("opset {opset}: TensorRT's ONNX parser takes opsets 9-24"),
        ));
    }
    if let Some(bytes) = graph_file_bytes {
        if bytes > crate::onnx::PROTOBUF_LIMIT {
            out.push(v("size-limit", "", format!("the graph file is {bytes} bytes, above protobuf's 2 GB limit: keep weights as external data")));
        }
    }
    let types = infer_types(&model.graph, opset);
    lint_graph(&model.graph, &types, target, &Scope::default(), &mut out);
    lint_domains(model, &model.graph, &mut out);
    out
}

/// A node TensorRT builds from a plugin rather than from ONNX ops: a requirement, not a violation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PluginUse {
    pub node: String,
    /// The plugin's name (the node's op type), version and namespace (its attributes).
    pub plugin: String,
    pub version: String,
    pub namespace: String,
    /// Whether the model carries a local function for the op (TensorRT builds that body when the
    /// node is not marked for the plugin, or when the plugin is not loaded).
    pub has_function: bool,
}

/// Nodes (subgraphs included) that TensorRT maps to a plugin: `ai.ditc` ops marked with a
/// `plugin_namespace` attribute (onnx-tensorrt's rule for a node that also has a local function).
pub fn plugin_nodes(model: &Model) -> Vec<PluginUse> {
    let mut out = Vec::new();
    collect_plugins(model, &model.graph, &mut out);
    out
}

fn collect_plugins(model: &Model, graph: &Graph, out: &mut Vec<PluginUse>) {
    for n in &graph.nodes {
        if n.domain == DITC_DOMAIN {
            if let Some(namespace) = n.attr_string("plugin_namespace") {
                out.push(PluginUse {
                    node: n.name.clone(),
                    plugin: n.op_type.clone(),
                    version: n
                        .attr_string("plugin_version")
                        .unwrap_or_else(|| "1".into()),
                    namespace,
                    has_function: has_function(model, n),
                });
            }
        }
        for g in n.subgraphs() {
            collect_plugins(model, g, out);
        }
    }
}

const DITC_DOMAIN: &str = "ai.ditc";

fn has_function(model: &Model, n: &Node) -> bool {
    model
        .functions
        .iter()
        .any(|f| f.domain == n.domain && f.name == n.op_type)
}

/// Rule `unsupported-op` for other domains: a node of a non-ONNX domain needs a local function
/// (TensorRT inlines it) or, for ditc's own ops, the plugin.
fn lint_domains(model: &Model, graph: &Graph, out: &mut Vec<Violation>) {
    for n in &graph.nodes {
        let known = n.is_onnx() || has_function(model, n);
        if !known {
            let hint = if n.domain == DITC_DOMAIN {
                "a ditc op without its local function: TensorRT can build it only from the ditc plugin, and nothing else can run it"
            } else {
                "no local function for it: TensorRT's parser can only look it up as a plugin of that name (none of ditc's), and other runtimes cannot run it"
            };
            out.push(v(
                "unsupported-op",
                &n.name,
                format!("{} (domain '{}'): {hint}", n.op_type, n.domain),
            ));
        }
        for g in n.subgraphs() {
            lint_domains(model, g, out);
        }
    }
}

/// Rule `gpu-fp8`: FP8 Q/DQ need FP8 tensor cores (Ada or newer); TensorRT refuses them on Ampere.
pub fn lint_gpu(model: &Model, gpu: crate::target::Gpu) -> Vec<Violation> {
    if gpu.has_fp8() {
        return Vec::new();
    }
    let mut fp8_tensors = HashSet::new();
    let mut out = Vec::new();
    fp8_qdq_nodes(&model.graph, &mut fp8_tensors, &mut |n: &Node| {
        out.push(v(
            "gpu-fp8",
            &n.name,
            format!(
                "FP8 {} but the target GPU ({}) has no FP8 tensor cores (Ada or newer)",
                n.op_type,
                gpu.name()
            ),
        ))
    });
    out
}

/// Every Q/DQ node (If branches included) reading an FP8 initializer of its graph or an enclosing one.
fn fp8_qdq_nodes<'a>(
    graph: &'a Graph,
    fp8_tensors: &mut HashSet<&'a str>,
    found: &mut impl FnMut(&Node),
) {
    let mut scope = fp8_tensors.clone();
    scope.extend(
        graph
            .initializers
            .iter()
            .filter(|t| matches!(t.dtype, DataType::F8E4M3FN | DataType::F8E5M2))
            .map(|t| t.name.as_str()),
    );
    for n in &graph.nodes {
        let qdq = matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear");
        if qdq && n.inputs.iter().any(|i| scope.contains(i.as_str())) {
            found(n);
        }
        for sub in n.subgraphs() {
            fp8_qdq_nodes(sub, &mut scope, found);
        }
    }
}

/// Constants visible from enclosing graphs (subgraphs read their initializers from outer scopes).
#[derive(Default, Clone)]
struct Scope<'a> {
    tensors: HashMap<&'a str, &'a Tensor>,
    constant_valued: HashSet<&'a str>,
}

fn v(rule: &'static str, node: &str, message: String) -> Violation {
    Violation {
        rule,
        node: node.to_string(),
        message,
    }
}

fn lint_graph<'a>(
    graph: &'a Graph,
    types: &TypeMap,
    target: Target,
    outer: &Scope<'a>,
    out: &mut Vec<Violation>,
) {
    let mut scope = outer.clone();
    scope
        .tensors
        .extend(graph.initializers.iter().map(|t| (t.name.as_str(), t)));
    // Constant nodes' values too (exporters emit Q/DQ scales and zero points either way).
    scope.tensors.extend(
        graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Constant")
            .filter_map(|n| Some((n.outputs.first()?.as_str(), n.attr_tensor("value")?))),
    );
    let constants: HashSet<&str> = scope
        .tensors
        .keys()
        .copied()
        .chain(
            graph
                .nodes
                .iter()
                .filter(|n| n.op_type == "Constant")
                .flat_map(|n| n.outputs.iter().map(String::as_str)),
        )
        .collect();
    // Values computed from constants only (e.g. a weight behind a Transpose) count as constant weights.
    let mut constant_valued = constants.clone();
    constant_valued.extend(outer.constant_valued.iter().copied());
    for n in &graph.nodes {
        if !n.inputs.is_empty() && n.present_inputs().all(|i| constant_valued.contains(i)) {
            constant_valued.extend(n.outputs.iter().map(String::as_str));
        }
    }
    for node in graph.nodes.iter().filter(|n| n.is_onnx()) {
        let name = node.name.as_str();
        match node.op_type.as_str() {
            "DynamicQuantizeLinear"
            | "MatMulInteger"
            | "QLinearMatMul"
            | "ConvInteger"
            | "QLinearConv" => out.push(v(
                "unsupported-op",
                name,
                format!(
                    "{} is not supported by TensorRT: use QuantizeLinear/DequantizeLinear pairs",
                    node.op_type
                ),
            )),
            "QuantizeLinear" | "DequantizeLinear" => {
                lint_qdq(
                    &scope,
                    node,
                    types,
                    &constants,
                    &constant_valued,
                    target,
                    out,
                );
                let Some(q_out) = node.outputs.first().map(String::as_str) else {
                    continue;
                };
                let feeds_only_dq = graph
                    .nodes
                    .iter()
                    .filter(|c| c.present_inputs().any(|i| i == q_out))
                    .all(|c| c.op_type == "DequantizeLinear");
                if node.op_type == "QuantizeLinear" && !feeds_only_dq {
                    out.push(v(
                        "qdq-pair",
                        name,
                        "QuantizeLinear must feed DequantizeLinear only".into(),
                    ));
                }
            }
            "If" => lint_if(node, types, out),
            "TopK" => {
                if node.attr_int("sorted").unwrap_or(1) != 1 {
                    out.push(v("topk", name, "TopK needs sorted=1".into()));
                }
                let k = node
                    .inputs
                    .get(1)
                    .and_then(|k| types.get(k))
                    .and_then(|t| t.value.clone());
                match k.as_deref() {
                    Some([k]) if *k < 3840 => {}
                    Some([k]) => out.push(v(
                        "topk",
                        name,
                        format!("TopK K = {k}: TensorRT needs K < 3840"),
                    )),
                    _ => out.push(v("topk", name, "TopK K must be a constant".into())),
                }
            }
            op if op.starts_with("Reduce") => {
                if let Some(axes) = node.inputs.get(1).filter(|a| !a.is_empty()) {
                    if !constants.contains(axes.as_str()) {
                        out.push(v(
                            "reduce-axes",
                            name,
                            format!("{op} axes '{axes}' must be an initializer"),
                        ));
                    }
                }
            }
            "CumSum"
                if !node
                    .inputs
                    .get(1)
                    .is_some_and(|a| constant_valued.contains(a.as_str())) =>
            {
                out.push(v(
                    "cumsum-axis",
                    name,
                    "CumSum axis must be constant".into(),
                ));
            }
            "Attention" => {
                if node.inputs.iter().skip(4).any(|i| !i.is_empty()) {
                    out.push(v(
                        "attention",
                        name,
                        "Attention with past key/value is not supported".into(),
                    ));
                }
                if node.attr_float("softcap").unwrap_or(0.0) != 0.0 {
                    out.push(v(
                        "attention",
                        name,
                        "Attention softcap is not supported".into(),
                    ));
                }
                for i in node.inputs.iter().take(3) {
                    if types.get(i).and_then(|t| t.rank()).is_some_and(|r| r != 4) {
                        out.push(v(
                            "attention",
                            name,
                            format!("Attention input '{i}' must be 4-D"),
                        ));
                    }
                }
            }
            _ => {}
        }
        for sub in node.subgraphs() {
            let inner = infer_types(sub, 23);
            let mut merged = types.clone();
            merged.extend(inner);
            let mut inner_scope = scope.clone();
            inner_scope
                .constant_valued
                .extend(constant_valued.iter().copied());
            lint_graph(sub, &merged, target, &inner_scope, out);
        }
    }
}

fn lint_qdq(
    scope: &Scope,
    node: &Node,
    types: &TypeMap,
    constants: &HashSet<&str>,
    constant_valued: &HashSet<&str>,
    target: Target,
    out: &mut Vec<Violation>,
) {
    let name = node.name.as_str();
    let scale = node.inputs.get(1).map(String::as_str).unwrap_or("");
    if !constants.contains(scale) {
        out.push(v(
            "qdq-static-scale",
            name,
            format!("scale '{scale}' must be a constant (static scales only)"),
        ));
    }
    if node.attr_int("block_size").unwrap_or(0) != 0 {
        out.push(v(
            "qdq-block",
            name,
            "block quantization is not supported".into(),
        ));
    }
    let zp = node
        .inputs
        .get(2)
        .filter(|z| !z.is_empty())
        .and_then(|z| scope.tensors.get(z.as_str()).copied());
    let quant_type = match node.op_type.as_str() {
        "QuantizeLinear" => zp.map(|z| z.dtype).or_else(|| {
            node.attr_int("output_dtype")
                .filter(|&c| c != 0)
                .and_then(|c| DataType::from_onnx_code(c as i32))
        }),
        _ => zp.map(|z| z.dtype).or_else(|| {
            node.inputs
                .first()
                .and_then(|i| types.get(i))
                .and_then(|t| t.dtype)
        }),
    }
    .unwrap_or(DataType::U8);
    let allowed = match target {
        Target::Trt10 | Target::Trt11 => matches!(quant_type, DataType::I8 | DataType::F8E4M3FN),
    };
    if !allowed {
        out.push(v("qdq-type", name, format!("quantized type {quant_type}: TensorRT takes INT8 or FP8 E4M3 (give an int8 zero point)")));
    }
    if let Some(z) = zp {
        if let Some((at, value)) = first_nonzero(z) {
            out.push(v(
                "qdq-zero-point",
                name,
                format!(
                    "zero point '{}' is {value}{}: zero points must be all zeros (symmetric quantization)",
                    z.name,
                    at_index(z, at)
                ),
            ));
        }
    }
    if let Some(s) = scope.tensors.get(scale) {
        let values = s.to_f32_vec().unwrap_or_default();
        if let Some((at, x)) = values
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x > 0.0))
        {
            out.push(v(
                "qdq-scale",
                name,
                format!(
                    "scale '{scale}' is {}{}: scales must be positive and finite (a zero, NaN or infinite scale turns the values into zeros or garbage)",
                    float_text(*x),
                    at_index(s, at)
                ),
            ));
        }
    }
    let per_channel = scope
        .tensors
        .get(scale)
        .is_some_and(|s| !s.dims.is_empty() && s.numel() > 1);
    if per_channel {
        // Per-channel: only on constant weights (a DequantizeLinear of an initializer, or Q of a weight).
        let data = node.inputs[0].as_str();
        let on_weight = constant_valued.contains(data);
        if !on_weight {
            out.push(v(
                "qdq-per-channel",
                name,
                format!("per-channel scale on activation '{data}': activations must be per tensor"),
            ));
        }
    }
}

/// The first element of a zero point that is not zero, and its value (integers by value; other
/// types, e.g. FP8, by byte).
fn first_nonzero(z: &Tensor) -> Option<(usize, String)> {
    if let Some(values) = z.to_i64_vec() {
        let at = values.iter().position(|&x| x != 0)?;
        return Some((at, values[at].to_string()));
    }
    let Some(raw) = z.raw() else {
        return Some((0, "not numeric".into()));
    };
    let at = raw.iter().position(|&b| b != 0)?;
    Some((at, format!("byte {:#04x}", raw[at])))
}

/// ` at index 3 ([0, 3])` for element `at` of a tensor with more than one element; nothing for a scalar.
fn at_index(t: &Tensor, at: usize) -> String {
    if t.dims.is_empty() {
        return String::new();
    }
    format!(
        " at index {at} ({:?})",
        crate::finite::unravel(at as u64, &t.dims)
    )
}

fn float_text(x: f32) -> String {
    match x {
        x if x.is_nan() => "NaN".into(),
        f32::INFINITY => "+Inf".into(),
        f32::NEG_INFINITY => "-Inf".into(),
        x => format!("{x}"),
    }
}

fn lint_if(node: &Node, types: &TypeMap, out: &mut Vec<Violation>) {
    let name = node.name.as_str();
    if let Some(t) = node.inputs.first().and_then(|c| types.get(c)) {
        if t.rank().is_some_and(|r| r != 0) || t.dtype.is_some_and(|d| d != DataType::Bool) {
            out.push(v(
                "if-branches",
                name,
                "If condition must be a 0-D bool".into(),
            ));
        }
    }
    let (Some(AttrValue::Graph(a)), Some(AttrValue::Graph(b))) =
        (node.attr("then_branch"), node.attr("else_branch"))
    else {
        return;
    };
    for (key, branch) in [("then_branch", a), ("else_branch", b)] {
        if branch.outputs.len() != node.outputs.len() {
            out.push(v(
                "if-branches",
                name,
                format!(
                    "{key} has {} outputs, the If {}",
                    branch.outputs.len(),
                    node.outputs.len()
                ),
            ));
        }
    }
    for (x, y) in a.outputs.iter().zip(&b.outputs) {
        let (rx, ry) = (x.shape().map(|s| s.len()), y.shape().map(|s| s.len()));
        if let (Some(rx), Some(ry)) = (rx, ry) {
            if rx != ry {
                out.push(v(
                    "if-branches",
                    name,
                    format!(
                        "branch outputs '{}' (rank {rx}) and '{}' (rank {ry}) differ in rank",
                        x.name, y.name
                    ),
                ));
            }
        }
    }
}
