//! Learned SLA weights (`sparse-linear-attention` option `sla_weights`): a wan-tiny checkpoint with
//! random `proj_l` tensors under TurboDiffusion's names, converted with top-k 1.0 and the linear
//! branch on; each site's output, probed in the converted graph, against a direct f64 computation of
//! dense attention plus SLA's linear branch with that block's weights (and, without `sla_weights`,
//! dense attention alone: the zero projection). Refusals: misshapen tensors, some blocks only,
//! `linear = false`.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_refused, case, ditc_ok, fixture, in_input_dtypes, pseudo_random, run_with_probes,
};
use ditc::ir::Tensor;

const HEAD_DIM: usize = 16;
const BLOCKS: usize = 3;

fn turbo_name(block: usize, part: &str) -> String {
    format!("blocks.{block}.self_attn.attn_op.local_attn.proj_l.{part}")
}

/// wan-tiny's checkpoint plus `extra` tensors, in `dir`.
fn checkpoint_with(dir: &Path, extra: &[Tensor]) -> PathBuf {
    let src = fixture("wan-tiny").join("ckpt");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors =
        ditc::tensors::read_safetensors(&src.join(ditc::checkpoint::WEIGHTS)).unwrap();
    tensors.extend(extra.iter().cloned());
    ditc::tensors::write_safetensors(&dir.join(ditc::checkpoint::WEIGHTS), &tensors).unwrap();
    dir.to_path_buf()
}

fn projection(block: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    (
        pseudo_random(&format!("proj_l.{block}.w"), d * d),
        pseudo_random(&format!("proj_l.{block}.b"), d),
    )
}

fn sla_tensors(blocks: &[usize], d: usize) -> Vec<Tensor> {
    let mut out = Vec::new();
    for &i in blocks {
        let (w, b) = projection(i, d);
        out.push(Tensor::from_f32(
            &turbo_name(i, "weight"),
            vec![d as i64, d as i64],
            &w,
        ));
        out.push(Tensor::from_f32(&turbo_name(i, "bias"), vec![d as i64], &b));
    }
    out
}

fn recipe(dir: &Path, options: &str) -> PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(
        &path,
        format!("name = \"sla-weights\"\nversion = 1\n[[passes]]\nname = \"sparse-linear-attention\"\n[passes.options]\ntopk = 1.0\nblock_q = 64\nblock_k = 64\n{options}\n"),
    )
    .unwrap();
    path
}

fn convert_args(ckpt: &Path, recipe: &Path, out: &Path) -> Vec<String> {
    [
        "convert",
        ckpt.to_str().unwrap(),
        "--frames",
        "5",
        "--height",
        "16",
        "--width",
        "16",
        "--text-len",
        "8",
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Dense attention plus (with `proj`) SLA's linear branch `proj_l(phi(q)(phi(k)ᵀv) / (1e-5 +
/// phi(q)·Σphi(k)))`, phi = softmax over the head dim, in f64. q, k, v: [H, L, D] flattened (B = 1).
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: usize,
    scale: f64,
    proj: Option<&(Vec<f32>, Vec<f32>)>,
) -> Vec<f64> {
    let d = HEAD_DIM;
    let heads = q.len() / (l * d);
    let row = |x: &[f32], h: usize, t: usize| -> Vec<f64> {
        x[(h * l + t) * d..(h * l + t + 1) * d]
            .iter()
            .map(|&a| a as f64)
            .collect()
    };
    let mut out = Vec::with_capacity(q.len());
    for h in 0..heads {
        let ks: Vec<Vec<f64>> = (0..l).map(|s| row(k, h, s)).collect();
        let vs: Vec<Vec<f64>> = (0..l).map(|s| row(v, h, s)).collect();
        let phi_k: Vec<Vec<f64>> = ks.iter().map(|r| softmax(r)).collect();
        for t in 0..l {
            let qt = row(q, h, t);
            let p = softmax(&ks.iter().map(|kr| dot(&qt, kr) * scale).collect::<Vec<_>>());
            let mut o = vec![0.0; d];
            for (w, vr) in p.iter().zip(&vs) {
                for (oj, vj) in o.iter_mut().zip(vr) {
                    *oj += w * vj;
                }
            }
            if let Some((w, b)) = proj {
                let phi_q = softmax(&qt);
                let a: Vec<f64> = phi_k.iter().map(|pk| dot(&phi_q, pk)).collect();
                let den = 1e-5 + a.iter().sum::<f64>();
                let mut ol = vec![0.0; d];
                for (ai, vr) in a.iter().zip(&vs) {
                    for (lj, vj) in ol.iter_mut().zip(vr) {
                        *lj += ai * vj / den;
                    }
                }
                for (j, oj) in o.iter_mut().enumerate() {
                    let wr: Vec<f64> = (0..d).map(|m| w[j * d + m] as f64).collect();
                    *oj += dot(&ol, &wr) + b[j] as f64;
                }
            }
            out.extend(o);
        }
    }
    out
}

fn relative_error(a: &[f32], b: &[f64]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f64::max)
}

