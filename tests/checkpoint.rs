//! Diffusers checkpoint folders: single-file and sharded reads agree; broken and hostile files fail with
//! an error naming the file and tensor, never a panic or a huge allocation.

mod common;

use std::path::Path;

use common::ditc;
use ditc::checkpoint::{Checkpoint, INDEX, WEIGHTS};

/// A safetensors file from (name, dtype, shape, data offsets) entries and a data section.
fn safetensors_bytes(entries: &[(&str, &str, &[u64], [u64; 2])], data: &[u8]) -> Vec<u8> {
    let fields: Vec<String> = entries
        .iter()
        .map(|(n, d, s, o)| {
            format!(
                r#""{n}":{{"dtype":"{d}","shape":{s:?},"data_offsets":[{},{}]}}"#,
                o[0], o[1]
            )
        })
        .collect();
    let header = format!("{{{}}}", fields.join(","));
    [
        &(header.len() as u64).to_le_bytes()[..],
        header.as_bytes(),
        data,
    ]
    .concat()
}

fn folder(files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"_class_name": "LatteTransformer3DModel"}"#,
    )
    .unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7) as u8).collect()
}

#[test]
fn sharded_and_single_file_give_the_same_tensors() {
    let single = folder(&[(
        WEIGHTS,
        safetensors_bytes(
            &[("a", "F32", &[2], [0, 8]), ("b", "BF16", &[3], [8, 14])],
            &data(14),
        ),
    )]);
    let d = data(14);
    let sharded = folder(&[
        ("s-00001.safetensors", safetensors_bytes(&[("a", "F32", &[2], [0, 8])], &d[..8])),
        ("s-00002.safetensors", safetensors_bytes(&[("b", "BF16", &[3], [0, 6])], &d[8..])),
        (INDEX, br#"{"metadata": {}, "weight_map": {"a": "s-00001.safetensors", "b": "s-00002.safetensors"}}"#.to_vec()),
    ]);
    let a = Checkpoint::open(single.path()).unwrap();
    let b = Checkpoint::open(sharded.path()).unwrap();
    assert_eq!(a.tensors, b.tensors);
    assert_eq!(b.files.len(), 2);
    assert_eq!(a.class_name, "LatteTransformer3DModel");
}

#[test]
fn the_latte_checkpoint_matches_its_onnx_export() {
    let dir = common::demo();
    let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let onnx = ditc::onnx::read_model(&dir.join("model.onnx")).unwrap();
    let onnx_params: u64 = onnx.graph.initializers.iter().map(|t| t.numel()).sum();
    assert_eq!(ckpt.parameters(), onnx_params);
    assert_eq!(ckpt.tensors.len(), 151);
}

/// Opening `dir` fails with a message containing every string of `expect`, and `ditc inspect` exits 2.
fn assert_fails(dir: &Path, expect: &[&str], what: &str) {
    let err = match Checkpoint::open(dir) {
        Ok(_) => panic!("{what}: opened"),
        Err(e) => format!("{e:#}"),
    };
    for e in expect {
        assert!(err.contains(e), "{what}: expected '{e}' in: {err}");
    }
    let r = ditc(&["inspect", dir.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(2),
        "{what}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn hostile_checkpoints_fail_cleanly() {
    let good = safetensors_bytes(&[("a", "F32", &[2], [0, 8])], &data(8));
    let index = |map: &str| format!(r#"{{"weight_map": {map}}}"#).into_bytes();
    // (what, files of the folder, what the error must say: the file, the tensor and the reason)
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "absurd header size",
            vec![(WEIGHTS, [&u64::MAX.to_le_bytes()[..], b"{}"].concat())],
            &[
                WEIGHTS,
                "header size 18446744073709551615 bytes runs beyond the end of the file (10 bytes)",
            ],
        ),
        (
            "header beyond the file",
            vec![(WEIGHTS, [&1000u64.to_le_bytes()[..], b"{}"].concat())],
            &[
                WEIGHTS,
                "header size 1000 bytes runs beyond the end of the file",
            ],
        ),
        (
            "file shorter than the header size",
            vec![(WEIGHTS, vec![1, 2, 3])],
            &[WEIGHTS, "3 bytes, too short for the 8-byte header size"],
        ),
        (
            "offsets out of bounds",
            vec![(
                WEIGHTS,
                safetensors_bytes(&[("a", "F32", &[2], [0, 800])], &data(8)),
            )],
            &[
                WEIGHTS,
                "tensor 'a'",
                "data_offsets [0, 800] run beyond the end of the data (8 bytes)",
            ],
        ),
        (
            "reversed offsets",
            vec![(
                WEIGHTS,
                safetensors_bytes(&[("a", "F32", &[2], [8, 0])], &data(8)),
            )],
            &[WEIGHTS, "tensor 'a'", "data_offsets [8, 0] are reversed"],
        ),
        (
            "overlapping offsets",
            vec![(
                WEIGHTS,
                safetensors_bytes(
                    &[("a", "F32", &[2], [0, 8]), ("b", "F32", &[2], [4, 12])],
                    &data(12),
                ),
            )],
            &[
                WEIGHTS,
                "tensor 'b' (bytes 4..12) overlaps tensor 'a' (bytes 0..8)",
            ],
        ),
        (
            "length != dtype x shape",
            vec![(
                WEIGHTS,
                safetensors_bytes(&[("a", "F32", &[3], [0, 8])], &data(8)),
            )],
            &[WEIGHTS, "tensor 'a'", "hold 8 bytes, but F32 [3] needs 12"],
        ),
        (
            "unknown dtype",
            vec![(
                WEIGHTS,
                safetensors_bytes(&[("a", "Q7", &[2], [0, 8])], &data(8)),
            )],
            &[WEIGHTS, "tensor 'a' has unknown dtype 'Q7'"],
        ),
        (
            "missing shard",
            vec![(INDEX, index(r#"{"a": "gone.safetensors"}"#))],
            &[INDEX, "shard 'gone.safetensors'", "is missing"],
        ),
        (
            "tensor named twice",
            vec![
                ("s1.safetensors", good.clone()),
                (
                    INDEX,
                    index(r#"{"a": "s1.safetensors", "a": "s2.safetensors"}"#),
                ),
            ],
            &[INDEX, "names tensor 'a' twice"],
        ),
        (
            "unlisted tensor",
            vec![
                (
                    "s1.safetensors",
                    safetensors_bytes(
                        &[("a", "F32", &[2], [0, 8]), ("z", "F32", &[1], [8, 12])],
                        &data(12),
                    ),
                ),
                (INDEX, index(r#"{"a": "s1.safetensors"}"#)),
            ],
            &[
                "s1.safetensors",
                "tensor 'z' is not listed for this shard in the index",
            ],
        ),
        (
            "listed tensor missing",
            vec![
                ("s1.safetensors", good.clone()),
                (
                    INDEX,
                    index(r#"{"a": "s1.safetensors", "q": "s1.safetensors"}"#),
                ),
            ],
            &[
                "s1.safetensors",
                "lists tensor 'q' here, but the shard does not have it",
            ],
        ),
        (
            "shard path traversal",
            vec![(INDEX, index(r#"{"a": "../s1.safetensors"}"#))],
            &[
                INDEX,
                "shard '../s1.safetensors' must be a file name in the checkpoint folder",
            ],
        ),
        (
            "garbage index",
            vec![(INDEX, b"{not json".to_vec())],
            &[INDEX, "is not a valid shard index"],
        ),
    ];
    for (what, files, expect) in cases {
        let dir = folder(&files);
        assert_fails(dir.path(), expect, what);
    }
    let no_class = folder(&[(WEIGHTS, good)]);
    std::fs::write(no_class.path().join("config.json"), "{}").unwrap();
    assert_fails(
        no_class.path(),
        &["config.json", "has no \"_class_name\""],
        "config without class",
    );
}
