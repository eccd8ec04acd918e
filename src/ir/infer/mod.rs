//! Shape and dtype inference, with constant propagation of small integer tensors.
//!
//! Exporters compute reshape targets at run time (`Shape -> Gather -> Concat -> Reshape`), so knowing a
//! shape often needs the *values* of small int64 tensors. Each value gets a [`TypeInfo`]: its dtype, its
//! shape when fully known, and its contents when it is a small integer tensor computable from constants
//! and static shapes. Ops without a rule here get unknown outputs; nothing fails.

use std::collections::HashMap;

mod elementwise;
mod linear;
mod reduce;
mod shape_ops;

pub use elementwise::broadcast;
pub use shape_ops::{normalize_axis, reshape_target};

use elementwise::*;
use linear::*;
use reduce::*;
use shape_ops::*;

pub(crate) use super::{AttrValue, DataType, Dim, Graph, Node, Tensor};

/// Largest integer tensor whose contents are tracked.
const MAX_TRACKED_VALUES: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeInfo {
    pub dtype: Option<DataType>,
    /// Fully known static shape.
    pub shape: Option<Vec<i64>>,
    /// Contents (row-major) of a small integer tensor, when known.
    pub value: Option<Vec<i64>>,
}

impl TypeInfo {
    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    fn of(dtype: Option<DataType>, shape: Option<Vec<i64>>) -> TypeInfo {
        TypeInfo {
            dtype,
            shape,
            value: None,
        }
    }

    fn with_value(dtype: Option<DataType>, shape: Vec<i64>, value: Vec<i64>) -> TypeInfo {
        let value = (value.len() <= MAX_TRACKED_VALUES).then_some(value);
        TypeInfo {
            dtype,
            shape: Some(shape),
            value,
        }
    }
}

pub type TypeMap = HashMap<String, TypeInfo>;

/// Infer types for every value of `graph` (nodes must be in topological order).
pub fn infer_types(graph: &Graph, opset: i64) -> TypeMap {
    let mut types = TypeMap::new();
    for input in &graph.inputs {
        let shape = input
            .shape()
            .and_then(|dims| dims.iter().map(Dim::value).collect::<Option<Vec<_>>>());
        types.insert(
            input.name.clone(),
            sanitize(TypeInfo::of(input.dtype(), shape)),
        );
    }
    for t in &graph.initializers {
        types.insert(t.name.clone(), sanitize(tensor_info(t)));
    }
    for node in &graph.nodes {
        let inputs: Vec<TypeInfo> = node
            .inputs
            .iter()
            .map(|n| types.get(n).cloned().unwrap_or_default())
            .collect();
        let outputs: Vec<TypeInfo> = infer_node(node, &inputs, opset)
            .into_iter()
            .map(sanitize)
            .collect();
        for (i, name) in node.outputs.iter().enumerate() {
            if !name.is_empty() {
                types.insert(name.clone(), outputs.get(i).cloned().unwrap_or_default());
            }
        }
    }
    types
}

/// Largest element count a shape may claim before it is treated as unknown (2^48).
const MAX_ELEMENTS: i64 = 1 << 48;

/// Forget shapes that no real tensor can have (negative dims, absurd sizes from hostile files), so
/// later arithmetic on them cannot overflow.
fn sanitize(mut info: TypeInfo) -> TypeInfo {
    let sane = info.shape.as_ref().is_none_or(|s| {
        s.iter()
            .try_fold(1i64, |acc, &d| {
                (d >= 0).then(|| acc.checked_mul(d)).flatten()
            })
            .is_some_and(|n| n <= MAX_ELEMENTS)
    });
    if !sane {
        info.shape = None;
        info.value = None;
    }
    info
}

pub fn tensor_info(t: &Tensor) -> TypeInfo {
    let value = if t.dtype.is_integer() && (t.numel() as usize) <= MAX_TRACKED_VALUES {
        t.to_i64_vec()
    } else {
        None
    };
    TypeInfo {
        dtype: Some(t.dtype),
        shape: Some(t.dims.clone()),
        value,
    }
}