/// Per SLA site of the bundle in `out`: (block of its proj_l initializer or None, error vs the
/// reference with learned weights, error vs dense attention alone).
fn site_errors(out: &Path) -> Vec<(Option<usize>, f64, f64)> {
    let mut model = ditc::onnx::read_model(&out.join("model.onnx")).unwrap();
    // The int64 `kept` counters are outputs too; the probe runner reads float outputs.
    model
        .graph
        .outputs
        .retain(|o| !o.name.starts_with("ditc.sla.kept"));
    let io = ditc::tensors::read_safetensors(&fixture("wan-tiny").join("io.safetensors")).unwrap();
    let mut inputs = case(&io, 0);
    inputs.retain(|t| model.graph.inputs.iter().any(|i| i.name == t.name));
    let inputs = in_input_dtypes(&model, &inputs);
    let nodes: Vec<_> = model
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "SparseLinearAttention")
        .cloned()
        .collect();
    assert_eq!(nodes.len(), BLOCKS, "one site per block (self-attention)");
    let probes: Vec<&str> = nodes
        .iter()
        .flat_map(|n| [&n.inputs[0], &n.inputs[1], &n.inputs[2], &n.outputs[0]])
        .map(String::as_str)
        .collect();
    let values = run_with_probes(&model, &inputs, &probes);
    nodes
        .iter()
        .map(|n| {
            let block = n.inputs[4]
                .strip_prefix("ditc.sla.proj_l.block")
                .and_then(|s| s.strip_suffix(".weight"))
                .map(|s| s.parse::<usize>().unwrap());
            let (q, k, v, o) = (
                &values[&n.inputs[0]],
                &values[&n.inputs[1]],
                &values[&n.inputs[2]],
                &values[&n.outputs[0]],
            );
            let l = 5 * 8 * 8;
            let scale = n.attr_float("scale").unwrap() as f64;
            let proj = block.map(|b| projection(b, HEAD_DIM));
            let learned = reference(q, k, v, l, scale, proj.as_ref());
            let dense = reference(q, k, v, l, scale, None);
            (
                block,
                relative_error(o, &learned),
                relative_error(o, &dense),
            )
        })
        .collect()
}

#[test]
fn learned_proj_l_weights_are_ingested_per_block() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint_with(&tmp.path().join("ckpt"), &sla_tensors(&[0, 1, 2], HEAD_DIM));

    // With the weights: each site's output is dense attention + its block's linear branch.
    let r = recipe(
        tmp.path(),
        &format!("linear = true\nsla_weights = {:?}", ckpt.to_str().unwrap()),
    );
    let out = tmp.path().join("learned");
    ditc_ok(&strs(&convert_args(&ckpt, &r, &out)));
    let mut blocks = Vec::new();
    for (block, err, off_dense) in site_errors(&out) {
        println!(
            "block {block:?}: vs f64 with learned proj_l {err:.2e}, vs dense alone {off_dense:.2e}"
        );
        assert!(err <= 1e-5, "{block:?}: {err}");
        assert!(
            off_dense > 1e-2,
            "the learned branch must matter: {off_dense}"
        );
        blocks.push(block.expect("learned weights"));
    }
    blocks.sort();
    assert_eq!(blocks, vec![0, 1, 2]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["sparse_attention"]["options"]["sla_weights"],
        serde_json::json!(ckpt.to_str().unwrap())
    );

    // Without sla_weights (the same checkpoint converts: its proj_l tensors are accepted): zero.
    let r = recipe(tmp.path(), "linear = true");
    let out = tmp.path().join("zero");
    ditc_ok(&strs(&convert_args(&ckpt, &r, &out)));
    for (block, _, dense) in site_errors(&out) {
        assert_eq!(block, None);
        assert!(dense <= 1e-5, "zero projection: dense attention, {dense}");
    }
}

#[test]
fn bad_sla_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let some = checkpoint_with(&tmp.path().join("some"), &sla_tensors(&[0, 2], HEAD_DIM));
    let r = recipe(
        tmp.path(),
        &format!("linear = true\nsla_weights = {:?}", some.to_str().unwrap()),
    );
    let out = tmp.path().join("o1");
    assert_refused(
        &strs(&convert_args(&some, &r, &out)),
        &["weights for some blocks only", "[1]"],
    );

    // A file of the wrong head dim: the pass names the tensor.
    let file = tmp.path().join("sla.safetensors");
    ditc::tensors::write_safetensors(&file, &sla_tensors(&[0, 1, 2], 8)).unwrap();
    let plain = fixture("wan-tiny").join("ckpt");
    let r = recipe(
        tmp.path(),
        &format!("linear = true\nsla_weights = {:?}", file.to_str().unwrap()),
    );
    assert_refused(
        &strs(&convert_args(&plain, &r, &tmp.path().join("o2"))),
        &[&turbo_name(0, "weight"), "head dim 16"],
    );

    // In the checkpoint itself: the builder names it.
    let bad = checkpoint_with(&tmp.path().join("bad"), &sla_tensors(&[0, 1, 2], 8));
    let r = recipe(tmp.path(), "linear = true");
    assert_refused(
        &strs(&convert_args(&bad, &r, &tmp.path().join("o3"))),
        &[&turbo_name(0, "weight")],
    );

    // Weights with the linear branch off.
    let r = recipe(
        tmp.path(),
        &format!("sla_weights = {:?}", file.to_str().unwrap()),
    );
    assert_refused(
        &strs(&convert_args(&plain, &r, &tmp.path().join("o4"))),
        &["linear = false"],
    );
}
