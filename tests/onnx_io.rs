//! ONNX write -> read round trips of everything the IR carries: all tensor types (BF16 and FLOAT8
//! included), string tensors, subgraphs with their own initializers, local functions, metadata, and
//! external data either way.

use bytes::Bytes;
use ditc::ir::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, TensorData, ValueInfo};
use ditc::onnx::proto::{FunctionProto, NodeProto, TensorProto};
use ditc::onnx::{read_model, write_model, WriteOptions};
use ditc::output::Staging;

fn tensor(name: &str, dtype: DataType, dims: Vec<i64>) -> Tensor {
    let numel: u64 = dims.iter().map(|&d| d as u64).product();
    let len = dtype.storage_bytes(numel).unwrap() as usize;
    let raw: Vec<u8> = (0..len).map(|i| (i * 31 + name.len()) as u8).collect();
    Tensor::from_raw(name, dtype, dims, Bytes::from(raw)).unwrap()
}

fn model() -> Model {
    use DataType::*;
    let mut initializers: Vec<Tensor> = [
        F32, F16, BF16, F8E4M3FN, F8E5M2, I8, U8, I64, I32, F64, Bool, I4, U4,
    ]
    .iter()
    .map(|&d| tensor(&format!("w_{d}"), d, vec![3, 700]))
    .collect();
    initializers.push(Tensor {
        name: "labels".into(),
        dtype: String,
        dims: vec![2],
        data: TensorData::Strings(vec![Bytes::from("cat"), Bytes::from("dog")]),
        doc_string: "two labels".into(),
    });
    initializers.push(tensor("scalar", F32, vec![]));
    let branch = |name: &str, init: &str| Graph {
        name: name.into(),
        initializers: vec![tensor(init, F32, vec![4096])],
        nodes: vec![Node::new(
            &format!("{name}_id"),
            "Identity",
            &[init],
            &[&format!("{name}_out")],
        )],
        outputs: vec![ValueInfo::tensor(
            &format!("{name}_out"),
            F32,
            vec![Dim::Value(4096)],
        )],
        ..Graph::default()
    };
    let function = FunctionProto {
        name: "Double".into(),
        domain: "custom".into(),
        input: vec!["a".into()],
        output: vec!["b".into()],
        node: vec![NodeProto {
            op_type: "Add".into(),
            input: vec!["a".into(), "a".into()],
            output: vec!["b".into()],
            ..Default::default()
        }],
        opset_import: vec![ditc::onnx::proto::OperatorSetIdProto {
            domain: std::string::String::new(),
            version: 18,
        }],
        ..Default::default()
    };
    Model {
        ir_version: 10,
        opsets: vec![(std::string::String::new(), 18), ("custom".into(), 1)],
        producer_name: "ditc-test".into(),
        producer_version: "1".into(),
        domain: "test".into(),
        model_version: 3,
        doc_string: "round trip".into(),
        metadata: vec![("k".into(), "v".into())],
        functions: vec![function],
        graph: Graph {
            name: "main".into(),
            doc_string: "g".into(),
            inputs: vec![
                ValueInfo::tensor("x", F32, vec![Dim::Param("batch".into()), Dim::Value(3)]),
                ValueInfo::tensor("cond", Bool, vec![]),
            ],
            outputs: vec![
                ValueInfo::tensor("y", F32, vec![Dim::Unknown, Dim::Value(3)]),
                ValueInfo::tensor("z", F32, vec![Dim::Value(4096)]),
            ],
            value_info: vec![ValueInfo::tensor("c", F32, vec![Dim::Value(2)])],
            initializers,
            nodes: vec![
                Node::new("const", "Constant", &[], &["c"])
                    .with_attr("value", AttrValue::Tensor(tensor("c_value", F32, vec![2]))),
                Node {
                    domain: "custom".into(),
                    ..Node::new("double", "Double", &["x"], &["y"])
                },
                Node::new("if", "If", &["cond"], &["z"])
                    .with_attr("then_branch", AttrValue::Graph(branch("then", "then_w")))
                    .with_attr("else_branch", AttrValue::Graph(branch("else", "else_w"))),
            ],
        },
        external_files: vec![],
    }
}

