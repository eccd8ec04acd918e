//! Writing the IR as ONNX: one `.onnx` file plus, for large initializers, one `<name>.onnx.data`.
//!
//! Initializers at or above [`WriteOptions::external_threshold`] bytes are streamed, 64-byte aligned,
//! into a single external data file beside the graph; the graph file then stays far below protobuf's
//! 2 GB limit whatever the weights weigh. Everything is written through [`crate::output::Staging`], so
//! a failure leaves no partial file behind.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use prost::Message;

use super::external::release_pages;
use super::proto;
use crate::finite::{ChunkScan, StreamCheck};
use crate::ir::{
    AttrValue, Attribute, Dim, Graph, Model, Node, Tensor, TensorData, ValueInfo, ValueType,
};
use crate::output::{HashingWriter, Staging};

/// Bytes per write and per hashing step while streaming weights.
const CHUNK: usize = 8 << 20;
/// Chunks the hashing thread may lag behind the writer (bounds the resident source pages).
const HASH_LAG: usize = 8;

/// Stream `tensors` into `file`, 64-byte aligned, recording each one's `(offset, length)`; returns the
/// file's size and SHA-256. Chunks are written straight from the (memory-mapped) source, while a
/// second thread hashes the same chunks and then releases their pages, so hashing overlaps I/O and
/// resident memory stays at a few chunks whatever the model weighs. The tensors `finite` names are
/// scanned for NaN/Inf on that thread too, beside the hash (see [`crate::finite`]); on a bad value the
/// writer stops and the refusal is returned (the caller's staging then removes the partial file).
fn stream_weights(
    tensors: &[&Tensor],
    file: std::fs::File,
    data_name: &str,
    bar: &indicatif::ProgressBar,
    locations: &mut HashMap<String, (u64, u64)>,
    finite: Option<&StreamCheck>,
) -> Result<(u64, String)> {
    use sha2::Digest;
    let (send, recv) = std::sync::mpsc::sync_channel::<Chunk>(HASH_LAG);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let stop = &stop;
        let hasher = scope.spawn(move || {
            let mut h = sha2::Sha256::new();
            let mut bad = None;
            for (chunk, scan) in recv {
                if bad.is_none() {
                    let found = match scan {
                        Some((i, scan)) => {
                            let (_, found) = rayon::join(|| h.update(&chunk), || scan.run(&chunk));
                            found.map(|f| (i, f))
                        }
                        None => {
                            h.update(&chunk);
                            None
                        }
                    };
                    if found.is_some() {
                        stop.store(true, Ordering::Relaxed);
                        bad = found;
                    }
                }
                release_pages(&chunk);
            }
            (crate::output::hex(&h.finalize()), bad)
        });
        let mut sink = Sink {
            file,
            position: 0,
            hasher: send,
            stop,
            data_name,
        };
        let result = (|| -> Result<()> {
            for (i, t) in tensors.iter().enumerate() {
                let pad = (ALIGNMENT - sink.position % ALIGNMENT) % ALIGNMENT;
                if pad > 0 {
                    sink.write(bytes::Bytes::from(vec![0u8; pad as usize]), None, "padding")?;
                }
                let offset = sink.position;
                let raw = t.raw().expect("filtered to raw tensors");
                for start in (0..raw.len()).step_by(CHUNK) {
                    let chunk = raw.slice(start..(start + CHUNK).min(raw.len()));
                    let len = chunk.len() as u64;
                    let scan = finite.and_then(|f| f.chunk(t, start)).map(|s| (i, s));
                    sink.write(chunk, scan, &t.name)?;
                    bar.inc(len);
                }
                locations.insert(t.name.clone(), (offset, raw.len() as u64));
            }
            Ok(())
        })();
        let position = sink.position;
        drop(sink); // closes the channel, so the hasher finishes
        let (sha256, bad) = hasher.join().expect("the hashing thread does not panic");
        if let (Some((i, (element, kind))), Some(finite)) = (bad, finite) {
            return Err(finite.refusal(tensors[i], element, kind));
        }
        result.map(|()| (position, sha256))
    })
}

/// A chunk of the data file, and where to scan it for non-finite values (tensor index and scan).
type Chunk = (bytes::Bytes, Option<(usize, ChunkScan)>);

/// The external data file being written, and the channel to the thread hashing it.
struct Sink<'a> {
    file: std::fs::File,
    position: u64,
    hasher: std::sync::mpsc::SyncSender<Chunk>,
    /// Set by the hashing thread when it found a non-finite weight.
    stop: &'a AtomicBool,
    data_name: &'a str,
}

impl Sink<'_> {
    fn write(
        &mut self,
        chunk: bytes::Bytes,
        scan: Option<(usize, ChunkScan)>,
        what: &str,
    ) -> Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            bail!(
                "stopped writing {}: a non-finite weight was found",
                self.data_name
            );
        }
        self.file
            .write_all(&chunk)
            .with_context(|| format!("writing '{what}' to {}", self.data_name))?;
        self.position += chunk.len() as u64;
        // A send fails only if the hasher panicked, which join() reports.
        let _ = self.hasher.send((chunk, scan));
        Ok(())
    }
}

