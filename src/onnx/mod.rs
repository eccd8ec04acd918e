//! ONNX as an input/output format: protobuf messages, reading (with external data), writing.

pub mod external;
pub mod proto;
mod read;
mod write;

pub use read::{
    attribute_value, model_from_bytes, nodes_from_proto, read_model, tensor_from_proto,
    IR_VERSIONS, MAX_OPSET,
};
pub use write::{
    is_streamed, model_to_bytes_inline, model_to_proto, nodes_to_proto, write_model, WriteOptions,
    WrittenFile, PROTOBUF_LIMIT,
};
