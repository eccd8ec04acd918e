//! PixArt and CogVideoX have no PyTorch fixture: tiny configs of our own with pseudo-random weights,
//! checked against what can be worked out by hand — parameter counts from the config's arithmetic,
//! shapes, attention kinds, and one block computed in closed form (in f64, in this file) from the
//! block's input and the checkpoint's weights. Also: the real Latte-1 and Wan2.1 layouts (tensor names
//! and shapes from diffusers, `../shared/fixtures/shapes`) are exactly what the builders ask for.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::hunyuan_video_layout::{published_config, Layout};
use ditc::checkpoint::Checkpoint;
use ditc::ir::{DataType, Model, Tensor, ValueInfo, ValueType};
use ditc::models::{build_model, BuildOptions};
use ditc::runtime::TractRunner;

type Shapes = Vec<(String, Vec<i64>)>;

/// `nn.Linear(i, o)` at `path`: weight [o, i], bias [o].
fn linear(v: &mut Shapes, path: &str, i: i64, o: i64) {
    v.push((format!("{path}.weight"), vec![o, i]));
    v.push((format!("{path}.bias"), vec![o]));
}

/// Deterministic values in about [-0.5, 0.5) (xorshift, seeded per tensor name).
fn values(name: &str, n: usize) -> Vec<f32> {
    let mut s = name.bytes().fold(0x9e3779b97f4a7c15u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    }) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// A checkpoint folder with `shapes` filled by [`values`], those named in `scale` multiplied by its
/// factor.
fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    shapes: &Shapes,
    scale: &BTreeMap<&str, f32>,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .iter()
        .map(|(name, dims)| {
            let n = dims.iter().product::<i64>() as usize;
            let factor = scale.get(name.as_str()).copied().unwrap_or(1.0);
            let v: Vec<f32> = values(name, n).iter().map(|v| v * factor).collect();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (
                name.clone(),
                dims.iter().map(|&d| d as usize).collect(),
                bytes,
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join(ditc::checkpoint::WEIGHTS),
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// Run `model` with extra graph outputs `probes` (intermediate values), returning all outputs by name.
fn run_probed(model: &Model, inputs: &[Tensor], probes: &[&str]) -> BTreeMap<String, Vec<f32>> {
    let mut model = model.clone();
    for p in probes {
        model.graph.outputs.push(ValueInfo {
            name: p.to_string(),
            ty: ValueType::Tensor {
                dtype: Some(DataType::F32),
                shape: None,
            },
            doc_string: String::new(),
        });
    }
    let runner = TractRunner::new(&model, inputs).unwrap();
    runner
        .run(inputs)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.to_f32_vec().unwrap()))
        .collect()
}

fn weight(ckpt: &Checkpoint, name: &str) -> Vec<f64> {
    let t = ckpt
        .tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("{name}"));
    t.to_f32_vec().unwrap().into_iter().map(f64::from).collect()
}

// --- f64 reference maths ---------------------------------------------------------------------------

/// y = W x + b for W [o, i].
fn affine(w: &[f64], b: &[f64], x: &[f64]) -> Vec<f64> {
    let i = x.len();
    b.iter()
        .enumerate()
        .map(|(r, bias)| bias + (0..i).map(|c| w[r * i + c] * x[c]).sum::<f64>())
        .collect()
}

fn layer_norm(x: &[f64], eps: f64, w: Option<(&[f64], &[f64])>) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    x.iter()
        .enumerate()
        .map(|(k, v)| {
            let y = (v - mean) / (var + eps).sqrt();
            w.map_or(y, |(g, b)| y * g[k] + b[k])
        })
        .collect()
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn modulate(x: &[f64], scale: &[f64], shift: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(scale)
        .zip(shift)
        .map(|((v, s), t)| v * (1.0 + s) + t)
        .collect()
}