/// Output types of one node from its input types.
pub fn infer_node(node: &Node, inputs: &[TypeInfo], opset: i64) -> Vec<TypeInfo> {
    // ditc's attention ops: O as Q with V's last dim, then (the sparse ones) an int64 count.
    if node.domain == "ai.ditc" {
        let mut out = ditc_attention(inputs);
        match node.op_type.as_str() {
            "SparseLinearAttention" | "SageSparseLinearAttention" => return out,
            "SageAttention" => {
                out.truncate(1);
                return out;
            }
            _ => {}
        }
    }
    if !node.is_onnx() {
        return vec![TypeInfo::default(); node.outputs.len()];
    }
    let input = |i: usize| inputs.get(i).cloned().unwrap_or_default();
    let x = input(0);
    let same = |dtype: Option<DataType>| vec![TypeInfo::of(dtype, x.shape.clone())];
    match node.op_type.as_str() {
        "Constant" => vec![constant_info(node)],
        "Identity" => vec![x.clone()],
        "Cast" => {
            let to = node
                .attr_int("to")
                .and_then(|c| DataType::from_onnx_code(c as i32));
            let mut out = x.clone();
            out.dtype = to;
            if !to.is_some_and(|d| d.is_integer()) {
                out.value = None;
            }
            vec![out]
        }
        "Neg" => {
            let mut out = x.clone();
            out.value = x.value.map(|v| v.iter().map(|a| -a).collect());
            vec![out]
        }
        "Relu"
        | "Sigmoid"
        | "Tanh"
        | "Erf"
        | "Sqrt"
        | "Exp"
        | "Log"
        | "Abs"
        | "Reciprocal"
        | "Sin"
        | "Cos"
        | "Softmax"
        | "LogSoftmax"
        | "Gelu"
        | "Dropout"
        | "LayerNormalization"
        | "RMSNormalization"
        | "SimplifiedLayerNormalization"
        | "GroupNormalization"
        | "InstanceNormalization"
        | "BatchNormalization"
        | "Clip"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "HardSigmoid"
        | "HardSwish"
        | "LeakyRelu"
        | "Elu"
        | "Softplus"
        | "Mish"
        | "Selu"
        | "CumSum"
        | "Not"
        | "IsNaN"
        | "IsInf" => {
            let dtype = match node.op_type.as_str() {
                "Not" | "IsNaN" | "IsInf" => Some(DataType::Bool),
                _ => x.dtype,
            };
            same(dtype)
        }
        "QuantizeLinear" => {
            let dtype = node
                .attr_int("output_dtype")
                .filter(|&c| c != 0)
                .and_then(|c| DataType::from_onnx_code(c as i32))
                .or(input(2).dtype)
                .or(Some(DataType::U8));
            same(dtype)
        }
        "DequantizeLinear" => same(input(1).dtype.or(Some(DataType::F32))),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Mod" | "Sum" | "Mean" | "And"
        | "Or" | "Xor" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual"
        | "BitShift" | "PRelu" => vec![elementwise(node, inputs)],
        "Where" => {
            let mut out = elementwise(node, inputs);
            out.dtype = input(1).dtype;
            vec![out]
        }
        "MatMul" => vec![TypeInfo::of(x.dtype, matmul_shape(&x, &input(1)))],
        "Gemm" => vec![TypeInfo::of(x.dtype, gemm_shape(node, &x, &input(1)))],
        "Conv" => vec![TypeInfo::of(x.dtype, conv_shape(node, &x, &input(1)))],
        "Reshape" => vec![reshape(node, &x, &input(1))],
        "Transpose" => vec![transpose(node, &x)],
        "Flatten" => vec![flatten(node, &x)],
        "Unsqueeze" => vec![unsqueeze(node, &x, &input(1), opset)],
        "Squeeze" => vec![squeeze(node, &x, &input(1), opset)],
        "Concat" => vec![concat(node, inputs)],
        "Split" => split(node, &x, &input(1), opset),
        "Slice" => vec![slice(node, inputs, opset)],
        "Gather" => vec![gather(node, &x, &input(1))],
        "GatherElements" => vec![TypeInfo::of(x.dtype, input(1).shape)],
        "ScatterND" | "ScatterElements" => same(x.dtype),
        "Shape" => vec![shape_of(node, &x)],
        "Size" => {
            let n = x.shape.as_ref().map(|s| s.iter().product::<i64>());
            match n {
                Some(n) => vec![TypeInfo::with_value(Some(DataType::I64), vec![], vec![n])],
                None => vec![TypeInfo::of(Some(DataType::I64), Some(vec![]))],
            }
        }
        "ConstantOfShape" => vec![constant_of_shape(node, &x)],
        "Expand" => {
            let shape = match (&x.shape, &input(1).value) {
                (Some(a), Some(b)) => broadcast(a, b),
                _ => None,
            };
            vec![TypeInfo::of(x.dtype, shape)]
        }
        "Tile" => {
            let shape = match (&x.shape, &input(1).value) {
                (Some(s), Some(r)) if s.len() == r.len() => {
                    s.iter().zip(r).map(|(a, b)| a.checked_mul(*b)).collect()
                }
                _ => None,
            };
            vec![TypeInfo::of(x.dtype, shape)]
        }
        "Range" => vec![range(inputs)],
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceSumSquare" | "ReduceLogSumExp" => {
            vec![reduce(node, &x, &input(1), opset)]
        }
        "ArgMax" | "ArgMin" => {
            let axes = node.attr_int("axis").unwrap_or(0);
            let keep = node.attr_int("keepdims").unwrap_or(1) != 0;
            let shape = x
                .shape
                .as_ref()
                .and_then(|s| reduce_shape(s, &[axes], keep));
            vec![TypeInfo::of(Some(DataType::I64), shape)]
        }
        "Einsum" => vec![TypeInfo::of(x.dtype, einsum_shape(node, inputs))],
        "Pad" => vec![pad(node, &x, &input(1))],
        "Attention" => attention(node, inputs),
        "If" => if_outputs(node),
        _ => vec![TypeInfo::default(); node.outputs.len()],
    }
}

