//! Models beyond protobuf's 2 GB limit: generate one with external data, measure `ditc inspect`'s
//! peak memory on it, convert it, and check every weight byte survived the round trip. Bounds (PASS or
//! FAIL printed; exit status 1 when one is missed): inspect's peak RSS below 64 MB, convert's below
//! 1.5 GB; the wall time is reported, not bounded (it measures the disk and the machine's load).
//!
//! `cargo bench --bench large_model` (3 GiB by default; `-- --gib N` to change, `--dir D` to choose
//! where the ~2x N GiB of files go, default the system temp folder). The files are deleted afterwards.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;
use common::{arg, check, ditc_with_peak_rss, kilobytes};

use ditc::onnx::proto::{
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, DATA_LOCATION_EXTERNAL,
};
use prost::Message;
use sha2::{Digest, Sha256};

/// Each weight is a D x D f32 matrix of 256 MiB.
const D: i64 = 8192;

fn main() {
    let gib: u64 = arg("--gib")
        .map(|s| s.parse().expect("--gib N"))
        .unwrap_or(3);
    let root = arg("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = root.join(format!("ditc-large-model-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let result = std::panic::catch_unwind(|| run(&work, gib));
    let _ = std::fs::remove_dir_all(&work);
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run(work: &Path, gib: u64) {
    let layers = (gib * 4) as usize; // 4 weights of 256 MiB per GiB
    let model = work.join("big.onnx");
    let t = Instant::now();
    let source_hashes = generate(&model, layers);
    let total = layers as u64 * (D * D * 4) as u64;
    println!(
        "generated {} layers, {:.2} GiB of weights in {:.1}s",
        layers,
        total as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );

    let (out, rss) = ditc(&["inspect", model.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["parameters"]["bytes"].as_u64().unwrap(), total);
    println!(
        "inspect: peak RSS {rss} on a {:.2} GiB model",
        total as f64 / (1u64 << 30) as f64
    );
    // inspect reads the graph and the external data's locations, never the weight bytes.
    let inspect_ok = check(kilobytes(&rss) < 64_000, "inspect peak RSS < 64 MB");

    let bundle = work.join("bundle");
    let t = Instant::now();
    let (_, rss) = ditc(&[
        "convert",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--no-progress",
    ]);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "convert: {:.1}s ({:.0} MiB/s; not bounded: machine-dependent), peak RSS {rss}",
        secs,
        total as f64 / secs / (1u64 << 20) as f64
    );
    // Weights stream from the source map to the output; the bound is checkpoint_scale's.
    let convert_ok = check(kilobytes(&rss) < 1_500_000, "convert peak RSS < 1.5 GB");

    let graph_bytes = std::fs::metadata(bundle.join("model.onnx")).unwrap().len();
    let data_bytes = std::fs::metadata(bundle.join("model.onnx.data"))
        .unwrap()
        .len();
    assert!(data_bytes >= total && graph_bytes < 1 << 20);
    let converted = ditc::onnx::read_model(&bundle.join("model.onnx")).unwrap();
    assert_eq!(converted.graph.initializers.len(), layers);
    for (t, want) in converted.graph.initializers.iter().zip(&source_hashes) {
        let got = hex(&Sha256::digest(t.raw().unwrap()));
        assert_eq!(&got, want, "weight '{}' changed in the round trip", t.name);
    }
    println!("round trip: graph {graph_bytes} bytes + data {data_bytes} bytes; all {layers} weights byte-identical (sha256)");
    assert!(
        inspect_ok && convert_ok,
        "a memory bound was missed (FAIL above)"
    );
}

/// Run the ditc binary; returns stdout and the peak RSS it reports.
fn ditc(args: &[&str]) -> (Vec<u8>, String) {
    let (stdout, _, rss) = ditc_with_peak_rss(args);
    (stdout, rss)
}

/// x [1, D] -> MatMul w0 -> ... -> y; weights in `big.onnx.data`, written directly (not by ditc).
fn generate(model: &Path, layers: usize) -> Vec<String> {
    let data = model.with_extension("onnx.data");
    let mut w = BufWriter::with_capacity(16 << 20, File::create(&data).unwrap());
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut hashes = Vec::new();
    let mut initializers = Vec::new();
    let mut chunk = vec![0u8; 16 << 20];
    let bytes_per_layer = (D * D * 4) as usize;
    for l in 0..layers {
        let mut h = Sha256::new();
        for _ in 0..bytes_per_layer / chunk.len() {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // small finite floats: mantissa bits random, exponent fixed
                let v = ((state as u32) & 0x007f_ffff) | 0x3c00_0000;
                word[..4].copy_from_slice(&v.to_le_bytes());
                word[4..].copy_from_slice(&(v ^ 0x0055_5555).to_le_bytes());
            }
            h.update(&chunk);
            w.write_all(&chunk).unwrap();
        }
        hashes.push(hex(&h.finalize()));
        initializers.push(TensorProto {
            name: format!("w{l}"),
            dims: vec![D, D],
            data_type: 1,
            data_location: DATA_LOCATION_EXTERNAL,
            external_data: [
                ("location", "big.onnx.data".to_string()),
                ("offset", (l * bytes_per_layer).to_string()),
                ("length", bytes_per_layer.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v,
            })
            .collect(),
            ..Default::default()
        });
    }
    w.flush().unwrap();
    let nodes = (0..layers)
        .map(|l| NodeProto {
            name: format!("layers.{l}.matmul"),
            op_type: "MatMul".into(),
            input: vec![
                if l == 0 { "x".into() } else { format!("h{l}") },
                format!("w{l}"),
            ],
            output: vec![if l + 1 == layers {
                "y".into()
            } else {
                format!("h{}", l + 1)
            }],
            ..Default::default()
        })
        .collect();
    let value = |name: &str| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: [1, D]
                        .iter()
                        .map(|&d| ditc::onnx::proto::tensor_shape_proto::Dimension {
                            value: Some(
                                ditc::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(
                                    d,
                                ),
                            ),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    };
    let proto = ModelProto {
        ir_version: 10,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "large".into(),
            node: nodes,
            initializer: initializers,
            input: vec![value("x")],
            output: vec![value("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(model, proto.encode_to_vec()).unwrap();
    hashes
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