/// Softmax attention per head: `q` [Sq][heads * d] against `k`, `v` [Sk][heads * d], scores scaled by
/// 1/sqrt(d). Fails if the attention is nearly uniform: inputs that make it so (zero queries, one key)
/// could not tell softmax attention from a plain mean of the values.
fn softmax_attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    heads: usize,
) -> Vec<Vec<f64>> {
    let d = q[0].len() / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut peak = 0f64;
    let out = q
        .iter()
        .map(|qi| {
            let mut out = vec![0.0; qi.len()];
            for h in 0..heads {
                let r = h * d..(h + 1) * d;
                let scores: Vec<f64> = k
                    .iter()
                    .map(|kj| scale * dot(&qi[r.clone()], &kj[r.clone()]))
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (ej, vj) in e.iter().zip(v) {
                    peak = peak.max(ej / z);
                    for c in r.clone() {
                        out[c] += ej / z * vj[c];
                    }
                }
            }
            out
        })
        .collect();
    eprintln!(
        "attention over {} keys: largest weight {peak:.3} (uniform {:.3})",
        k.len(),
        1.0 / k.len() as f64
    );
    assert!(
        peak > 2.0 / k.len() as f64,
        "attention over {} keys is nearly uniform (largest weight {peak})",
        k.len()
    );
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// diffusers' `Attention` at `path` (weights from `w`): to_q on `x`, to_k and to_v on `context`, for
/// CogVideoX's `qk_norm` a LayerNorm (eps 1e-6, `norm_q` / `norm_k` weights) of each head of q and k,
/// softmax attention, to_out.0.
fn attention_module(
    w: &dyn Fn(&str) -> Vec<f64>,
    path: &str,
    (x, context): (&[Vec<f64>], &[Vec<f64>]),
    heads: usize,
    qk_norm: bool,
) -> Vec<Vec<f64>> {
    let linear = |m: &str, rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let (wt, b) = (
            w(&format!("{path}.{m}.weight")),
            w(&format!("{path}.{m}.bias")),
        );
        rows.iter().map(|r| affine(&wt, &b, r)).collect()
    };
    let head_norm = |n: &str, rows: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        if !qk_norm {
            return rows;
        }
        let (g, b) = (
            w(&format!("{path}.{n}.weight")),
            w(&format!("{path}.{n}.bias")),
        );
        rows.iter()
            .map(|r| {
                r.chunks(g.len())
                    .flat_map(|h| layer_norm(h, 1e-6, Some((&g, &b))))
                    .collect()
            })
            .collect()
    };
    let q = head_norm("norm_q", linear("to_q", x));
    let k = head_norm("norm_k", linear("to_k", context));
    let v = linear("to_v", context);
    linear("to_out.0", &softmax_attention(&q, &k, &v, heads))
}

/// `x + gate * y`, row by row.
fn gated_add(x: &[Vec<f64>], gate: &[f64], y: &[Vec<f64>]) -> Vec<Vec<f64>> {
    x.iter()
        .zip(y)
        .map(|(xr, yr)| {
            xr.iter()
                .zip(gate)
                .zip(yr)
                .map(|((a, g), b)| a + g * b)
                .collect()
        })
        .collect()
}

fn rows(v: &[f32], width: usize) -> Vec<Vec<f64>> {
    v.chunks(width)
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect()
}

fn assert_close(got: &[f32], want: &[Vec<f64>], what: &str) {
    let want: Vec<f64> = want.concat();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let num: f64 = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    let rel = (num / den).sqrt();
    eprintln!("{what}: closed form vs graph, rel L2 {rel:.2e}");
    assert!(rel < 1e-5, "{what}: rel L2 {rel}");
}

fn inspect(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["inspect", "--json", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    serde_json::from_slice(&common::ditc_ok(&args)).unwrap()
}

fn kinds(report: &serde_json::Value) -> Vec<String> {
    report["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap().to_string())
        .collect()
}

// --- PixArt ----------------------------------------------------------------------------------------

const D: i64 = 16; // 2 heads x 8

fn pixart_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
        "num_layers": 2, "cross_attention_dim": 16, "caption_channels": 12, "sample_size": 8,
        "patch_size": 2, "attention_bias": true, "norm_elementwise_affine": false, "norm_eps": 1e-6,
        "norm_type": "ada_norm_single", "use_additional_conditions": false, "activation_fn": "gelu-approximate"
    })
}

