//! Reading ONNX files into the IR.
//!
//! The file is memory-mapped and decoded with zero-copy `Bytes` fields, external data is mapped
//! lazily (see [`super::external`]), typed data fields (`float_data`, `int64_data`, ...) are converted to
//! the raw layout, every tensor's byte count is checked against its dtype and shape, and the graph is
//! checked (values defined once, uses defined, no cycles) before it is returned.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use prost::Message;

use super::external::{map_file, ExternalData, ExternalRef};
use super::proto;
use crate::ir::{
    check_graph, checked_numel, sort_topologically, AttrValue, Attribute, DataType, Dim, Graph,
    Model, Node, Tensor, TensorData, ValueInfo, ValueType,
};

/// IR versions this reader accepts.
pub const IR_VERSIONS: std::ops::RangeInclusive<i64> = 3..=11;
/// Highest default-domain opset this reader accepts.
pub const MAX_OPSET: i64 = 23;

/// Read an ONNX model file, resolving external data relative to its folder.
pub fn read_model(path: &Path) -> Result<Model> {
    let file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let bytes = map_file(&file).with_context(|| format!("cannot read '{}'", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    model_from_bytes(bytes, dir)
        .with_context(|| format!("'{}' is not a usable ONNX model", path.display()))
}

/// Decode a model from bytes; external data locations are resolved against `model_dir`.
pub fn model_from_bytes(bytes: Bytes, model_dir: &Path) -> Result<Model> {
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    let proto = proto::ModelProto::decode(bytes)
        .context("protobuf decoding failed (truncated or not an ONNX file)")?;
    let mut external = ExternalData::new(model_dir);
    model_from_proto(proto, &mut external)
}

fn model_from_proto(p: proto::ModelProto, external: &mut ExternalData) -> Result<Model> {
    if !IR_VERSIONS.contains(&p.ir_version) {
        bail!(
            "IR version {} is not supported (expected {}..={}; re-export with an older onnx, or set \
             model.ir_version if the file uses nothing newer)",
            p.ir_version,
            IR_VERSIONS.start(),
            IR_VERSIONS.end()
        );
    }
    let opsets: Vec<(String, i64)> = p
        .opset_import
        .iter()
        .map(|o| (o.domain.clone(), o.version))
        .collect();
    let default = opsets
        .iter()
        .find(|(d, _)| d.is_empty() || d == "ai.onnx")
        .map(|(_, v)| *v);
    match default {
        None => bail!("the model imports no default-domain (ai.onnx) opset"),
        Some(v) if !(1..=MAX_OPSET).contains(&v) => {
            bail!("opset {v} is not supported (expected 1..={MAX_OPSET})")
        }
        _ => {}
    }
    let Some(graph) = p.graph else {
        bail!("the model has no graph");
    };
    let mut graph = graph_from_proto(graph, external)?;
    check_graph(&graph)?;
    sort_topologically(&mut graph)?;
    Ok(Model {
        ir_version: p.ir_version,
        opsets,
        producer_name: p.producer_name,
        producer_version: p.producer_version,
        domain: p.domain,
        model_version: p.model_version,
        doc_string: p.doc_string,
        metadata: p
            .metadata_props
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect(),
        functions: p.functions,
        graph,
        external_files: external.files(),
    })
}

fn graph_from_proto(g: proto::GraphProto, external: &mut ExternalData) -> Result<Graph> {
    if let Some(s) = g.sparse_initializer.first() {
        let name = s.values.as_ref().map(|v| v.name.as_str()).unwrap_or("?");
        bail!("sparse initializer '{name}' is not supported");
    }
    let initializers = g
        .initializer
        .into_iter()
        .map(|t| tensor_from_proto(t, external))
        .collect::<Result<Vec<_>>>()?;
    let nodes = g
        .node
        .into_iter()
        .map(|n| node_from_proto(n, external))
        .collect::<Result<Vec<_>>>()?;
    Ok(Graph {
        name: g.name,
        doc_string: g.doc_string,
        inputs: g.input.into_iter().map(value_info_from_proto).collect(),
        outputs: g.output.into_iter().map(value_info_from_proto).collect(),
        value_info: g
            .value_info
            .into_iter()
            .map(value_info_from_proto)
            .collect(),
        initializers,
        nodes,
    })
}

/// The nodes of a local function's body as IR nodes (attributes that refer to the caller's
/// attributes stay [`crate::ir::AttrValue::Other`] with their `ref_attr_name`).
pub fn nodes_from_proto(nodes: &[proto::NodeProto]) -> Result<Vec<Node>> {
    // A function body holds no initializers, so no tensor of it can be external.
    let mut external = ExternalData::new(Path::new("."));
    nodes
        .iter()
        .map(|n| node_from_proto(n.clone(), &mut external))
        .collect()
}

/// One attribute's value (a function's default attribute value; tensors inline).
pub fn attribute_value(a: proto::AttributeProto) -> Result<crate::ir::AttrValue> {
    let mut external = ExternalData::new(Path::new("."));
    Ok(attribute_from_proto(a, &mut external)?.value)
}

fn node_from_proto(n: proto::NodeProto, external: &mut ExternalData) -> Result<Node> {
    let label = format!("'{}' ({})", n.name, n.op_type);
    let attributes = n
        .attribute
        .into_iter()
        .map(|a| attribute_from_proto(a, external))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("in node {label}"))?;
    Ok(Node {
        name: n.name,
        op_type: n.op_type,
        domain: n.domain,
        inputs: n.input,
        outputs: n.output,
        attributes,
        doc_string: n.doc_string,
    })
}

fn attribute_from_proto(
    a: proto::AttributeProto,
    external: &mut ExternalData,
) -> Result<Attribute> {
    use proto::attribute_type as t;
    if !a.ref_attr_name.is_empty() {
        return Ok(Attribute {
            name: a.name.clone(),
            value: AttrValue::Other(Box::new(a)),
        });
    }
    let value = match a.r#type {
        t::FLOAT => AttrValue::Float(a.f.unwrap_or(0.0)),
        t::INT => AttrValue::Int(a.i.unwrap_or(0)),
        t::STRING => AttrValue::String(a.s),
        t::TENSOR => match a.t {
            Some(tp) => AttrValue::Tensor(tensor_from_proto(tp, external)?),
            None => bail!("attribute '{}' of type TENSOR has no tensor", a.name),
        },
        t::GRAPH => match a.g {
            Some(g) => AttrValue::Graph(graph_from_proto(g, external)?),
            None => bail!("attribute '{}' of type GRAPH has no graph", a.name),
        },
        t::FLOATS => AttrValue::Floats(a.floats),
        t::INTS => AttrValue::Ints(a.ints),
        t::STRINGS => AttrValue::Strings(a.strings),
        t::TENSORS => AttrValue::Tensors(
            a.tensors
                .into_iter()
                .map(|tp| tensor_from_proto(tp, external))
                .collect::<Result<_>>()?,
        ),
        t::GRAPHS => AttrValue::Graphs(
            a.graphs
                .into_iter()
                .map(|g| graph_from_proto(g, external))
                .collect::<Result<_>>()?,
        ),
        t::SPARSE_TENSOR | t::SPARSE_TENSORS | t::TYPE_PROTO | t::TYPE_PROTOS => {
            return Ok(Attribute {
                name: a.name.clone(),
                value: AttrValue::Other(Box::new(a)),
            })
        }
        other => bail!("attribute '{}' has unknown type {other}", a.name),
    };
    Ok(Attribute {
        name: a.name,
        value,
    })
}