/// Protobuf's hard limit on one message.
pub const PROTOBUF_LIMIT: u64 = 2 * 1024 * 1024 * 1024 - 1;
const ALIGNMENT: u64 = 64;

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Initializers with at least this many bytes go to the external data file.
    pub external_threshold: u64,
    /// Show a progress bar while streaming weights.
    pub progress: bool,
    /// Scan these streamed weights for NaN/Inf and refuse them (`convert`; see [`crate::finite`]).
    pub finite: Option<StreamCheck>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            external_threshold: 1024,
            progress: true,
            finite: None,
        }
    }
}

/// What [`write_model`] wrote: file names (relative to the staging folder), sizes and SHA-256 hashes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WrittenFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Write `model` as `file_name` (+ `file_name.data` when any initializer is large) into `staging`.
pub fn write_model(
    model: &Model,
    staging: &mut Staging,
    file_name: &str,
    options: &WriteOptions,
) -> Result<Vec<WrittenFile>> {
    let data_name = format!("{file_name}.data");
    // Initializer names are unique across a model (ONNX values are SSA, subgraphs included).
    let mut locations: HashMap<String, (u64, u64)> = HashMap::new();
    let mut written = Vec::new();

    let large: Vec<&Tensor> = all_initializers(&model.graph)
        .into_iter()
        .filter(|t| is_streamed(t, options.external_threshold))
        .collect();
    let total: u64 = large.iter().map(|t| t.byte_len()).sum();
    staging.ensure_free_space(total)?;
    if !large.is_empty() {
        let file = staging.create(&data_name)?;
        let bar = crate::progress::bytes_bar(total, "writing weights", options.progress);
        let (bytes, sha256) = stream_weights(
            &large,
            file,
            &data_name,
            &bar,
            &mut locations,
            options.finite.as_ref(),
        )?;
        bar.finish_and_clear();
        written.push(WrittenFile {
            path: data_name.clone(),
            bytes,
            sha256,
        });
    }

    let proto = model_to_proto(model, &|t: &Tensor| {
        locations
            .get(&t.name)
            .map(|&(offset, length)| (data_name.clone(), offset, length))
    });
    let len = proto.encoded_len() as u64;
    if len > PROTOBUF_LIMIT {
        bail!("the graph would be {len} bytes, above protobuf's 2 GB limit: lower the external-data threshold");
    }
    let file = staging.create(file_name)?;
    let mut out = HashingWriter::new(std::io::BufWriter::new(file));
    out.write_all(&proto.encode_to_vec())?;
    let (bytes, sha256, inner) = out.finish();
    inner.into_inner().map_err(|e| e.into_error())?;
    written.insert(
        0,
        WrittenFile {
            path: file_name.to_string(),
            bytes,
            sha256,
        },
    );
    Ok(written)
}

/// True when [`write_model`] streams `t` into the external data file (raw data of at least
/// `external_threshold` bytes) rather than writing it inline in the graph.
pub fn is_streamed(t: &Tensor, external_threshold: u64) -> bool {
    matches!(t.data, TensorData::Raw(_)) && t.byte_len() >= external_threshold
}

/// Serialize with every tensor inline (for handing a model to an in-process runtime).
pub fn model_to_bytes_inline(model: &Model) -> Result<Vec<u8>> {
    let proto = model_to_proto(model, &|_| None);
    let len = proto.encoded_len() as u64;
    if len > PROTOBUF_LIMIT {
        bail!("the model is {len} bytes with weights inline, above protobuf's 2 GB limit");
    }
    Ok(proto.encode_to_vec())
}

fn all_initializers(graph: &Graph) -> Vec<&Tensor> {
    let mut out: Vec<&Tensor> = graph.initializers.iter().collect();
    for node in &graph.nodes {
        for sub in node.subgraphs() {
            out.extend(all_initializers(sub));
        }
    }
    out
}

/// Where a tensor was written externally: `(location, offset, length)`.
type ExternalLookup<'a> = dyn Fn(&Tensor) -> Option<(String, u64, u64)> + 'a;

pub fn model_to_proto(model: &Model, external: &ExternalLookup) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: model.ir_version,
        opset_import: model
            .opsets
            .iter()
            .map(|(domain, version)| proto::OperatorSetIdProto {
                domain: domain.clone(),
                version: *version,
            })
            .collect(),
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: model.doc_string.clone(),
        graph: Some(graph_to_proto(&model.graph, external)),
        metadata_props: model
            .metadata
            .iter()
            .map(|(k, v)| proto::StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        training_info: Vec::new(),
        functions: model.functions.clone(),
    }
}