/// PixArt's parameters, module by module as diffusers declares them.
fn pixart_shapes(layers: i64) -> Shapes {
    let mut v = vec![
        ("pos_embed.proj.weight".to_string(), vec![D, 4, 2, 2]),
        ("pos_embed.proj.bias".to_string(), vec![D]),
        ("scale_shift_table".to_string(), vec![2, D]),
    ];
    for i in 0..layers {
        let p = format!("transformer_blocks.{i}");
        v.push((format!("{p}.scale_shift_table"), vec![6, D]));
        for a in ["attn1", "attn2"] {
            for m in ["to_q", "to_k", "to_v", "to_out.0"] {
                linear(&mut v, &format!("{p}.{a}.{m}"), D, D);
            }
        }
        linear(&mut v, &format!("{p}.ff.net.0.proj"), D, 4 * D);
        linear(&mut v, &format!("{p}.ff.net.2"), 4 * D, D);
    }
    linear(&mut v, "proj_out", D, 2 * 2 * 8);
    linear(
        &mut v,
        "adaln_single.emb.timestep_embedder.linear_1",
        256,
        D,
    );
    linear(&mut v, "adaln_single.emb.timestep_embedder.linear_2", D, D);
    linear(&mut v, "adaln_single.linear", D, 6 * D);
    linear(&mut v, "caption_projection.linear_1", 12, D);
    linear(&mut v, "caption_projection.linear_2", D, D);
    v
}

fn pixart_inputs(text: usize) -> Vec<Tensor> {
    vec![
        Tensor::from_f32("hidden_states", vec![1, 4, 8, 8], &values("x", 256)),
        Tensor::from_f32(
            "encoder_hidden_states",
            vec![1, text as i64, 12],
            &values("c", 12 * text),
        ),
        Tensor::from_i64("timestep", vec![1], &[500]),
    ]
}

#[test]
fn pixart_tiny_parameters_shapes_and_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(
        tmp.path(),
        &pixart_config(),
        &pixart_shapes(2),
        &BTreeMap::new(),
    );
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    // Config arithmetic: per block 6D + 8 linears D->D + FFN D->4D->D; outside: patch conv, final table
    // and proj_out, timestep MLP 256->D->D, adaLN linear D->6D, caption MLP 12->D->D.
    let per_block = 6 * D + 8 * (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D);
    let outside = (D * 4 * 4 + D)
        + 2 * D
        + (D * 32 + 32)
        + (256 * D + D)
        + (D * D + D)
        + (D * 6 * D + 6 * D)
        + (12 * D + D)
        + (D * D + D);
    assert_eq!(ckpt.parameters() as i64, 2 * per_block + outside);
    let model = build_model(
        &ckpt,
        &BuildOptions {
            text_len: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    let from_ckpt: u64 = model
        .graph
        .initializers
        .iter()
        .filter(|t| ckpt.tensors.iter().any(|c| c.name == t.name))
        .map(|t| t.numel())
        .sum();
    assert_eq!(
        from_ckpt,
        ckpt.parameters(),
        "every checkpoint tensor is used once"
    );
    let out = run_probed(&model, &pixart_inputs(5), &[]);
    assert_eq!(
        out["sample"].len(),
        8 * 8 * 8,
        "[1, 8, 8, 8] learned-sigma output"
    );
    assert!(out["sample"].iter().all(|v| v.is_finite()));
    let report = inspect(tmp.path(), &["--text-len", "5"]);
    assert_eq!(kinds(&report), ["spatial", "cross", "spatial", "cross"]);
    assert_eq!(report["attention"][0]["query_len"], 16, "4x4 patches");
    assert_eq!(report["attention"][1]["key_len"], 5, "5 caption tokens");
    assert_eq!(report["blocks"].as_array().unwrap().len(), 2);
}

/// Block 0 in closed form on general inputs (random weights, nothing zeroed): the modulation from the
/// graph's timestep embedding through `adaln_single.linear` plus the block's table, softmax
/// self-attention over the 16 patches, cross-attention to 5 caption tokens, the feed-forward.
#[test]
fn pixart_block_matches_closed_form() {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(
        tmp.path(),
        &pixart_config(),
        &pixart_shapes(2),
        &BTreeMap::new(),
    );
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let text = 5;
    let model = build_model(
        &ckpt,
        &BuildOptions {
            text_len: Some(text as i64),
            ..Default::default()
        },
    )
    .unwrap();
    let probes = [
        "pos_embed/add",
        "caption_projection.linear_2/unflatten",
        "adaln_single.emb.timestep_embedder.linear_2",
        "transformer_blocks.0.ff/residual",
    ];
    let got = run_probed(&model, &pixart_inputs(text), &probes);
    let d = D as usize;
    let x = rows(&got[probes[0]], d);
    let ctx = rows(&got[probes[1]], d);
    assert_eq!((x.len(), ctx.len()), (16, text));
    let emb: Vec<f64> = got[probes[2]].iter().map(|&v| silu(v as f64)).collect();
    let t6 = affine(
        &weight(&ckpt, "adaln_single.linear.weight"),
        &weight(&ckpt, "adaln_single.linear.bias"),
        &emb,
    );
    let w = |n: &str| weight(&ckpt, &format!("transformer_blocks.0.{n}"));
    let table = w("scale_shift_table");
    // shift, scale, gate (msa), shift, scale, gate (mlp): the table's rows plus the timestep's.
    let m: Vec<Vec<f64>> = table
        .chunks(d)
        .zip(t6.chunks(d))
        .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + b).collect())
        .collect();
    let n1: Vec<Vec<f64>> = x
        .iter()
        .map(|t| modulate(&layer_norm(t, 1e-6, None), &m[1], &m[0]))
        .collect();
    let attn1 = attention_module(&w, "attn1", (&n1, &n1), 2, false);
    let h = gated_add(&x, &m[2], &attn1);
    // adaLN-single: cross-attention reads the un-normalised stream.
    let attn2 = attention_module(&w, "attn2", (&h, &ctx), 2, false);
    let h = gated_add(&h, &vec![1.0; d], &attn2);
    let ff: Vec<Vec<f64>> = h
        .iter()
        .map(|t| {
            let hn = modulate(&layer_norm(t, 1e-6, None), &m[4], &m[3]);
            let up: Vec<f64> = affine(&w("ff.net.0.proj.weight"), &w("ff.net.0.proj.bias"), &hn)
                .into_iter()
                .map(gelu_tanh)
                .collect();
            affine(&w("ff.net.2.weight"), &w("ff.net.2.bias"), &up)
        })
        .collect();
    let want = gated_add(&h, &m[5], &ff);
    assert_close(&got[probes[3]], &want, "PixArt block 0");
}

