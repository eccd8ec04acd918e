//! Shape and dtype inference, with constant propagation of small integer tensors.
//!
//! Exporters compute reshape targets at run time (`Shape -> Gather -> Concat -> Reshape`), so knowing a
//! shape often needs the *values* of small int64 tensors. Each value gets a [`TypeInfo`]: its dtype, its
//! shape when fully known, and its contents when it is a small integer tensor computable from constants
//! and static shapes. Ops without a rule here get unknown outputs; nothing fails.

use std::collections::HashMap;

use super::{AttrValue, DataType, Dim, Graph, Node, Tensor};

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

/// Numpy-style broadcast of two static shapes.
pub fn broadcast(a: &[i64], b: &[i64]) -> Option<Vec<i64>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

fn elementwise(node: &Node, inputs: &[TypeInfo]) -> TypeInfo {
    let present: Vec<&TypeInfo> = node
        .inputs
        .iter()
        .zip(inputs)
        .filter(|(n, _)| !n.is_empty())
        .map(|(_, t)| t)
        .collect();
    let shape = present.iter().try_fold(Vec::new(), |acc, t| {
        t.shape.as_ref().and_then(|s| broadcast(&acc, s))
    });
    let dtype = match node.op_type.as_str() {
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            Some(DataType::Bool)
        }
        _ => present.first().and_then(|t| t.dtype),
    };
    let value = shape
        .as_ref()
        .and_then(|s| elementwise_values(node, &present, s));
    TypeInfo {
        dtype,
        shape,
        value,
    }
}

/// Integer arithmetic on tracked values (scalars broadcast; equal-length vectors elementwise).
fn elementwise_values(node: &Node, inputs: &[&TypeInfo], shape: &[i64]) -> Option<Vec<i64>> {
    let n: i64 = shape.iter().product();
    if n as usize > MAX_TRACKED_VALUES {
        return None;
    }
    let vals: Vec<&Vec<i64>> = inputs
        .iter()
        .map(|t| t.value.as_ref())
        .collect::<Option<_>>()?;
    let get = |v: &Vec<i64>, i: usize| if v.len() == 1 { v[0] } else { v[i] };
    if vals.iter().any(|v| v.len() != 1 && v.len() != n as usize) {
        return None;
    }
    let f = |a: i64, b: i64| -> Option<i64> {
        Some(match node.op_type.as_str() {
            "Add" | "Sum" => a.checked_add(b)?,
            "Sub" => a.checked_sub(b)?,
            "Mul" => a.checked_mul(b)?,
            "Div" => a.checked_div(b)?,
            "Mod" => a.checked_rem(b)?,
            "Max" => a.max(b),
            "Min" => a.min(b),
            "Equal" => (a == b) as i64,
            "Less" => (a < b) as i64,
            "Greater" => (a > b) as i64,
            _ => return None,
        })
    };
    if node.op_type == "Where" {
        let [c, a, b] = vals[..] else { return None };
        return Some(
            (0..n as usize)
                .map(|i| if get(c, i) != 0 { get(a, i) } else { get(b, i) })
                .collect(),
        );
    }
    if vals.len() != 2 {
        return None;
    }
    (0..n as usize)
        .map(|i| f(get(vals[0], i), get(vals[1], i)))
        .collect()
}

fn matmul_shape(a: &TypeInfo, b: &TypeInfo) -> Option<Vec<i64>> {
    let (mut a, mut b) = (a.shape.clone()?, b.shape.clone()?);
    let (a1, b1) = (a.len() == 1, b.len() == 1);
    if a1 {
        a.insert(0, 1);
    }
    if b1 {
        b.push(1);
    }
    if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
        return None;
    }
    let batch = broadcast(&a[..a.len() - 2], &b[..b.len() - 2])?;
    let mut out = batch;
    if !a1 {
        out.push(a[a.len() - 2]);
    }
    if !b1 {
        out.push(b[b.len() - 1]);
    }
    Some(out)
}

fn gemm_shape(node: &Node, a: &TypeInfo, b: &TypeInfo) -> Option<Vec<i64>> {
    let (a, b) = (a.shape.as_ref()?, b.shape.as_ref()?);
    if a.len() != 2 || b.len() != 2 {
        return None;
    }
    let m = if node.attr_int("transA").unwrap_or(0) != 0 {
        a[1]
    } else {
        a[0]
    };
    let n = if node.attr_int("transB").unwrap_or(0) != 0 {
        b[0]
    } else {
        b[1]
    };
    Some(vec![m, n])
}