fn graph_to_proto(g: &Graph, external: &ExternalLookup) -> proto::GraphProto {
    proto::GraphProto {
        node: g.nodes.iter().map(|n| node_to_proto(n, external)).collect(),
        name: g.name.clone(),
        initializer: g
            .initializers
            .iter()
            .map(|t| tensor_to_proto(t, external(t)))
            .collect(),
        sparse_initializer: Vec::new(),
        doc_string: g.doc_string.clone(),
        input: g.inputs.iter().map(value_info_to_proto).collect(),
        output: g.outputs.iter().map(value_info_to_proto).collect(),
        value_info: g.value_info.iter().map(value_info_to_proto).collect(),
        quantization_annotation: Vec::new(),
        metadata_props: Vec::new(),
    }
}

/// Nodes as ONNX protos with every tensor inline (for the bodies of local functions, which hold no
/// initializers of their own).
pub fn nodes_to_proto(nodes: &[Node]) -> Vec<proto::NodeProto> {
    nodes.iter().map(|n| node_to_proto(n, &|_| None)).collect()
}

fn node_to_proto(n: &Node, external: &ExternalLookup) -> proto::NodeProto {
    proto::NodeProto {
        input: n.inputs.clone(),
        output: n.outputs.clone(),
        name: n.name.clone(),
        op_type: n.op_type.clone(),
        domain: n.domain.clone(),
        attribute: n
            .attributes
            .iter()
            .map(|a| attribute_to_proto(a, external))
            .collect(),
        doc_string: n.doc_string.clone(),
        ..Default::default()
    }
}

fn attribute_to_proto(a: &Attribute, external: &ExternalLookup) -> proto::AttributeProto {
    use proto::attribute_type as t;
    let mut p = proto::AttributeProto {
        name: a.name.clone(),
        ..Default::default()
    };
    match &a.value {
        AttrValue::Float(f) => (p.r#type, p.f) = (t::FLOAT, Some(*f)),
        AttrValue::Int(i) => (p.r#type, p.i) = (t::INT, Some(*i)),
        AttrValue::String(s) => (p.r#type, p.s) = (t::STRING, s.clone()),
        AttrValue::Tensor(tensor) => {
            (p.r#type, p.t) = (t::TENSOR, Some(tensor_to_proto(tensor, None)))
        }
        AttrValue::Graph(g) => (p.r#type, p.g) = (t::GRAPH, Some(graph_to_proto(g, external))),
        AttrValue::Floats(v) => (p.r#type, p.floats) = (t::FLOATS, v.clone()),
        AttrValue::Ints(v) => (p.r#type, p.ints) = (t::INTS, v.clone()),
        AttrValue::Strings(v) => (p.r#type, p.strings) = (t::STRINGS, v.clone()),
        AttrValue::Tensors(v) => {
            p.r#type = t::TENSORS;
            p.tensors = v.iter().map(|x| tensor_to_proto(x, None)).collect();
        }
        AttrValue::Graphs(v) => {
            p.r#type = t::GRAPHS;
            p.graphs = v.iter().map(|g| graph_to_proto(g, external)).collect();
        }
        AttrValue::Other(proto) => return (**proto).clone(),
    }
    p
}

fn value_info_to_proto(v: &ValueInfo) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value, Dimension};
    let ty = match &v.ty {
        ValueType::Tensor { dtype, shape } => proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: dtype.map(|d| d.onnx_code()).unwrap_or(0),
                    shape: shape.as_ref().map(|dims| proto::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                value: match d {
                                    Dim::Value(x) => Some(Value::DimValue(*x)),
                                    Dim::Param(p) => Some(Value::DimParam(p.clone())),
                                    Dim::Unknown => None,
                                },
                                denotation: String::new(),
                            })
                            .collect(),
                    }),
                },
            )),
            denotation: String::new(),
        },
        ValueType::Other(p) => p.clone(),
    };
    proto::ValueInfoProto {
        name: v.name.clone(),
        r#type: Some(ty),
        doc_string: v.doc_string.clone(),
        metadata_props: Vec::new(),
    }
}

fn tensor_to_proto(t: &Tensor, external: Option<(String, u64, u64)>) -> proto::TensorProto {
    let mut p = proto::TensorProto {
        dims: t.dims.clone(),
        data_type: t.dtype.onnx_code(),
        name: t.name.clone(),
        doc_string: t.doc_string.clone(),
        ..Default::default()
    };
    match (&t.data, external) {
        (_, Some((location, offset, length))) => {
            p.data_location = proto::DATA_LOCATION_EXTERNAL;
            p.external_data = [
                ("location", location),
                ("offset", offset.to_string()),
                ("length", length.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| proto::StringStringEntryProto {
                key: k.to_string(),
                value: v,
            })
            .collect();
        }
        (TensorData::Raw(raw), None) => p.raw_data = raw.clone(),
        (TensorData::Strings(s), None) => p.string_data = s.clone(),
    }
    p
}
