//! The real fixtures: both exporters' graphs, inline and external weights, against PyTorch outputs.
//! latte-tiny's `model.onnx` runs from the demo copy in `examples/` (always); the others need
//! `../shared/fixtures` and are reported as ignored without it.

mod common;

use std::path::Path;

use common::{demo, ditc_ok, fixture_graphs_beyond_the_demo, fixtures};
use ditc::onnx::read_model;
use ditc::tensors::read_safetensors;

/// tract's outputs on every case of `io.safetensors` match PyTorch's to relative error 1e-4: the demo
/// model (always), then every other fixture graph.
#[test]
fn tract_matches_pytorch_on_the_demo_model() {
    let dir = demo();
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let model = read_model(&dir.join("model.onnx")).unwrap();
    common::assert_matches_reference(&model, &io, "latte-tiny/model.onnx (demo)");
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn tract_matches_pytorch_reference_outputs() {
    let dir = fixtures();
    for (m, file) in fixture_graphs_beyond_the_demo() {
        let io = read_safetensors(&dir.join(m).join("io.safetensors")).unwrap();
        let model = read_model(&dir.join(m).join(file)).unwrap();
        common::assert_matches_reference(&model, &io, &format!("{m}/{file}"));
    }
}

/// `ditc convert` of `src` then `ditc verify` against it on case 2 of `io`: relative error at most 1e-6.
fn assert_convert_then_verify_is_exact(src: &Path, io: &Path, out: &Path) {
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
    eprintln!(
        "{}: convert then verify, max_rel {max_rel:.2e}",
        src.display()
    );
    assert!(max_rel <= 1e-6, "{}: {max_rel}", src.display());
}

#[test]
fn convert_then_verify_is_exact_on_the_demo_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = demo();
    assert_convert_then_verify_is_exact(
        &dir.join("model.onnx"),
        &dir.join("io.safetensors"),
        &tmp.path().join("demo"),
    );
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn convert_then_verify_is_exact() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    for (m, file) in fixture_graphs_beyond_the_demo() {
        assert_convert_then_verify_is_exact(
            &dir.join(m).join(file),
            &dir.join(m).join("io.safetensors"),
            &tmp.path().join(format!("{m}-{file}")),
        );
    }
}

/// Converting twice gives byte-identical bundles (manifest included).
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn conversion_is_deterministic() {
    let dir = fixtures();
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

/// `ditc inspect --json` on `path`: sites per kind (all traced, 4 heads x 16) and the number of blocks.
fn assert_inspect_finds(path: &Path, want: &[(&str, usize)], blocks: usize) -> serde_json::Value {
    let what = path.display();
    let stdout = ditc_ok(&["inspect", path.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let want: std::collections::BTreeMap<String, usize> =
        want.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    eprintln!(
        "{what}: sites {:?} in {} blocks",
        kinds(&report),
        report["blocks"].as_array().unwrap().len()
    );
    assert_eq!(kinds(&report), want, "{what}");
    assert_eq!(
        report["blocks"].as_array().unwrap().len(),
        blocks,
        "{what} blocks"
    );
    for site in report["attention"].as_array().unwrap() {
        assert_eq!(site["traced"], true, "{what}: {site}");
        assert_eq!(site["heads"], 4, "{what}: 4 heads x 16");
        assert_eq!(site["head_dim"], 16);
    }
    report
}

const LATTE_SITES: [(&str, usize); 3] = [("cross", 4), ("spatial", 4), ("temporal", 4)];

/// `ditc inspect --json` finds every attention site of the demo model with the right kind and geometry.
#[test]
fn inspect_classifies_the_demo_model() {
    let report = assert_inspect_finds(&demo().join("model.onnx"), &LATTE_SITES, 8);
    // Geometry of Latte's sites: 8 frames of 8x8 patches, 4 caption tokens.
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

/// The same for every other fixture graph, both exporters.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn inspect_classifies_fixture_attention() {
    let dir = fixtures();
    for (m, file) in fixture_graphs_beyond_the_demo() {
        let (want, blocks): (&[(&str, usize)], usize) = match m {
            "latte-tiny" => (&LATTE_SITES, 8),
            "dit-tiny" => (&[("spatial", 3)], 3),
            "wan-tiny" => (&[("cross", 3), ("full", 3)], 3),
            other => panic!("no expectation for {other}"),
        };
        assert_inspect_finds(&dir.join(m).join(file), want, blocks);
    }
}