fn conv_shape(node: &Node, x: &TypeInfo, w: &TypeInfo) -> Option<Vec<i64>> {
    let (x, w) = (x.shape.as_ref()?, w.shape.as_ref()?);
    let spatial = x.len().checked_sub(2)?;
    if w.len() != x.len() {
        return None;
    }
    let kernel = node
        .attr_ints("kernel_shape")
        .map(|k| k.to_vec())
        .unwrap_or_else(|| w[2..].to_vec());
    let strides = node
        .attr_ints("strides")
        .map(|s| s.to_vec())
        .unwrap_or(vec![1; spatial]);
    let dil = node
        .attr_ints("dilations")
        .map(|s| s.to_vec())
        .unwrap_or(vec![1; spatial]);
    let pads = node
        .attr_ints("pads")
        .map(|s| s.to_vec())
        .unwrap_or(vec![0; 2 * spatial]);
    let auto_pad = node.attr_string("auto_pad").unwrap_or_default();
    if kernel.len() != spatial
        || strides.len() != spatial
        || dil.len() != spatial
        || pads.len() != 2 * spatial
    {
        return None;
    }
    let mut out = vec![x[0], w[0]];
    for i in 0..spatial {
        // i128: attribute values come from the file and may be anything.
        let (input, stride) = (x[2 + i] as i128, strides[i] as i128);
        let span = dil[i] as i128 * (kernel[i] as i128 - 1) + 1;
        if stride <= 0 {
            return None;
        }
        let d = match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => (input + stride - 1) / stride,
            "VALID" => (input - span) / stride + 1,
            _ => (input + pads[i] as i128 + pads[i + spatial] as i128 - span) / stride + 1,
        };
        out.push(i64::try_from(d).ok().filter(|&d| d > 0)?);
    }
    Some(out)
}

fn reshape(node: &Node, x: &TypeInfo, target: &TypeInfo) -> TypeInfo {
    let allow_zero = node.attr_int("allowzero").unwrap_or(0) != 0;
    let shape = match (&x.shape, &target.value) {
        (Some(input), Some(t)) => reshape_target(input, t, allow_zero),
        _ => None,
    };
    let value = match (&x.value, &shape) {
        (Some(v), Some(_)) => Some(v.clone()),
        _ => None,
    };
    TypeInfo {
        dtype: x.dtype,
        shape,
        value,
    }
}

/// Resolve a Reshape target (0 copies the input dim unless `allow_zero`; one -1 is inferred).
pub fn reshape_target(input: &[i64], target: &[i64], allow_zero: bool) -> Option<Vec<i64>> {
    let total: i64 = input.iter().product();
    let mut out: Vec<i64> = Vec::with_capacity(target.len());
    for (i, &t) in target.iter().enumerate() {
        out.push(if t == 0 && !allow_zero {
            *input.get(i)?
        } else {
            t
        });
    }
    let unknown: Vec<usize> = (0..out.len()).filter(|&i| out[i] == -1).collect();
    let known = out
        .iter()
        .filter(|&&d| d != -1)
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))?;
    match unknown.len() {
        0 if known == total => Some(out),
        1 if known > 0 && total % known == 0 => {
            out[unknown[0]] = total / known;
            Some(out)
        }
        _ => None,
    }
    .filter(|o| o.iter().all(|&d| d >= 0))
}

fn transpose(node: &Node, x: &TypeInfo) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let perm: Vec<i64> = node
            .attr_ints("perm")
            .map(|p| p.to_vec())
            .unwrap_or_else(|| (0..s.len() as i64).rev().collect());
        (perm.len() == s.len())
            .then(|| perm.iter().map(|&p| s.get(p as usize).copied()).collect())
            .flatten()
    });
    TypeInfo::of(x.dtype, shape)
}

fn flatten(node: &Node, x: &TypeInfo) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let axis = normalize_axis(node.attr_int("axis").unwrap_or(1), s.len() + 1)?;
        Some(vec![s[..axis].iter().product(), s[axis..].iter().product()])
    });
    TypeInfo::of(x.dtype, shape)
}

/// Map a possibly negative axis into `0..rank`.
pub fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn axes_of(node: &Node, axes_input: &TypeInfo, opset: i64, attr_until: i64) -> Option<Vec<i64>> {
    if opset < attr_until {
        node.attr_ints("axes").map(|a| a.to_vec())
    } else {
        axes_input.value.clone()
    }
}