/// ditc's `SparseLinearAttention`: O is Q's shape with V's last dim, in Q's type; `kept` an int64 scalar.
fn ditc_attention(inputs: &[TypeInfo]) -> Vec<TypeInfo> {
    let input = |i: usize| inputs.get(i).cloned().unwrap_or_default();
    let (q, v) = (input(0), input(2));
    let shape = match (&q.shape, &v.shape) {
        (Some(qs), Some(vs)) if !qs.is_empty() && qs.len() == vs.len() => {
            let mut s = qs.clone();
            *s.last_mut().expect("non-empty") = *vs.last().expect("same rank");
            Some(s)
        }
        _ => None,
    };
    vec![
        TypeInfo::of(q.dtype, shape),
        TypeInfo::of(Some(DataType::I64), Some(vec![])),
    ]
}

/// An `If`'s outputs as its branches declare them (a dim both branches do not agree on is unknown).
fn if_outputs(node: &Node) -> Vec<TypeInfo> {
    let declared = |key: &str| -> Vec<TypeInfo> {
        match node.attr(key) {
            Some(AttrValue::Graph(g)) => g
                .outputs
                .iter()
                .map(|o| {
                    let shape = o
                        .shape()
                        .and_then(|d| d.iter().map(Dim::value).collect::<Option<Vec<_>>>());
                    TypeInfo::of(o.dtype(), shape)
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let (then, other) = (declared("then_branch"), declared("else_branch"));
    (0..node.outputs.len())
        .map(|i| match (then.get(i), other.get(i)) {
            (Some(a), Some(b)) if a.dtype == b.dtype && a.shape == b.shape => a.clone(),
            (Some(a), Some(b)) if a.dtype == b.dtype => TypeInfo::of(a.dtype, None),
            _ => TypeInfo::default(),
        })
        .collect()
}

fn constant_info(node: &Node) -> TypeInfo {
    if let Some(t) = node.attr_tensor("value") {
        return tensor_info(t);
    }
    match node.attributes.first().map(|a| (&a.name[..], &a.value)) {
        Some(("value_int", AttrValue::Int(i))) => {
            TypeInfo::with_value(Some(DataType::I64), vec![], vec![*i])
        }
        Some(("value_ints", AttrValue::Ints(v))) => {
            TypeInfo::with_value(Some(DataType::I64), vec![v.len() as i64], v.clone())
        }
        Some(("value_float", _)) => TypeInfo::of(Some(DataType::F32), Some(vec![])),
        Some(("value_floats", AttrValue::Floats(v))) => {
            TypeInfo::of(Some(DataType::F32), Some(vec![v.len() as i64]))
        }
        _ => TypeInfo::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ValueInfo;

    #[test]
    fn reshape_targets() {
        assert_eq!(
            reshape_target(&[2, 3, 4], &[0, -1], false),
            Some(vec![2, 12])
        );
        assert_eq!(reshape_target(&[2, 3, 4], &[6, 5], false), None);
        assert_eq!(reshape_target(&[2, 3, 4], &[-1, -1], false), None);
    }

    #[test]
    fn dynamic_reshape_through_shape_arithmetic() {
        // x [2, 6, 8] -> Shape -> Gather(0) -> Unsqueeze -> Concat with [-1, 4] -> Reshape.
        let g = Graph {
            inputs: vec![ValueInfo::tensor(
                "x",
                DataType::F32,
                vec![Dim::Value(2), Dim::Value(6), Dim::Value(8)],
            )],
            initializers: vec![
                Tensor::from_i64("zero", vec![], &[0]),
                Tensor::from_i64("axes", vec![1], &[0]),
                Tensor::from_i64("tail", vec![2], &[-1, 4]),
            ],
            nodes: vec![
                Node::new("s", "Shape", &["x"], &["s"]),
                Node::new("g", "Gather", &["s", "zero"], &["b"]),
                Node::new("u", "Unsqueeze", &["b", "axes"], &["b1"]),
                Node::new("c", "Concat", &["b1", "tail"], &["t"])
                    .with_attr("axis", AttrValue::Int(0)),
                Node::new("r", "Reshape", &["x", "t"], &["y"]),
                Node::new("m", "MatMul", &["y", "y2"], &["z"]),
            ],
            ..Graph::default()
        };
        let types = infer_types(&g, 17);
        assert_eq!(types["t"].value, Some(vec![2, -1, 4]));
        assert_eq!(types["y"].shape, Some(vec![2, 12, 4]));
        assert_eq!(types["z"].shape, None);
    }

    #[test]
    fn conv_and_matmul_shapes() {
        let conv = Node::new("c", "Conv", &["x", "w"], &["y"])
            .with_attr("strides", AttrValue::Ints(vec![2, 2]));
        let x = TypeInfo::of(Some(DataType::F32), Some(vec![8, 4, 16, 16]));
        let w = TypeInfo::of(Some(DataType::F32), Some(vec![64, 4, 2, 2]));
        assert_eq!(
            infer_node(&conv, &[x, w], 17)[0].shape,
            Some(vec![8, 64, 8, 8])
        );
        let a = TypeInfo::of(None, Some(vec![8, 4, 64, 16]));
        let b = TypeInfo::of(None, Some(vec![8, 4, 16, 64]));
        assert_eq!(matmul_shape(&a, &b), Some(vec![8, 4, 64, 64]));
    }
}