// --- CogVideoX -------------------------------------------------------------------------------------

const C: i64 = 32; // 2 heads x 16
const T: i64 = 24; // time_embed_dim

fn cogvideox_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "CogVideoXTransformer3DModel",
        "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
        "time_embed_dim": 24, "text_embed_dim": 20, "num_layers": 2, "sample_width": 8, "sample_height": 6,
        "sample_frames": 9, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 3,
        "attention_bias": true, "norm_elementwise_affine": true, "norm_eps": 1e-5,
        "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0,
        "use_rotary_positional_embeddings": false, "flip_sin_to_cos": true, "freq_shift": 0
    })
}

fn cogvideox_shapes(layers: i64) -> Shapes {
    let mut v = vec![
        ("patch_embed.proj.weight".to_string(), vec![C, 4, 2, 2]),
        ("patch_embed.proj.bias".to_string(), vec![C]),
    ];
    linear(&mut v, "patch_embed.text_proj", 20, C);
    linear(&mut v, "time_embedding.linear_1", C, T);
    linear(&mut v, "time_embedding.linear_2", T, T);
    let norm = |v: &mut Shapes, p: &str, n: i64| {
        v.push((format!("{p}.weight"), vec![n]));
        v.push((format!("{p}.bias"), vec![n]));
    };
    for i in 0..layers {
        let p = format!("transformer_blocks.{i}");
        for n in ["norm1", "norm2"] {
            linear(&mut v, &format!("{p}.{n}.linear"), T, 6 * C);
            norm(&mut v, &format!("{p}.{n}.norm"), C);
        }
        norm(&mut v, &format!("{p}.attn1.norm_q"), 16);
        norm(&mut v, &format!("{p}.attn1.norm_k"), 16);
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            linear(&mut v, &format!("{p}.attn1.{m}"), C, C);
        }
        linear(&mut v, &format!("{p}.ff.net.0.proj"), C, 4 * C);
        linear(&mut v, &format!("{p}.ff.net.2"), 4 * C, C);
    }
    norm(&mut v, "norm_final", C);
    linear(&mut v, "norm_out.linear", T, 2 * C);
    norm(&mut v, "norm_out.norm", C);
    linear(&mut v, "proj_out", C, 2 * 2 * 4);
    v
}

fn cogvideox_inputs() -> Vec<Tensor> {
    vec![
        Tensor::from_f32(
            "hidden_states",
            vec![1, 3, 4, 6, 8],
            &values("x", 3 * 4 * 48),
        ),
        Tensor::from_f32("encoder_hidden_states", vec![1, 3, 20], &values("c", 60)),
        Tensor::from_i64("timestep", vec![1], &[321]),
    ]
}

