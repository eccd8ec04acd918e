//! The cost model per attention site for a bundle with quantized attention: the manifest's
//! `attention_cost` and `ditc inspect --json`'s `h100_estimate` on latte-tiny quantized by
//! `quantize-attention` (`sage`, and SageSLA after top-k sparse attention), against the closed form
//! from each site's FLOPs: dense = FLOPs / 602 TFLOP/s, estimated = dense / sparse speedup / 1.6.

mod common;

use common::{demo, ditc_ok};
use ditc::analysis::gpu_cost;
use serde_json::Value;

fn convert(dir: &std::path::Path, passes: &str, out: &str) -> (std::path::PathBuf, Value) {
    let r = dir.join(format!("{out}.toml"));
    std::fs::write(&r, format!("name = \"cost\"\nversion = 1\n{passes}")).unwrap();
    let out = dir.join(out);
    ditc_ok(&[
        "convert",
        demo().join("model.onnx").to_str().unwrap(),
        "--recipe",
        r.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert!(ditc::manifest::validate_schema(&m).is_empty(), "schema");
    (out, m)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
}

#[test]
fn quantized_sites_report_the_fp8_int8_factor_in_the_manifest_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let sage = "[[passes]]\nname = \"quantize-attention\"\n[passes.options]\nformat = \"sage\"\nkinds = [\"spatial\"]\n";
    let sla = "[[passes]]\nname = \"sparse-linear-attention\"\n[passes.options]\ntopk = 0.5\nblock_q = 16\nblock_k = 16\nkinds = [\"spatial\"]\n";
    // fp8: amax 1 for the four product inputs of every spatial site (the cost model does not read it).
    let model = ditc::onnx::read_model(&demo().join("model.onnx")).unwrap();
    let map = ditc::analysis::analyse(&model);
    let tensors: serde_json::Map<String, Value> = map
        .attention
        .iter()
        .filter(|s| s.kind.as_str() == "spatial")
        .flat_map(|s| ditc::passes::quantize_attention::fp8_values(&model.graph, s).unwrap())
        .map(|v| (v, serde_json::json!({ "amax": 1.0 })))
        .collect();
    let stats = tmp.path().join("stats.json");
    let doc = serde_json::json!({
        "format": "ditc-calibration", "version": 1, "method": "max",
        "source": "hand-written", "samples": 1, "tensors": tensors,
    });
    std::fs::write(&stats, serde_json::to_vec(&doc).unwrap()).unwrap();
    let fp8 = format!("[[passes]]\nname = \"quantize-attention\"\n[passes.options]\nformat = \"fp8\"\nkinds = [\"spatial\"]\ncalibration_stats = {:?}\n", stats.to_str().unwrap());
    for (label, passes, kept, format, factor) in [
        (
            "sage",
            sage.to_string(),
            None,
            "sage",
            gpu_cost::SAGE_ATTENTION_FACTOR,
        ),
        (
            "sagesla",
            format!("{sla}{sage}"),
            Some(0.5),
            "sage",
            gpu_cost::SAGE_ATTENTION_FACTOR,
        ),
        (
            "fp8",
            fp8.clone(),
            None,
            "fp8",
            gpu_cost::FP8_ATTENTION_FACTOR,
        ),
    ] {
        assert_eq!(factor, 1.6, "README: FlashAttention-3's FP8 over BF16 peak");
        let (out, m) = convert(tmp.path(), &passes, label);
        let sites = m["dit_map"]["attention"].as_array().unwrap();
        let cost = m["attention_cost"].as_array().unwrap();
        assert_eq!(cost.len(), sites.len());
        let json = ditc_ok(&[
            "inspect",
            out.join("model.onnx").to_str().unwrap(),
            "--json",
        ]);
        let inspect: Value = serde_json::from_slice(&json).unwrap();
        let estimates = inspect["h100_estimate"].as_array().unwrap();
        let mut quantized = 0;
        for (site, c) in sites.iter().zip(cost) {
            let flops = site["flops"].as_u64().unwrap();
            let dense = flops as f64 / 602e12 * 1e3;
            assert_eq!(c["flops_dense"].as_u64(), Some(flops));
            assert!(close(c["h100_ms_dense"].as_f64().unwrap(), dense));
            let spatial = site["kind"] == "spatial";
            let (q, factor) = if spatial {
                (Value::from(format), factor)
            } else {
                (Value::Null, 1.0)
            };
            assert_eq!(c["quantized"], q, "{label} site {}", site["id"]);
            assert_eq!(c["quantized_factor"].as_f64(), Some(factor));
            let k = kept.filter(|_| spatial);
            assert_eq!(c["kept_fraction"].as_f64(), k);
            let speedup = k.map_or(1.0, |k| {
                gpu_cost::sparse_speedup(k, site["key_len"].as_i64().unwrap())
            });
            let want = dense / speedup / factor;
            assert!(
                close(c["h100_ms_estimated"].as_f64().unwrap(), want),
                "{label}: {c}"
            );
            quantized += spatial as usize;
            // ditc inspect of the bundle's graph: the same numbers.
            let e = estimates
                .iter()
                .find(|e| {
                    e["dense_ms"].as_f64().is_some_and(|d| close(d, dense))
                        && e["quantized"] == c["quantized"]
                })
                .unwrap_or_else(|| panic!("{label}: inspect has no estimate like {c}"));
            assert!(close(e["estimated_ms"].as_f64().unwrap(), want));
            assert_eq!(e["quantized_factor"].as_f64(), Some(factor));
        }
        assert_eq!(quantized, 4, "latte-tiny's 4 spatial sites");
        println!("{label}: {} sites, {quantized} quantized", cost.len());
    }
}