fn unsqueeze(node: &Node, x: &TypeInfo, axes: &TypeInfo, opset: i64) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let axes = axes_of(node, axes, opset, 13)?;
        let rank = s.len() + axes.len();
        let mut norm: Vec<usize> = axes
            .iter()
            .map(|&a| normalize_axis(a, rank))
            .collect::<Option<_>>()?;
        norm.sort_unstable();
        let mut out = s.clone();
        for a in norm {
            if a > out.len() {
                return None;
            }
            out.insert(a, 1);
        }
        Some(out)
    });
    TypeInfo {
        dtype: x.dtype,
        value: shape.as_ref().and(x.value.clone()),
        shape,
    }
}

fn squeeze(node: &Node, x: &TypeInfo, axes: &TypeInfo, opset: i64) -> TypeInfo {
    let shape = x.shape.as_ref().and_then(|s| {
        let axes = if node.inputs.len() > 1 || opset < 13 {
            axes_of(node, axes, opset, 13)
        } else {
            None
        };
        let drop: Vec<usize> = match axes {
            Some(a) => a
                .iter()
                .map(|&a| normalize_axis(a, s.len()))
                .collect::<Option<_>>()?,
            None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
        };
        Some(
            s.iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, &d)| d)
                .collect(),
        )
    });
    TypeInfo {
        dtype: x.dtype,
        value: shape.as_ref().and(x.value.clone()),
        shape,
    }
}

fn concat(node: &Node, inputs: &[TypeInfo]) -> TypeInfo {
    let dtype = inputs.first().and_then(|t| t.dtype);
    let shapes: Option<Vec<&Vec<i64>>> = inputs.iter().map(|t| t.shape.as_ref()).collect();
    let shape = shapes.and_then(|shapes| {
        let first = shapes.first()?;
        let axis = normalize_axis(node.attr_int("axis")?, first.len())?;
        let mut out = (*first).clone();
        out[axis] = 0;
        for s in &shapes {
            if s.len() != out.len() {
                return None;
            }
            out[axis] += s[axis];
        }
        Some(out)
    });
    let value = if shape.as_ref().is_some_and(|s| s.len() == 1) {
        inputs
            .iter()
            .map(|t| t.value.clone())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat())
    } else {
        None
    };
    TypeInfo {
        dtype,
        shape,
        value,
    }
}

fn split(node: &Node, x: &TypeInfo, sizes: &TypeInfo, opset: i64) -> Vec<TypeInfo> {
    let n = node.outputs.len();
    let unknown = vec![TypeInfo::of(x.dtype, None); n];
    let Some(s) = &x.shape else { return unknown };
    let Some(axis) = normalize_axis(node.attr_int("axis").unwrap_or(0), s.len()) else {
        return unknown;
    };
    let parts: Vec<i64> = if opset < 13 {
        node.attr_ints("split")
            .map(|v| v.to_vec())
            .unwrap_or_default()
    } else {
        sizes.value.clone().unwrap_or_default()
    };
    let parts = if parts.is_empty() {
        let each = (s[axis] + n as i64 - 1) / n as i64;
        (0..n as i64)
            .map(|i| each.min(s[axis] - i * each).max(0))
            .collect()
    } else {
        parts
    };
    if parts.len() != n {
        return unknown;
    }
    parts
        .iter()
        .map(|&p| {
            let mut o = s.clone();
            o[axis] = p;
            TypeInfo::of(x.dtype, Some(o))
        })
        .collect()
}