#[test]
fn cogvideox_tiny_parameters_shapes_and_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(
        tmp.path(),
        &cogvideox_config(),
        &cogvideox_shapes(2),
        &BTreeMap::new(),
    );
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let per_block = 2 * (T * 6 * C + 6 * C + 2 * C)
        + 2 * 2 * 16
        + 4 * (C * C + C)
        + (C * 4 * C + 4 * C)
        + (4 * C * C + C);
    let outside = (C * 16 + C)
        + (20 * C + C)
        + (C * T + T)
        + (T * T + T)
        + 2 * C
        + (T * 2 * C + 2 * C)
        + 2 * C
        + (C * 16 + 16);
    assert_eq!(ckpt.parameters() as i64, 2 * per_block + outside);
    let model = build_model(&ckpt, &BuildOptions::default()).unwrap();
    let out = run_probed(&model, &cogvideox_inputs(), &[]);
    assert_eq!(
        out["sample"].len(),
        3 * 4 * 6 * 8,
        "[1, 3, 4, 6, 8]: frames (9-1)/4+1 = 3"
    );
    assert!(out["sample"].iter().all(|v| v.is_finite()));
    let report = inspect(tmp.path(), &[]);
    assert_eq!(
        kinds(&report),
        ["full", "full"],
        "joint text+video attention"
    );
    // 3 text tokens + 3 frames x 3 x 4 patches.
    assert_eq!(report["attention"][0]["query_len"], 3 + 36);
    assert_eq!(report["blocks"].as_array().unwrap().len(), 2);
    // Frames are axis 1 of CogVideoX's latent, declared to the analysis.
    assert_eq!(report["inputs"][0]["name"], "hidden_states");
}

/// Block 0 in closed form on general inputs (random weights, nothing zeroed): the adaLN modulations
/// from the graph's timestep embedding, softmax joint attention over 3 text + 36 video tokens with
/// per-head LayerNorm on q and k, the feed-forward; everything in f64 here. The q/k norms' gains are
/// scaled up (x4, into [-2, 2)): with gains in [-0.5, 0.5) the scores of unit-norm heads are so small
/// that the attention is nearly uniform.
#[test]
fn cogvideox_block_matches_closed_form() {
    let tmp = tempfile::tempdir().unwrap();
    let sharper: BTreeMap<&str, f32> = [
        ("transformer_blocks.0.attn1.norm_q.weight", 4.0),
        ("transformer_blocks.0.attn1.norm_k.weight", 4.0),
    ]
    .into();
    write_checkpoint(
        tmp.path(),
        &cogvideox_config(),
        &cogvideox_shapes(2),
        &sharper,
    );
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let model = build_model(&ckpt, &BuildOptions::default()).unwrap();
    let probes = [
        "patch_embed/add_positions",
        "patch_embed.text_proj/unflatten",
        "time_embedding.linear_2",
        "transformer_blocks.0.ff/residual_video",
        "transformer_blocks.0.ff/residual_text",
    ];
    let got = run_probed(&model, &cogvideox_inputs(), &probes);
    let c = C as usize;
    let video = rows(&got[probes[0]], c);
    let text = rows(&got[probes[1]], c);
    assert_eq!((text.len(), video.len()), (3, 36));
    let temb: Vec<f64> = got[probes[2]].iter().map(|&v| v as f64).collect();
    let w = |n: &str| weight(&ckpt, &format!("transformer_blocks.0.{n}"));
    let mods = |n: &str| -> Vec<Vec<f64>> {
        let m = affine(
            &w(&format!("{n}.linear.weight")),
            &w(&format!("{n}.linear.bias")),
            &temb.iter().map(|&v| silu(v)).collect::<Vec<_>>(),
        );
        m.chunks(c).map(<[f64]>::to_vec).collect()
    };
    // norm1 (video: shift, scale, gate = m[0..3]; text: m[3..6]) on the joint [text, video] sequence.
    let joint = |n: &str, m: &[Vec<f64>], text: &[Vec<f64>], video: &[Vec<f64>]| {
        let (g, b) = (w(&format!("{n}.norm.weight")), w(&format!("{n}.norm.bias")));
        let norm = |x: &[f64], scale: &[f64], shift: &[f64]| {
            modulate(&layer_norm(x, 1e-5, Some((&g, &b))), scale, shift)
        };
        text.iter()
            .map(|t| norm(t, &m[4], &m[3]))
            .chain(video.iter().map(|v| norm(v, &m[1], &m[0])))
            .collect::<Vec<_>>()
    };
    let m = mods("norm1");
    let x = joint("norm1", &m, &text, &video);
    let attn = attention_module(&w, "attn1", (&x, &x), 2, true);
    let (attn_text, attn_video) = attn.split_at(text.len());
    let video = gated_add(&video, &m[2], attn_video);
    let text = gated_add(&text, &m[5], attn_text);
    // norm2 + feed-forward per token.
    let m = mods("norm2");
    let ff: Vec<Vec<f64>> = joint("norm2", &m, &text, &video)
        .iter()
        .map(|x| {
            let up: Vec<f64> = affine(&w("ff.net.0.proj.weight"), &w("ff.net.0.proj.bias"), x)
                .into_iter()
                .map(gelu_tanh)
                .collect();
            affine(&w("ff.net.2.weight"), &w("ff.net.2.bias"), &up)
        })
        .collect();
    let (ff_text, ff_video) = ff.split_at(text.len());
    let want_video = gated_add(&video, &m[2], ff_video);
    let want_text = gated_add(&text, &m[5], ff_text);
    assert_close(&got[probes[3]], &want_video, "CogVideoX block 0 (video)");
    assert_close(&got[probes[4]], &want_text, "CogVideoX block 0 (text)");
}