fn value_info_from_proto(v: proto::ValueInfoProto) -> ValueInfo {
    let ty = match v.r#type {
        Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(t)),
            ..
        }) => ValueType::Tensor {
            dtype: DataType::from_onnx_code(t.elem_type),
            shape: t
                .shape
                .map(|s| s.dim.into_iter().map(dim_from_proto).collect()),
        },
        Some(other) => ValueType::Other(other),
        None => ValueType::Tensor {
            dtype: None,
            shape: None,
        },
    };
    ValueInfo {
        name: v.name,
        ty,
        doc_string: v.doc_string,
    }
}

fn dim_from_proto(d: proto::tensor_shape_proto::Dimension) -> Dim {
    use proto::tensor_shape_proto::dimension::Value;
    match d.value {
        Some(Value::DimValue(v)) if v >= 0 => Dim::Value(v),
        Some(Value::DimParam(p)) if !p.is_empty() => Dim::Param(p),
        _ => Dim::Unknown,
    }
}

/// Convert a tensor, resolving external data and checking its byte count against dtype x shape.
pub fn tensor_from_proto(t: proto::TensorProto, external: &mut ExternalData) -> Result<Tensor> {
    let name = t.name.clone();
    let Some(dtype) = DataType::from_onnx_code(t.data_type) else {
        bail!("tensor '{name}' has unknown data type {}", t.data_type);
    };
    if t.segment.is_some() {
        bail!("tensor '{name}' is a segment of a larger tensor, which is not supported");
    }
    if let Some(d) = t.dims.iter().find(|&&d| d < 0) {
        bail!(
            "tensor '{name}' has a negative dimension {d} (dims {:?})",
            t.dims
        );
    }
    let Some(numel) = checked_numel(&t.dims) else {
        bail!(
            "tensor '{name}': dims {:?} hold more than 2^64 elements",
            t.dims
        );
    };
    let data = if t.data_location == proto::DATA_LOCATION_EXTERNAL {
        let r = ExternalRef::parse(&name, &t.external_data)?;
        TensorData::Raw(external.slice(&name, &r)?)
    } else if dtype == DataType::String {
        if t.string_data.len() as u64 != numel {
            bail!(
                "tensor '{name}': {} strings for shape {:?}",
                t.string_data.len(),
                t.dims
            );
        }
        TensorData::Strings(t.string_data)
    } else if !t.raw_data.is_empty() || numel == 0 {
        TensorData::Raw(t.raw_data)
    } else {
        TensorData::Raw(typed_fields_to_raw(&t, dtype, numel)?)
    };
    match data {
        TensorData::Raw(raw) => {
            let mut tensor = Tensor::from_raw(&name, dtype, t.dims, raw)?;
            tensor.doc_string = t.doc_string;
            Ok(tensor)
        }
        TensorData::Strings(s) => Ok(Tensor {
            name,
            dtype,
            dims: t.dims,
            data: TensorData::Strings(s),
            doc_string: t.doc_string,
        }),
    }
}