fn slice(node: &Node, inputs: &[TypeInfo], opset: i64) -> TypeInfo {
    let x = inputs.first().cloned().unwrap_or_default();
    let get = |i: usize| inputs.get(i).and_then(|t| t.value.clone());
    let (starts, ends, axes, steps) = if opset < 10 {
        (
            node.attr_ints("starts").map(|v| v.to_vec()),
            node.attr_ints("ends").map(|v| v.to_vec()),
            node.attr_ints("axes").map(|v| v.to_vec()),
            None,
        )
    } else {
        let present = |i: usize| node.inputs.get(i).is_some_and(|n| !n.is_empty());
        (
            get(1),
            get(2),
            if present(3) { get(3) } else { None },
            if present(4) { get(4) } else { None },
        )
    };
    let (Some(shape), Some(starts), Some(ends)) = (x.shape.clone(), starts, ends) else {
        return TypeInfo::of(x.dtype, None);
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
        return TypeInfo::of(x.dtype, None);
    }
    let mut out = shape.clone();
    let mut ranges: Vec<(i64, i64, i64)> = shape.iter().map(|&d| (0, d, 1)).collect();
    for i in 0..axes.len() {
        let Some(a) = normalize_axis(axes[i], shape.len()) else {
            return TypeInfo::of(x.dtype, None);
        };
        let (d, step) = (shape[a], steps[i]);
        if step == 0 {
            return TypeInfo::of(x.dtype, None);
        }
        let clamp = |v: i64, lo: i64, hi: i64| {
            let v = if v < 0 { v.saturating_add(d) } else { v };
            v.clamp(lo, hi)
        };
        let (start, end) = if step > 0 {
            (clamp(starts[i], 0, d), clamp(ends[i], 0, d))
        } else {
            (clamp(starts[i], -1, d - 1), clamp(ends[i], -1, d - 1))
        };
        let (start128, end128, step128) = (start as i128, end as i128, step as i128);
        let len = if step > 0 {
            (end128 - start128 + step128 - 1).div_euclid(step128).max(0)
        } else {
            (start128 - end128 - step128 - 1)
                .div_euclid(-step128)
                .max(0)
        } as i64;
        out[a] = len;
        ranges[a] = (start, len, step);
    }
    let value = match (&x.value, shape.len()) {
        (Some(v), 1) => {
            let (start, len, step) = ranges[0];
            (0..len)
                .map(|k| {
                    let i = start as i128 + k as i128 * step as i128;
                    usize::try_from(i).ok().and_then(|i| v.get(i).copied())
                })
                .collect()
        }
        _ => None,
    };
    TypeInfo {
        dtype: x.dtype,
        shape: Some(out),
        value,
    }
}

fn gather(node: &Node, x: &TypeInfo, indices: &TypeInfo) -> TypeInfo {
    let (Some(s), Some(is)) = (&x.shape, &indices.shape) else {
        return TypeInfo::of(x.dtype, None);
    };
    let Some(axis) = normalize_axis(node.attr_int("axis").unwrap_or(0), s.len()) else {
        return TypeInfo::of(x.dtype, None);
    };
    let mut out = s[..axis].to_vec();
    out.extend(is);
    out.extend(&s[axis + 1..]);
    let value = match (&x.value, &indices.value, s.len()) {
        (Some(v), Some(idx), 1) => idx
            .iter()
            .map(|&i| {
                let i = if i < 0 { i + s[0] } else { i };
                v.get(i as usize).copied()
            })
            .collect(),
        _ => None,
    };
    TypeInfo {
        dtype: x.dtype,
        shape: Some(out),
        value,
    }
}

fn shape_of(node: &Node, x: &TypeInfo) -> TypeInfo {
    let Some(s) = &x.shape else {
        return TypeInfo::of(Some(DataType::I64), x.rank().map(|r| vec![r as i64]));
    };
    let r = s.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(node.attr_int("start").unwrap_or(0));
    let end = clamp(node.attr_int("end").unwrap_or(r));
    let v: Vec<i64> = if start < end {
        s[start..end].to_vec()
    } else {
        vec![]
    };
    TypeInfo::with_value(Some(DataType::I64), vec![v.len() as i64], v)
}

fn constant_of_shape(node: &Node, shape: &TypeInfo) -> TypeInfo {
    let fill = node.attr_tensor("value");
    let dtype = fill.map(|t| t.dtype).unwrap_or(DataType::F32);
    let Some(dims) = &shape.value else {
        return TypeInfo::of(Some(dtype), None);
    };
    let n = dims
        .iter()
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))
        .unwrap_or(i64::MAX);
    let value = fill
        .and_then(|t| t.to_i64_vec())
        .and_then(|v| v.first().copied())
        .filter(|_| dtype.is_integer() && n as usize <= MAX_TRACKED_VALUES)
        .map(|f| vec![f; n as usize]);
    TypeInfo {
        dtype: Some(dtype),
        shape: Some(dims.clone()),
        value,
    }
}

fn range(inputs: &[TypeInfo]) -> TypeInfo {
    let dtype = inputs.first().and_then(|t| t.dtype);
    let scalar = |i: usize| inputs.get(i)?.value.as_ref()?.first().copied();
    match (scalar(0), scalar(1), scalar(2)) {
        (Some(start), Some(limit), Some(delta)) if delta != 0 => {
            let n = ((limit as f64 - start as f64) / delta as f64)
                .ceil()
                .max(0.0) as i64;
            let value = (n as usize <= MAX_TRACKED_VALUES).then(|| {
                (0..n)
                    .map(|k| start.wrapping_add(k.wrapping_mul(delta)))
                    .collect()
            });
            TypeInfo {
                dtype,
                shape: Some(vec![n]),
                value,
            }
        }
        _ => TypeInfo::of(dtype, None),
    }
}