// --- real layouts ----------------------------------------------------------------------------------

/// The tensor names and shapes diffusers instantiates for Latte-1 and Wan2.1 (1.3B, 14B) are exactly
/// what the builders consume: no missing, misshapen or unexpected tensor. Weights are slices of a sparse
/// file (never touched), so 14B parameters cost no memory.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn real_model_layouts_are_accepted() {
    let dir = common::fixtures();
    for (file, opts) in [
        (
            "latte-1.json",
            BuildOptions {
                text_len: Some(120),
                ..Default::default()
            },
        ),
        (
            "wan2.1-t2v-1.3b.json",
            BuildOptions {
                frames: Some(3),
                height: Some(8),
                width: Some(8),
                text_len: Some(16),
                ..Default::default()
            },
        ),
        (
            "wan2.1-t2v-14b.json",
            BuildOptions {
                frames: Some(3),
                height: Some(8),
                width: Some(8),
                text_len: Some(16),
                ..Default::default()
            },
        ),
    ] {
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("shapes").join(file)).unwrap()).unwrap();
        let mut config = spec["config"].clone();
        config["_class_name"] = spec["class"].clone();
        let shapes: Vec<(String, Vec<i64>)> = spec["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_i64().unwrap())
                        .collect(),
                )
            })
            .collect();
        let total: usize = shapes
            .iter()
            .map(|(_, s)| 2 * s.iter().product::<i64>() as usize)
            .sum();
        // A sparse file: its zero pages take neither disk nor memory until read (they never are).
        let sparse = tempfile::tempfile().unwrap();
        sparse.set_len(total as u64).unwrap();
        let zeros = ditc::onnx::external::map_file(&sparse).unwrap();
        let mut offset = 0;
        let tensors: Vec<Tensor> = shapes
            .iter()
            .map(|(name, dims)| {
                let n = 2 * dims.iter().product::<i64>() as usize;
                offset += n;
                Tensor::from_raw(
                    name,
                    DataType::BF16,
                    dims.clone(),
                    zeros.slice(offset - n..offset),
                )
                .unwrap()
            })
            .collect();
        let ckpt = Checkpoint {
            dir: dir.join("shapes"),
            class_name: spec["class"].as_str().unwrap().to_string(),
            config,
            files: Vec::new(),
            tensors,
        };
        let model = build_model(&ckpt, &opts).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!(
            ckpt.parameters(),
            spec["parameters"].as_u64().unwrap(),
            "{file}"
        );
        let casts = model
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Cast" && n.name.ends_with("/cast"))
            .count();
        assert_eq!(
            casts,
            shapes.len(),
            "{file}: every BF16 weight kept as BF16 and cast in the graph"
        );
        let map = ditc::analysis::analyse(&model);
        assert!(!map.attention.is_empty(), "{file}");
        eprintln!(
            "{file}: {} tensors, {} parameters, {} attention sites",
            shapes.len(),
            ckpt.parameters(),
            map.attention.len()
        );
    }
}

