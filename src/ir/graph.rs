//! The graph IR: named values, ONNX-style nodes, initializers, graph inputs and outputs.
//!
//! Values are identified by name, as in ONNX. A node input named `""` is an omitted optional input.
//! Subgraphs (the branches of `If`, bodies of `Loop`/`Scan`) are graphs held in node attributes and may
//! use values of the enclosing graph.

use bytes::Bytes;

use super::{DataType, Tensor};
use crate::onnx::proto;

/// A whole model: the main graph plus the model-level fields ONNX carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    /// `(domain, version)`; the default ONNX domain is `""`.
    pub opsets: Vec<(String, i64)>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    pub metadata: Vec<(String, String)>,
    /// Model-local functions, carried verbatim (nodes call them by domain and name).
    pub functions: Vec<proto::FunctionProto>,
    pub graph: Graph,
    /// External data files the tensors were read from (absolute; for provenance, not semantics).
    pub external_files: Vec<std::path::PathBuf>,
}

impl Model {
    /// A model of `graph` importing the default ONNX domain at `opset`, with the IR version ONNX pairs
    /// with that opset and no other metadata (for graphs built in code).
    pub fn new(graph: Graph, opset: i64) -> Model {
        let ir_version = match opset {
            ..=18 => 8,
            19..=20 => 9,
            21..=22 => 10,
            _ => 11,
        };
        Model {
            ir_version,
            opsets: vec![(String::new(), opset)],
            producer_name: String::new(),
            producer_version: String::new(),
            domain: String::new(),
            model_version: 0,
            doc_string: String::new(),
            metadata: Vec::new(),
            functions: Vec::new(),
            graph,
            external_files: Vec::new(),
        }
    }

    /// The opset version of the default (`ai.onnx`) domain.
    pub fn default_opset(&self) -> i64 {
        self.opsets
            .iter()
            .find(|(d, _)| d.is_empty() || d == "ai.onnx")
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub doc_string: String,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// Type annotations of intermediate values (kept as read; not required).
    pub value_info: Vec<ValueInfo>,
    pub initializers: Vec<Tensor>,
    pub nodes: Vec<Node>,
}

impl Graph {
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name == name)
    }

    /// Graph inputs that are not also initializers (the ones a caller must feed).
    pub fn runtime_inputs(&self) -> impl Iterator<Item = &ValueInfo> {
        self.inputs
            .iter()
            .filter(move |i| !self.initializers.iter().any(|t| t.name == i.name))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: ValueType,
    pub doc_string: String,
}

impl ValueInfo {
    pub fn tensor(name: &str, dtype: DataType, shape: Vec<Dim>) -> ValueInfo {
        ValueInfo {
            name: name.to_string(),
            ty: ValueType::Tensor {
                dtype: Some(dtype),
                shape: Some(shape),
            },
            doc_string: String::new(),
        }
    }

    pub fn dtype(&self) -> Option<DataType> {
        match &self.ty {
            ValueType::Tensor { dtype, .. } => *dtype,
            ValueType::Other(_) => None,
        }
    }

    pub fn shape(&self) -> Option<&[Dim]> {
        match &self.ty {
            ValueType::Tensor { shape, .. } => shape.as_deref(),
            ValueType::Other(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueType {
    /// A tensor; `dtype` is `None` when the file leaves it undefined, `shape` is `None` when unknown.
    Tensor {
        dtype: Option<DataType>,
        shape: Option<Vec<Dim>>,
    },
    /// Sequences, maps, optionals, sparse tensors: carried verbatim.
    Other(proto::TypeProto),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Value(i64),
    Param(String),
    Unknown,
}

impl Dim {
    pub fn value(&self) -> Option<i64> {
        match self {
            Dim::Value(v) => Some(*v),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Value(v) => write!(f, "{v}"),
            Dim::Param(p) => write!(f, "{p}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    pub doc_string: String,
}

impl Node {
    pub fn new(name: &str, op_type: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.to_string(),
            op_type: op_type.to_string(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            ..Node::default()
        }
    }

    pub fn with_attr(mut self, name: &str, value: AttrValue) -> Node {
        self.attributes.push(Attribute {
            name: name.to_string(),
            value,
        });
        self
    }

    /// True for ops of the default ONNX domain.
    pub fn is_onnx(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttrValue::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttrValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    pub fn attr_string(&self, name: &str) -> Option<String> {
        match self.attr(name)? {
            AttrValue::String(s) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }

    pub fn attr_tensor(&self, name: &str) -> Option<&Tensor> {
        match self.attr(name)? {
            AttrValue::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Subgraphs held in attributes (If branches, Loop/Scan bodies).
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.attributes.iter().flat_map(|a| match &a.value {
            AttrValue::Graph(g) => std::slice::from_ref(g).iter(),
            AttrValue::Graphs(gs) => gs.iter(),
            _ => [].iter(),
        })
    }

    /// The present (non-empty) inputs.
    pub fn present_inputs(&self) -> impl Iterator<Item = &str> {
        self.inputs
            .iter()
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }

    /// A readable label for error messages: `'name' (Op)`.
    pub fn label(&self) -> String {
        format!("'{}' ({})", self.name, self.op_type)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Bytes),
    Tensor(Tensor),
    Graph(Graph),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Bytes>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    /// Anything else (type protos, sparse tensors, references to function attributes): verbatim.
    Other(Box<proto::AttributeProto>),
}