fn reduce_shape(s: &[i64], axes: &[i64], keep: bool) -> Option<Vec<i64>> {
    let axes: Vec<usize> = axes
        .iter()
        .map(|&a| normalize_axis(a, s.len()))
        .collect::<Option<_>>()?;
    Some(
        s.iter()
            .enumerate()
            .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
                (true, true) => Some(1),
                (true, false) => None,
                (false, _) => Some(d),
            })
            .collect(),
    )
}

fn reduce(node: &Node, x: &TypeInfo, axes_input: &TypeInfo, opset: i64) -> TypeInfo {
    let keep = node.attr_int("keepdims").unwrap_or(1) != 0;
    let attr_until = if node.op_type == "ReduceSum" { 13 } else { 18 };
    let has_axes_input = node.inputs.get(1).is_some_and(|n| !n.is_empty());
    let shape = x.shape.as_ref().and_then(|s| {
        let axes = if opset < attr_until {
            node.attr_ints("axes").map(|a| a.to_vec())
        } else if has_axes_input {
            Some(axes_input.value.clone()?)
        } else {
            None
        };
        match axes {
            Some(a) if !a.is_empty() => reduce_shape(s, &a, keep),
            _ if node.attr_int("noop_with_empty_axes").unwrap_or(0) != 0 => Some(s.clone()),
            _ => reduce_shape(s, &(0..s.len() as i64).collect::<Vec<_>>(), keep),
        }
    });
    TypeInfo::of(x.dtype, shape)
}

fn einsum_shape(node: &Node, inputs: &[TypeInfo]) -> Option<Vec<i64>> {
    let eq = node.attr_string("equation")?.replace(' ', "");
    let (lhs, rhs) = eq.split_once("->")?;
    if eq.contains("...") {
        return None;
    }
    let mut sizes: HashMap<char, i64> = HashMap::new();
    for (term, t) in lhs.split(',').zip(inputs) {
        let s = t.shape.as_ref()?;
        if term.len() != s.len() {
            return None;
        }
        for (c, &d) in term.chars().zip(s) {
            let e = sizes.entry(c).or_insert(d);
            if *e == 1 {
                *e = d;
            }
        }
    }
    rhs.chars().map(|c| sizes.get(&c).copied()).collect()
}

fn pad(node: &Node, x: &TypeInfo, pads: &TypeInfo) -> TypeInfo {
    let pads = node
        .attr_ints("pads")
        .map(|p| p.to_vec())
        .or_else(|| pads.value.clone());
    let has_axes = node.inputs.get(3).is_some_and(|n| !n.is_empty());
    let shape = match (&x.shape, pads) {
        (Some(s), Some(p)) if p.len() == 2 * s.len() && !has_axes => s
            .iter()
            .enumerate()
            .map(|(i, &d)| d.checked_add(p[i])?.checked_add(p[i + s.len()]))
            .collect::<Option<_>>(),
        _ => None,
    };
    TypeInfo::of(x.dtype, shape)
}

/// Opset-23 `Attention`: 4-D `[B, H, S, D]` or 3-D `[B, S, H*D]` inputs.
fn attention(node: &Node, inputs: &[TypeInfo]) -> Vec<TypeInfo> {
    let q = inputs.first().cloned().unwrap_or_default();
    let v = inputs.get(2).cloned().unwrap_or_default();
    let shape = match (&q.shape, &v.shape) {
        (Some(qs), Some(vs)) if qs.len() == 4 && vs.len() == 4 => {
            Some(vec![qs[0], qs[1], qs[2], vs[3]])
        }
        (Some(qs), Some(vs)) if qs.len() == 3 && vs.len() == 3 => {
            let q_heads = node.attr_int("q_num_heads").unwrap_or(1);
            let kv_heads = node.attr_int("kv_num_heads").unwrap_or(1).max(1);
            q_heads
                .checked_mul(vs[2] / kv_heads)
                .map(|d| vec![qs[0], qs[1], d])
        }
        _ => None,
    };
    let mut out = vec![TypeInfo::of(q.dtype, shape)];
    out.resize(node.outputs.len().max(1), TypeInfo::default());
    out
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