// --- HunyuanVideo ----------------------------------------------------------------------------------

/// `layout`'s tensors as test shapes.
fn hunyuan_shapes(layout: &Layout) -> Shapes {
    layout
        .tensors()
        .into_iter()
        .map(|(n, s)| (n, s.into_iter().map(|d| d as i64).collect()))
        .collect()
}

/// BF16 tensors of `shapes` over one sparse file: its zero pages take neither disk nor memory until
/// read (they never are), so 13B parameters cost nothing.
fn sparse_bf16_tensors(shapes: &Shapes) -> Vec<Tensor> {
    let total: u64 = shapes
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<i64>() as u64)
        .sum();
    let sparse = tempfile::tempfile().unwrap();
    sparse.set_len(total).unwrap();
    let zeros = ditc::onnx::external::map_file(&sparse).unwrap();
    let mut offset = 0;
    shapes
        .iter()
        .map(|(name, dims)| {
            let n = 2 * dims.iter().product::<i64>() as usize;
            offset += n;
            let bytes = zeros.slice(offset - n..offset);
            Tensor::from_raw(name, DataType::BF16, dims.clone(), bytes).unwrap()
        })
        .collect()
}

/// The published HunyuanVideo transformer (`hunyuanvideo-community/HunyuanVideo`, config values
/// written in `tests/common/hunyuan_video_layout.rs`): every tensor its modeling code registers, in
/// BF16, is exactly what the builder consumes (nothing missing, misshapen or unexpected), every
/// weight stays BF16 behind a Cast, and the parameter count is the config's arithmetic:
/// 12,821,012,544. The analysis finds its 2 refiner, 20 dual-stream and 40 single-stream sites.
#[test]
fn hunyuanvideo_real_layout_is_accepted() {
    let config = published_config();
    let layout = Layout::of(&config);
    let shapes = hunyuan_shapes(&layout);
    let ckpt = Checkpoint {
        dir: PathBuf::from("hunyuanvideo-community/HunyuanVideo/transformer"),
        class_name: "HunyuanVideoTransformer3DModel".into(),
        config,
        files: Vec::new(),
        tensors: sparse_bf16_tensors(&shapes),
    };
    let opts = BuildOptions {
        frames: Some(2),
        height: Some(4),
        width: Some(6),
        text_len: Some(8),
        ..Default::default()
    };
    let model = build_model(&ckpt, &opts).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(ckpt.parameters(), layout.parameters_by_arithmetic());
    assert_eq!(ckpt.parameters(), 12_821_012_544);
    let casts = model
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Cast" && n.name.ends_with("/cast"))
        .count();
    assert_eq!(casts, shapes.len(), "every BF16 weight kept and cast");
    let map = ditc::analysis::analyse(&model);
    let kinds: Vec<&str> = map.attention.iter().map(|s| s.kind.as_str()).collect();
    let mut want = vec!["cross"; 2];
    want.extend(["full"; 60]);
    assert_eq!(kinds, want);
    assert_eq!(map.blocks.len(), 62);
    eprintln!(
        "HunyuanVideo: {} tensors, {} parameters, {} attention sites",
        shapes.len(),
        ckpt.parameters(),
        map.attention.len()
    );
}

/// The layout written from the modeling code is the one diffusers saved for hunyuanvideo-tiny:
/// the same tensor names and shapes, and the same parameter count by arithmetic.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hunyuanvideo_layout_is_the_fixture_checkpoints() {
    let ckpt = Checkpoint::open(&common::fixture("hunyuanvideo-tiny").join("ckpt")).unwrap();
    let layout = Layout::of(&ckpt.config);
    let ours: BTreeMap<String, Vec<i64>> = hunyuan_shapes(&layout).into_iter().collect();
    let saved: BTreeMap<String, Vec<i64>> = ckpt
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect();
    assert_eq!(ours, saved);
    assert_eq!(layout.parameters_by_arithmetic(), ckpt.parameters());
}

fn hunyuan_tiny_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "HunyuanVideoTransformer3DModel",
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
        "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0,
        "patch_size": 2, "patch_size_t": 1, "guidance_embeds": true, "text_embed_dim": 8,
        "pooled_projection_dim": 6, "rope_axes_dim": [4, 6, 6], "rope_theta": 256.0,
        "qk_norm": "rms_norm", "image_condition_type": null
    })
}