/// ONNX's typed storage fields, re-encoded as little-endian raw bytes.
fn typed_fields_to_raw(t: &proto::TensorProto, dtype: DataType, numel: u64) -> Result<Bytes> {
    use DataType::*;
    let name = &t.name;
    let (count, raw): (usize, Vec<u8>) = match dtype {
        F32 => (
            t.float_data.len(),
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Complex64 => (
            t.float_data.len() / 2,
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        F64 => (
            t.double_data.len(),
            t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Complex128 => (
            t.double_data.len() / 2,
            t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        I64 => (
            t.int64_data.len(),
            t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        U64 => (
            t.uint64_data.len(),
            t.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        U32 => (
            t.uint64_data.len(),
            t.uint64_data
                .iter()
                .flat_map(|v| (*v as u32).to_le_bytes())
                .collect(),
        ),
        I32 => (
            t.int32_data.len(),
            t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        I16 | U16 | F16 | BF16 => (
            t.int32_data.len(),
            t.int32_data
                .iter()
                .flat_map(|v| (*v as u16).to_le_bytes())
                .collect(),
        ),
        I8 | U8 | Bool | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F8E8M0 => (
            t.int32_data.len(),
            t.int32_data.iter().map(|v| *v as u8).collect(),
        ),
        // 4-bit types: int32_data holds one packed byte (two elements) per entry.
        U4 | I4 | F4E2M1 => (
            t.int32_data.len() * 2,
            t.int32_data.iter().map(|v| *v as u8).collect(),
        ),
        String => unreachable!("strings are handled by the caller"),
    };
    let expected = if matches!(dtype, U4 | I4 | F4E2M1) {
        numel.div_ceil(2) * 2
    } else {
        numel
    };
    if count as u64 != expected {
        bail!(
            "tensor '{name}': holds {count} values, but {dtype} {:?} needs {numel}",
            t.dims
        );
    }
    Ok(Bytes::from(raw))
}
