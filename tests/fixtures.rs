//! The real fixtures: both exporters' graphs, inline and external weights, against PyTorch outputs.

mod common;

use common::{ditc, ditc_ok, fixtures, GRAPH_FILES, MODELS};
use ditc::onnx::read_model;
use ditc::tensors::read_safetensors;

/// tract's outputs on every case of `io.safetensors` match PyTorch's to relative error 1e-4.
#[test]
fn tract_matches_pytorch_reference_outputs() {
    let Some(dir) = fixtures() else { return };
    for m in MODELS {
        let io = read_safetensors(&dir.join(m).join("io.safetensors")).unwrap();
        for file in GRAPH_FILES {
            let model = read_model(&dir.join(m).join(file)).unwrap();
            common::assert_matches_reference(&model, &io, &format!("{m}/{file}"));
        }
    }
}

/// `ditc convert` then `ditc verify` against the original: relative error at most 1e-6.
#[test]
fn convert_then_verify_is_exact() {
    let Some(dir) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for m in MODELS {
        for file in GRAPH_FILES {
            let src = dir.join(m).join(file);
            let out = tmp.path().join(format!("{m}-{file}"));
            ditc_ok(&[
                "convert",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--no-progress",
            ]);
            assert!(
                out.join("model.onnx.data").is_file(),
                "weights go to external data"
            );
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(manifest["format"], "ditc-manifest");
            assert_eq!(manifest["files"][0]["path"], "model.onnx");
            let converted = out.join("model.onnx");
            let io = dir.join(m).join("io.safetensors");
            let stdout = ditc_ok(&[
                "verify",
                converted.to_str().unwrap(),
                src.to_str().unwrap(),
                "--inputs",
                io.to_str().unwrap(),
                "--prefix",
                "2.",
                "--tolerance",
                "1e-6",
                "--json",
            ]);
            let rows: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
            let max_rel = rows[0]["max_rel"].as_f64().unwrap();
            assert!(max_rel <= 1e-6, "{m}/{file}: {max_rel}");
        }
    }
}

/// Converting twice gives byte-identical bundles (manifest included).
#[test]
fn conversion_is_deterministic() {
    let Some(dir) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = dir.join("wan-tiny/model.dynamo.onnx");
    let mut outputs = Vec::new();
    for i in 0..2 {
        let out = tmp.path().join(format!("run{i}"));
        ditc_ok(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-progress",
        ]);
        outputs.push(out);
    }
    for f in ["model.onnx", "model.onnx.data", "manifest.json"] {
        let a = std::fs::read(outputs[0].join(f)).unwrap();
        let b = std::fs::read(outputs[1].join(f)).unwrap();
        assert!(a == b, "{f} differs between runs");
    }
}

fn kinds(report: &serde_json::Value) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for site in report["attention"].as_array().unwrap() {
        *counts
            .entry(site["kind"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// `ditc inspect --json` finds every attention site with the right kind, for both exporters.
#[test]
fn inspect_classifies_fixture_attention() {
    let Some(dir) = fixtures() else { return };
    // (model, sites per kind, blocks)
    type Expected<'a> = (&'a str, &'a [(&'a str, usize)], usize);
    let expected: [Expected; 3] = [
        (
            "latte-tiny",
            &[("cross", 4), ("spatial", 4), ("temporal", 4)],
            8,
        ),
        ("dit-tiny", &[("spatial", 3)], 3),
        ("wan-tiny", &[("cross", 3), ("full", 3)], 3),
    ];
    for (m, want, blocks) in expected {
        for file in GRAPH_FILES {
            let path = dir.join(m).join(file);
            let stdout = ditc_ok(&["inspect", path.to_str().unwrap(), "--json"]);
            let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
            let got = kinds(&report);
            let want: std::collections::BTreeMap<String, usize> =
                want.iter().map(|(k, n)| (k.to_string(), *n)).collect();
            assert_eq!(got, want, "{m}/{file}");
            assert_eq!(
                report["blocks"].as_array().unwrap().len(),
                blocks,
                "{m}/{file} blocks"
            );
            for site in report["attention"].as_array().unwrap() {
                assert_eq!(site["traced"], true, "{m}/{file}: {site}");
                assert_eq!(site["heads"], 4, "{m}/{file}: 4 heads x 16");
                assert_eq!(site["head_dim"], 16);
            }
        }
    }
    // Geometry of Latte's sites: 8 frames of 8x8 patches, 4 caption tokens.
    let path = dir.join("latte-tiny/model.onnx");
    let report: serde_json::Value =
        serde_json::from_slice(&ditc(&["inspect", path.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    for site in report["attention"].as_array().unwrap() {
        let (q, k, batch) = (&site["query_len"], &site["key_len"], &site["batch"]);
        match site["kind"].as_str().unwrap() {
            "spatial" => assert_eq!((q, k, batch), (&64.into(), &64.into(), &8.into())),
            "temporal" => assert_eq!((q, k, batch), (&8.into(), &8.into(), &64.into())),
            "cross" => assert_eq!((q, k), (&64.into(), &4.into())),
            other => panic!("unexpected kind {other}"),
        }
        // 2 products x batch x heads x Sq x Sk x head_dim
        let flops =
            2 * 2 * batch.as_u64().unwrap() * 4 * q.as_u64().unwrap() * k.as_u64().unwrap() * 16;
        assert_eq!(site["flops"].as_u64().unwrap(), flops);
    }
    assert_eq!(report["parameters"]["count"], 521552);
}