const HUNYUAN_TINY_FLAGS: [&str; 8] = [
    "--frames",
    "2",
    "--height",
    "4",
    "--width",
    "4",
    "--text-len",
    "3",
];

/// Config values the HunyuanVideo builder does not reproduce are refused (exit 2) with an error
/// naming the config key; `guidance_embeds: false` drops the `guidance` input (and refuses a
/// checkpoint that has a guidance embedder); `image_condition_type: "latent_concat"` (only the
/// pipeline differs) builds the text-to-video graph.
#[test]
fn hunyuanvideo_config_values_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let config = hunyuan_tiny_config();
    let shapes = hunyuan_shapes(&Layout::of(&config));
    let none = BTreeMap::new();
    let refused = [
        ("image_condition_type", serde_json::json!("token_replace")),
        ("qk_norm", serde_json::json!("layer_norm")),
        ("qk_norm", serde_json::Value::Null),
        ("rope_axes_dim", serde_json::json!([4, 4, 4])),
        ("rope_axes_dim", serde_json::json!([4, 6])),
        ("mlp_ratio", serde_json::json!(-1.0)),
        ("mlp_ratio", serde_json::json!(1e30)),
        ("rope_theta", serde_json::json!(0.0)),
        ("num_single_layers", serde_json::json!(100_000)),
    ];
    for (i, (key, value)) in refused.into_iter().enumerate() {
        let dir = tmp.path().join(format!("{key}-{i}"));
        let mut bad = config.clone();
        bad[key] = value;
        write_checkpoint(&dir, &bad, &shapes, &none);
        let mut args = vec!["inspect", dir.to_str().unwrap()];
        args.extend(HUNYUAN_TINY_FLAGS);
        common::assert_refused(&args, &[key]);
    }
    // Shapes whose constant or mask tables would be huge are refused before anything is computed.
    let t2v = tmp.path().join("t2v");
    write_checkpoint(&t2v, &config, &shapes, &none);
    for (flags, expect) in [
        (
            ["--frames", "4096", "--height", "4096"],
            "the rotary table would have",
        ),
        (
            ["--text-len", "1048576", "--frames", "2"],
            "the attention mask table",
        ),
        (
            ["--frames", "2", "--height", "5"],
            "height 5 is not a multiple of 2",
        ),
    ] {
        let mut args = vec!["inspect", t2v.to_str().unwrap()];
        args.extend(flags);
        common::assert_refused(&args, &[expect]);
    }

    let mut unguided = config.clone();
    unguided["guidance_embeds"] = false.into();
    let dir = tmp.path().join("guided-checkpoint");
    write_checkpoint(&dir, &unguided, &shapes, &none);
    let mut args = vec!["inspect", dir.to_str().unwrap()];
    args.extend(HUNYUAN_TINY_FLAGS);
    common::assert_refused(
        &args,
        &["unexpected tensors", "time_text_embed.guidance_embedder"],
    );
    let dir = tmp.path().join("unguided");
    write_checkpoint(
        &dir,
        &unguided,
        &hunyuan_shapes(&Layout::of(&unguided)),
        &none,
    );
    let inputs = |dir: &Path| -> Vec<String> {
        let model = build_model(&Checkpoint::open(dir).unwrap(), &hunyuan_small()).unwrap();
        model.graph.inputs.iter().map(|i| i.name.clone()).collect()
    };
    let mut want = vec![
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "pooled_projections",
    ];
    assert_eq!(inputs(&dir), want);

    let mut concat = config.clone();
    concat["image_condition_type"] = "latent_concat".into();
    let concat_dir = tmp.path().join("latent_concat");
    write_checkpoint(&concat_dir, &concat, &shapes, &none);
    want.push("guidance");
    assert_eq!(inputs(&t2v), want);
    let graph = |dir: &Path| {
        build_model(&Checkpoint::open(dir).unwrap(), &hunyuan_small())
            .unwrap()
            .graph
    };
    assert_eq!(graph(&concat_dir), graph(&t2v));
}

fn hunyuan_small() -> BuildOptions {
    BuildOptions {
        frames: Some(2),
        height: Some(4),
        width: Some(4),
        text_len: Some(3),
        ..Default::default()
    }
}
