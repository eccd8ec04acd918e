//! The graph IR every pass reads and rewrites. ONNX protobuf is only an input/output format.

mod check;
mod dce;
mod dtype;
pub mod functions;
mod graph;
pub mod infer;
mod tensor;

pub use check::{check_graph, sort_topologically, topological_order};
pub use dce::{remove_dead_nodes, remove_unused_initializers, remove_unused_inputs};
pub use dtype::DataType;
pub use graph::{AttrValue, Attribute, Dim, Graph, Model, Node, ValueInfo, ValueType};
pub use infer::{infer_types, TypeInfo, TypeMap};
pub use tensor::{checked_numel, Tensor, TensorData};
