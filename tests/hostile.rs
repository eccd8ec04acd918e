//! Broken and hostile files: every one gives a clear error and a non-zero exit, never a panic, and
//! never leaves output behind.

mod common;

use std::path::Path;

use common::ditc;
use ditc::onnx::proto::{
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TypeProto, ValueInfoProto, DATA_LOCATION_EXTERNAL,
};
use prost::Message;

fn value(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: None,
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// y = x + w, with w a [4] f32 initializer.
fn valid_model() -> ModelProto {
    ModelProto {
        ir_version: 9,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "g".into(),
            node: vec![node("add", "Add", &["x", "w"], &["y"])],
            initializer: vec![TensorProto {
                name: "w".into(),
                dims: vec![4],
                data_type: 1,
                raw_data: vec![0u8; 16].into(),
                ..Default::default()
            }],
            input: vec![value("x")],
            output: vec![value("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_weight(f: impl FnOnce(&mut TensorProto)) -> Vec<u8> {
    let mut m = valid_model();
    f(&mut m.graph.as_mut().unwrap().initializer[0]);
    m.encode_to_vec()
}

fn external(location: &str, offset: u64, length: u64) -> Vec<u8> {
    with_weight(|t| {
        t.raw_data = Default::default();
        t.data_location = DATA_LOCATION_EXTERNAL;
        t.external_data = [
            ("location", location.to_string()),
            ("offset", offset.to_string()),
            ("length", length.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| StringStringEntryProto {
            key: k.into(),
            value: v,
        })
        .collect();
    })
}

fn with_nodes(nodes: Vec<NodeProto>) -> Vec<u8> {
    let mut m = valid_model();
    m.graph.as_mut().unwrap().node = nodes;
    m.encode_to_vec()
}

/// (file name, bytes, what the error must say: the tensor or node at fault and the reason)
type Case = (&'static str, Vec<u8>, &'static [&'static str]);

fn corpus() -> Vec<Case> {
    let valid = valid_model().encode_to_vec();
    let mut random = Vec::new();
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..4096 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        random.push(state as u8);
    }
    // ir_version 9, then field 7 (the graph, length-delimited) claiming 2^28 - 1 bytes where 16 follow.
    let lying_length = [&[0x08, 9, 0x3a, 0xff, 0xff, 0xff, 0x7f][..], &[0u8; 16]].concat();
    vec![
        ("empty.onnx", vec![], &["the file is empty"]),
        (
            "truncated.onnx",
            valid[..valid.len() / 2].to_vec(),
            &["protobuf decoding failed"],
        ),
        ("random.onnx", random, &["protobuf decoding failed"]),
        (
            "lying-length.onnx",
            lying_length,
            &["protobuf decoding failed"],
        ),
        (
            "short-raw-data.onnx",
            with_weight(|t| t.dims = vec![1000, 1000]),
            &["tensor 'w'", "data has 16 bytes", "needs 4000000"],
        ),
        (
            "negative-dims.onnx",
            with_weight(|t| t.dims = vec![-4]),
            &["tensor 'w'", "negative dimension -4"],
        ),
        (
            "overflowing-dims.onnx",
            with_weight(|t| t.dims = vec![1 << 40, 1 << 40]),
            &["tensor 'w'", "more than 2^64 elements"],
        ),
        (
            "unknown-dtype.onnx",
            with_weight(|t| t.data_type = 99),
            &["tensor 'w'", "unknown data type 99"],
        ),
        (
            "traversal.onnx",
            external("../secret.bin", 0, 16),
            &["tensor 'w'", "'../secret.bin' escapes the model folder"],
        ),
        (
            "absolute.onnx",
            external("/etc/passwd", 0, 16),
            &["tensor 'w'", "'/etc/passwd' must be a relative path"],
        ),
        (
            "missing-data.onnx",
            external("missing.bin", 0, 16),
            &["tensor 'w'", "missing.bin' does not exist"],
        ),
        (
            "beyond-end.onnx",
            external("weights.bin", 8, 16),
            &[
                "tensor 'w'",
                "offset 8 + length 16",
                "beyond the file's 16 bytes",
            ],
        ),
        (
            "wrong-length.onnx",
            external("weights.bin", 0, 12),
            &["tensor 'w'", "data has 12 bytes", "needs 16"],
        ),
        (
            "cyclic.onnx",
            with_nodes(vec![
                node("a", "Add", &["x", "u"], &["t"]),
                node("b", "Relu", &["t"], &["u"]),
                node("c", "Relu", &["t"], &["y"]),
            ]),
            &["cycle: 'a' (Add) -> 'b' (Relu) -> 'a' (Add)"],
        ),
        (
            "duplicate-values.onnx",
            with_nodes(vec![
                node("a", "Relu", &["x"], &["y"]),
                node("b", "Relu", &["x"], &["y"]),
            ]),
            &["value 'y' is defined twice", "node 'b' (Relu)"],
        ),
        (
            "undefined-input.onnx",
            with_nodes(vec![node("a", "Add", &["x", "ghost"], &["y"])]),
            &["node 'a' (Add) uses 'ghost', which nothing defines"],
        ),
        (
            "no-graph.onnx",
            ModelProto {
                ir_version: 9,
                opset_import: valid_model().opset_import,
                ..Default::default()
            }
            .encode_to_vec(),
            &["the model has no graph"],
        ),
        (
            "future-ir.onnx",
            ModelProto {
                ir_version: 99,
                ..valid_model()
            }
            .encode_to_vec(),
            &["IR version 99 is not supported"],
        ),
    ]
}

fn assert_clean_failure(args: &[&str], expect: &[&str], what: &str) {
    eprintln!("case: {what}"); // shown with the failure
    common::assert_refused(args, expect);
}

#[test]
fn broken_models_fail_cleanly_without_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("models");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("weights.bin"), [0u8; 16]).unwrap();
    std::fs::write(tmp.path().join("secret.bin"), [0u8; 16]).unwrap();
    for (name, bytes, expect) in corpus() {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let p = path.to_str().unwrap();
        let expect: Vec<&str> = [p].iter().chain(expect).copied().collect();
        let expect = &expect[..];
        assert_clean_failure(&["inspect", p], expect, name);
        let out = tmp.path().join(format!("out-{name}"));
        assert_clean_failure(
            &["convert", p, "-o", out.to_str().unwrap(), "--no-progress"],
            expect,
            name,
        );
        assert!(!out.exists(), "{name}: convert left {}", out.display());
        assert!(!Path::new(&format!("{p}.data")).exists());
    }
    // The valid model itself goes through, so the corpus failures are about the damage.
    let path = dir.join("valid.onnx");
    std::fs::write(&path, valid_model().encode_to_vec()).unwrap();
    let out = tmp.path().join("out-valid");
    assert!(ditc(&[
        "convert",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap()
    ])
    .status
    .success());
}

#[test]
fn failed_conversion_leaves_an_existing_folder_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let bad = tmp.path().join("bad.onnx");
    std::fs::write(&bad, b"not a model").unwrap();
    let r = ditc(&[
        "convert",
        bad.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")]);
}

#[test]
fn missing_paths_and_folders_are_errors() {
    assert_clean_failure(
        &["inspect", "/nonexistent/model.onnx"],
        &["cannot open '/nonexistent/model.onnx'"],
        "missing file",
    );
    let tmp = tempfile::tempdir().unwrap();
    assert_clean_failure(
        &["inspect", tmp.path().to_str().unwrap()],
        &[tmp.path().to_str().unwrap(), "folder"],
        "a folder",
    );
}

#[test]
fn broken_tensor_files_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.onnx");
    std::fs::write(&model, valid_model().encode_to_vec()).unwrap();
    let m = model.to_str().unwrap();
    let cases: Vec<(&str, Vec<u8>, &[&str])> =
        vec![
        (
            "empty.safetensors",
            vec![],
            &["0 bytes, too short for the 8-byte header size"],
        ),
        (
            "huge-header.safetensors",
            [&u64::MAX.to_le_bytes()[..], b"{}"].concat(),
            &["header size 18446744073709551615 bytes runs beyond the end of the file (10 bytes)"],
        ),
        ("lying-offsets.safetensors", {
            let header = br#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}}"#;
            [&(header.len() as u64).to_le_bytes()[..], header, &[0u8; 16]].concat()
        }, &["tensor 'x'", "data_offsets [0, 1000] run beyond the end of the data (16 bytes)"]),
    ];
    for (name, bytes, reason) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let p = path.to_str().unwrap();
        let expect: Vec<&str> = [p, "is not a valid safetensors file"]
            .iter()
            .chain(reason)
            .copied()
            .collect();
        let out = tmp.path().join("out.safetensors");
        assert_clean_failure(
            &[
                "run",
                m,
                "--inputs",
                path.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
            &expect,
            name,
        );
        assert!(!out.exists());
        assert_clean_failure(&["verify", m, m, "--inputs", p], &expect, name);
    }
}

/// Inputs the fuzzer once crashed on (`tests/data/fuzz-regressions/`): each must now be read and
/// analysed, or rejected, without a panic.
#[test]
fn fuzz_regressions_do_not_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-regressions");
    let empty = tempfile::tempdir().unwrap();
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(model) = ditc::onnx::model_from_bytes(bytes.into(), empty.path()) {
            let _ = ditc::analysis::analyse(&model);
            let _ = ditc::onnx::model_to_bytes_inline(&model);
        }
        count += 1;
    }
    assert!(count > 0);
}