fn round_trip(threshold: u64) -> (Model, Vec<std::path::PathBuf>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut staging = Staging::new(&dir).unwrap();
    let files = write_model(
        &model(),
        &mut staging,
        "m.onnx",
        &WriteOptions {
            external_threshold: threshold,
            progress: false,
            finite: None,
        },
    )
    .unwrap();
    staging.commit().unwrap();
    let back = read_model(&dir.join("m.onnx")).unwrap();
    (back, files.iter().map(|f| dir.join(&f.path)).collect(), tmp)
}

fn without_provenance(mut m: Model) -> Model {
    m.external_files.clear();
    m
}

#[test]
fn inline_round_trip_is_lossless() {
    let (back, files, _tmp) = round_trip(u64::MAX);
    assert_eq!(files.len(), 1, "no external data file");
    assert_eq!(without_provenance(back), model());
}

#[test]
fn external_round_trip_is_lossless_and_zero_copy() {
    let (back, files, _tmp) = round_trip(1024);
    assert_eq!(files.len(), 2);
    assert!(files[1].ends_with("m.onnx.data"));
    assert_eq!(back.external_files.len(), 1);
    // Subgraph initializers went external too; small tensors stayed inline.
    assert_eq!(without_provenance(back.clone()), model());
    let graph_len = std::fs::metadata(&files[0]).unwrap().len();
    assert!(
        graph_len < 8 * 1024,
        "graph file holds no large weights ({graph_len} bytes)"
    );
    // External tensors are slices of one memory map: their bytes lie inside the same mapping.
    let a = back
        .graph
        .initializer("w_f32")
        .unwrap()
        .raw()
        .unwrap()
        .as_ptr() as usize;
    let b = back
        .graph
        .initializer("w_i8")
        .unwrap()
        .raw()
        .unwrap()
        .as_ptr() as usize;
    assert!(
        a.abs_diff(b) < 64 * 1024,
        "weights come from one mapped file"
    );
}

#[test]
fn typed_data_fields_become_raw_little_endian() {
    let mut external = ditc::onnx::external::ExternalData::new(std::path::Path::new("."));
    let f = TensorProto {
        name: "f".into(),
        dims: vec![2],
        data_type: 1,
        float_data: vec![1.5, -2.0],
        ..Default::default()
    };
    let t = ditc::onnx::tensor_from_proto(f, &mut external).unwrap();
    assert_eq!(t.to_f32_vec().unwrap(), vec![1.5, -2.0]);
    let h = TensorProto {
        name: "h".into(),
        dims: vec![1],
        data_type: 10,
        int32_data: vec![0x3C00],
        ..Default::default()
    };
    let t = ditc::onnx::tensor_from_proto(h, &mut external).unwrap();
    assert_eq!(t.to_f32_vec().unwrap(), vec![1.0]);
    let i = TensorProto {
        name: "i".into(),
        dims: vec![3],
        data_type: 7,
        int64_data: vec![1, -2, 3],
        ..Default::default()
    };
    assert_eq!(
        ditc::onnx::tensor_from_proto(i, &mut external)
            .unwrap()
            .to_i64_vec()
            .unwrap(),
        vec![1, -2, 3]
    );
    let short = TensorProto {
        name: "short".into(),
        dims: vec![3],
        data_type: 7,
        int64_data: vec![1],
        ..Default::default()
    };
    let err = ditc::onnx::tensor_from_proto(short, &mut external)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'short'"), "{err}");
}

#[test]
fn external_offsets_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0xAAu8; 100];
    data.extend(2.5f32.to_le_bytes());
    std::fs::write(dir.path().join("w.bin"), &data).unwrap();
    let entries = [("location", "w.bin"), ("offset", "100"), ("length", "4")]
        .iter()
        .map(|(k, v)| ditc::onnx::proto::StringStringEntryProto {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect();
    let t = TensorProto {
        name: "w".into(),
        dims: vec![1],
        data_type: 1,
        data_location: 1,
        external_data: entries,
        ..Default::default()
    };
    let mut external = ditc::onnx::external::ExternalData::new(dir.path());
    let t = ditc::onnx::tensor_from_proto(t, &mut external).unwrap();
    assert_eq!(t.to_f32_vec().unwrap(), vec![2.5]);
}
