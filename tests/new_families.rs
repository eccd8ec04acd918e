//! CogVideoX with rotary positions (5b) and temporal patches (1.5), Wan2.1 image-to-video and Wan2.2
//! per-token timesteps, against independent references:
//! - PyTorch: the `cogvideox-rope-tiny`, `cogvideox15-tiny` and `wan-i2v-tiny` fixtures (diffusers
//!   0.42.1 forward calls, 5 timesteps each);
//! - closed forms computed here in f64: the rotary embedding CogVideoXPipeline passes (the fixtures call
//!   the transformer without it), Wan I2V's image branch (the fixture's 6 text tokens make diffusers'
//!   processor send no token to it), and the per-token modulations of Wan2.2;
//! - the real CogVideoX-5b and Wan2.1-I2V-14B layouts (every tensor name and shape, written here from
//!   diffusers' modeling code) are exactly what the builders ask for.

mod common;

use std::collections::BTreeMap;

use common::{fixture, pseudo_random, run_with_probes, Shapes};
use ditc::checkpoint::Checkpoint;
use ditc::ir::{Model, Tensor};
use ditc::models::{build_model, BuildOptions, RotaryEmb};
use ditc::tensors::read_safetensors;

fn kinds(model: &Model) -> Vec<String> {
    ditc::analysis::analyse(model)
        .attention
        .iter()
        .map(|s| s.kind.as_str().to_string())
        .collect()
}

fn inspect_kinds(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["inspect", "--json", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let report: serde_json::Value = serde_json::from_slice(&common::ditc_ok(&args)).unwrap();
    report["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap().to_string())
        .collect()
}

fn repeat(pattern: &[&str], times: usize) -> Vec<String> {
    (0..times)
        .flat_map(|_| pattern.iter().map(|s| s.to_string()))
        .collect()
}

/// `nn.Linear(i, o)` at `path`.
fn linear(v: &mut Shapes, path: &str, i: i64, o: i64) {
    v.push((format!("{path}.weight"), vec![o, i]));
    v.push((format!("{path}.bias"), vec![o]));
}

/// A LayerNorm (weight and bias) or an RMSNorm weight of `n` at `path`.
fn norm(v: &mut Shapes, path: &str, n: i64, bias: bool) {
    v.push((format!("{path}.weight"), vec![n]));
    if bias {
        v.push((format!("{path}.bias"), vec![n]));
    }
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// --- fixtures: PyTorch's forward --------------------------------------------------------------------

/// The fixtures call `CogVideoXTransformer3DModel.forward` without `image_rotary_emb` (the pipeline
/// computes it), so they are reproduced with `--rotary-emb none`; their sincos table is off too
/// (`use_rotary_positional_embeddings`), so no position enters at all.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn cogvideox_rotary_fixtures_match_pytorch() {
    for name in ["cogvideox-rope-tiny", "cogvideox15-tiny"] {
        let dir = fixture(name);
        let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
        let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
        let opts = BuildOptions {
            rotary_emb: Some(RotaryEmb::None),
            ..Default::default()
        };
        let model = build_model(&ckpt, &opts).unwrap();
        let timestep = model.graph.inputs.iter().find(|i| i.name == "timestep");
        assert_eq!(timestep.unwrap().dtype(), Some(ditc::ir::DataType::I64));
        common::assert_matches_reference(&model, &io, name);
        assert_eq!(
            kinds(&model),
            repeat(&["full"], 2),
            "{name}: joint attention"
        );
        let ckpt_dir = dir.join("ckpt");
        assert_eq!(
            inspect_kinds(&ckpt_dir, &["--rotary-emb", "none"]),
            repeat(&["full"], 2)
        );
    }
    // CogVideoX 1.5's head_dim 16 has a pipeline rotary table (4 + 6 + 6): built by default, the joint
    // attention stays `full`; cogvideox-rope-tiny's head_dim 24 (6 + 9 + 9) has none in diffusers.
    let dir = fixture("cogvideox15-tiny").join("ckpt");
    assert_eq!(inspect_kinds(&dir, &[]), repeat(&["full"], 2));
    let ckpt = Checkpoint::open(&fixture("cogvideox-rope-tiny").join("ckpt")).unwrap();
    let err = build_model(&ckpt, &BuildOptions::default()).unwrap_err();
    assert!(
        format!("{err:#}").contains("attention_head_dim 24"),
        "{err:#}"
    );
}

/// wan-i2v-tiny has 6 text + 5 image tokens: diffusers' processor takes `context[:, :11 - 512]` (none)
/// as image tokens, so all 11 go through the text projections and the image branch adds nothing. The
/// graph reproduces that (its image embedder included); `wan_i2v_image_branch_matches_closed_form`
/// checks the branch itself.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn wan_i2v_fixture_matches_pytorch() {
    let dir = fixture("wan-i2v-tiny");
    let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let opts = wan_i2v_tiny_shapes(6);
    let model = build_model(&ckpt, &opts).unwrap();
    common::assert_matches_reference(&model, &io, "wan-i2v-tiny");
    assert_eq!(kinds(&model), repeat(&["full", "cross"], 2));
    let shapes = [
        "--frames",
        "3",
        "--height",
        "8",
        "--width",
        "8",
        "--text-len",
        "6",
        "--image-len",
        "5",
    ];
    assert_eq!(
        inspect_kinds(&dir.join("ckpt"), &shapes),
        repeat(&["full", "cross"], 2)
    );
}

fn wan_i2v_tiny_shapes(text: i64) -> BuildOptions {
    BuildOptions {
        frames: Some(3),
        height: Some(8),
        width: Some(8),
        text_len: Some(text),
        image_len: Some(5),
        ..Default::default()
    }
}

// --- Wan I2V: the image branch in closed form -----------------------------------------------------

/// Softmax attention per head, `q` [Sq][H*d] against `k`, `v` [Sk][H*d] (scores scaled by 1/sqrt(d)).
fn attention(q: &[Vec<f64>], k: &[Vec<f64>], v: &[Vec<f64>], heads: usize) -> Vec<Vec<f64>> {
    let d = q[0].len() / heads;
    q.iter()
        .map(|qi| {
            let mut out = vec![0.0; qi.len()];
            for h in 0..heads {
                let r = h * d..(h + 1) * d;
                let scores: Vec<f64> = k
                    .iter()
                    .map(|kj| {
                        let dot: f64 = qi[r.clone()]
                            .iter()
                            .zip(&kj[r.clone()])
                            .map(|(a, b)| a * b)
                            .sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (ej, vj) in e.iter().zip(v) {
                    for c in r.clone() {
                        out[c] += ej / z * vj[c];
                    }
                }
            }
            out
        })
        .collect()
}

fn rows(v: &[f32], width: usize) -> Vec<Vec<f64>> {
    v.chunks(width).map(f64s).collect()
}

/// With UMT5's 512 text tokens (as the pipelines pass them) the processor's split is the image/text
/// boundary: block 0's cross-attention is to_out(attn(q, text) + attn(q, image)) with q, k RMS-normed
/// (`norm_q`, `norm_k`) and the image keys and values from `add_k_proj` (+ `norm_added_k`) and
/// `add_v_proj`, computed here in f64 from the graph's own inputs to the layer. The image term must
/// be a sizeable part of the result, so a graph without it fails.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn wan_i2v_image_branch_matches_closed_form() {
    let ckpt = Checkpoint::open(&fixture("wan-i2v-tiny").join("ckpt")).unwrap();
    let model = build_model(&ckpt, &wan_i2v_tiny_shapes(512)).unwrap();
    assert_eq!(kinds(&model), repeat(&["full", "cross", "cross"], 2));
    // The two cross sites' sum is projected once: neither has an output projection of its own.
    let map = ditc::analysis::analyse(&model);
    assert!(map.attention[0].output.is_some());
    assert!(map.attention[1].output.is_none() && map.attention[2].output.is_none());
    let inputs = vec![
        Tensor::from_f32(
            "hidden_states",
            vec![1, 12, 3, 8, 8],
            &pseudo_random("x", 12 * 192),
        ),
        Tensor::from_f32("timestep", vec![1], &[612.5]),
        Tensor::from_f32(
            "encoder_hidden_states",
            vec![1, 512, 24],
            &pseudo_random("text", 512 * 24),
        ),
        Tensor::from_f32(
            "encoder_hidden_states_image",
            vec![1, 5, 20],
            &pseudo_random("image", 100)
                .iter()
                .map(|v| 4.0 * v)
                .collect::<Vec<_>>(),
        ),
    ];
    let probes = [
        "blocks.0.norm2",
        "condition_embedder.text_embedder.linear_2/unflatten",
        "condition_embedder.image_embedder.norm2",
        "blocks.0.attn2.to_out.0/unflatten",
    ];
    let got = run_with_probes(&model, &inputs, &probes);
    let dim = 32;
    let (x, text, image) = (
        rows(&got[probes[0]], dim),
        rows(&got[probes[1]], dim),
        rows(&got[probes[2]], dim),
    );
    assert_eq!((x.len(), text.len(), image.len()), (48, 512, 5));
    let w = |n: &str| -> Vec<f64> {
        let t = ckpt.tensors.iter().find(|t| t.name == n).unwrap();
        f64s(&t.to_f32_vec().unwrap())
    };
    let lin = |m: &str, rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let (wt, b) = (
            w(&format!("blocks.0.attn2.{m}.weight")),
            w(&format!("blocks.0.attn2.{m}.bias")),
        );
        let i = rows[0].len();
        rows.iter()
            .map(|r| {
                b.iter()
                    .enumerate()
                    .map(|(o, bias)| bias + (0..i).map(|c| wt[o * i + c] * r[c]).sum::<f64>())
                    .collect()
            })
            .collect()
    };
    let rms = |n: &str, rows: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        let g = w(&format!("blocks.0.attn2.{n}.weight"));
        rows.into_iter()
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                let s = (ms + 1e-6).sqrt();
                r.iter().zip(&g).map(|(v, g)| v / s * g).collect()
            })
            .collect()
    };
    let q = rms("norm_q", lin("to_q", &x));
    let text_out = attention(
        &q,
        &rms("norm_k", lin("to_k", &text)),
        &lin("to_v", &text),
        2,
    );
    let image_k = rms("norm_added_k", lin("add_k_proj", &image));
    let image_out = attention(&q, &image_k, &lin("add_v_proj", &image), 2);
    let sum: Vec<Vec<f64>> = text_out
        .iter()
        .zip(&image_out)
        .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + b).collect())
        .collect();
    let want = lin("to_out.0", &sum).concat();
    let rel = rel_l2(&f64s(&got[probes[3]]), &want);
    let image_norm = image_out.concat().iter().map(|v| v * v).sum::<f64>().sqrt();
    let text_norm = text_out.concat().iter().map(|v| v * v).sum::<f64>().sqrt();
    eprintln!(
        "wan I2V block 0 cross-attention: closed form vs graph rel L2 {rel:.2e}; |image| / |text| = {:.3}",
        image_norm / text_norm
    );
    assert!(rel < 1e-5, "rel L2 {rel}");
    assert!(
        image_norm / text_norm > 0.1,
        "the image branch barely matters"
    );
}

// --- CogVideoX: the pipeline's rotary embedding in closed form -------------------------------------

/// A tiny CogVideoX config with rotary positions: 2 heads x 16, 1 layer; `patch_size_t` for 1.5.
fn cogvideox_rope_config(patch_size_t: Option<i64>, sample_width: i64) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "CogVideoXTransformer3DModel",
        "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
        "time_embed_dim": 24, "text_embed_dim": 20, "num_layers": 1, "sample_width": sample_width,
        "sample_height": 8, "sample_frames": 9, "patch_size": 2, "patch_size_t": patch_size_t,
        "max_text_seq_length": 3, "use_rotary_positional_embeddings": true
    })
}

/// CogVideoX's tensors as diffusers declares them (`CogVideoXPatchEmbed`, `CogVideoXBlock`, ...).
fn cogvideox_shapes(
    [heads, hd, cin, cout, time, text, layers, p]: [i64; 8],
    patch_size_t: Option<i64>,
) -> Shapes {
    let d = heads * hd;
    let mut v = Shapes::new();
    match patch_size_t {
        None => {
            v.push(("patch_embed.proj.weight".into(), vec![d, cin, p, p]));
            v.push(("patch_embed.proj.bias".into(), vec![d]));
        }
        Some(pt) => linear(&mut v, "patch_embed.proj", cin * p * p * pt, d),
    }
    linear(&mut v, "patch_embed.text_proj", text, d);
    linear(&mut v, "time_embedding.linear_1", d, time);
    linear(&mut v, "time_embedding.linear_2", time, time);
    for i in 0..layers {
        let b = format!("transformer_blocks.{i}");
        for n in ["norm1", "norm2"] {
            linear(&mut v, &format!("{b}.{n}.linear"), time, 6 * d);
            norm(&mut v, &format!("{b}.{n}.norm"), d, true);
        }
        norm(&mut v, &format!("{b}.attn1.norm_q"), hd, true);
        norm(&mut v, &format!("{b}.attn1.norm_k"), hd, true);
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            linear(&mut v, &format!("{b}.attn1.{m}"), d, d);
        }
        linear(&mut v, &format!("{b}.ff.net.0.proj"), d, 4 * d);
        linear(&mut v, &format!("{b}.ff.net.2"), 4 * d, d);
    }
    norm(&mut v, "norm_final", d, true);
    linear(&mut v, "norm_out.linear", time, 2 * d);
    norm(&mut v, "norm_out.norm", d, true);
    linear(
        &mut v,
        "proj_out",
        d,
        p * p * patch_size_t.unwrap_or(1) * cout,
    );
    v
}

/// `[row positions, column positions, frame positions]` of a patch grid and its size (f, h, w).
struct RopeGrid {
    rows: Vec<f64>,
    cols: Vec<f64>,
    frames: Vec<f64>,
}

/// Block 0's q and k after the rotary embedding, against diffusers' `apply_rotary_emb` computed here
/// in f64 from the graph's q and k before it: every video token's pair (x[2i], x[2i+1]) rotated by
/// `pos * 10000^(-2j / n)` over head_dim/4 frame dims, then 3/8 row and 3/8 column dims; the text
/// tokens unchanged.
fn assert_rotary_matches(model: &Model, inputs: &[Tensor], grid: &RopeGrid, text: usize) {
    let path = "transformer_blocks.0.attn1";
    let probes = [
        format!("{path}.norm_q"),
        format!("{path}/q/rope"),
        format!("{path}.norm_k"),
        format!("{path}/k/rope"),
    ];
    let refs: Vec<&str> = probes.iter().map(String::as_str).collect();
    let got = run_with_probes(model, inputs, &refs);
    let (hd, heads) = (16usize, 2usize);
    let (dt, ds) = (hd / 4, hd / 8 * 3);
    let (h, w) = (grid.rows.len(), grid.cols.len());
    let video = grid.frames.len() * h * w;
    let seq = text + video;
    let angle = |token: usize, pair: usize| -> f64 {
        let (f, r, c) = (token / (h * w), token / w % h, token % w);
        let (pos, j, n) = if pair < dt / 2 {
            (grid.frames[f], pair, dt)
        } else if pair < dt / 2 + ds / 2 {
            (grid.rows[r], pair - dt / 2, ds)
        } else {
            (grid.cols[c], pair - dt / 2 - ds / 2, ds)
        };
        pos / 10000f64.powf((2 * j) as f64 / n as f64)
    };
    for (before, after) in [(&probes[0], &probes[1]), (&probes[2], &probes[3])] {
        let x = f64s(&got[before]);
        assert_eq!(x.len(), heads * seq * hd);
        let mut want = x.clone();
        for head in 0..heads {
            for tok in text..seq {
                let base = (head * seq + tok) * hd;
                for i in 0..hd / 2 {
                    let (a, b) = (x[base + 2 * i], x[base + 2 * i + 1]);
                    let (s, c) = angle(tok - text, i).sin_cos();
                    want[base + 2 * i] = a * c - b * s;
                    want[base + 2 * i + 1] = b * c + a * s;
                }
            }
        }
        let rel = rel_l2(&f64s(&got[after]), &want);
        let moved = rel_l2(&x, &want);
        eprintln!(
            "{after}: closed form vs graph rel L2 {rel:.2e} (the rotation moves it by {moved:.2})"
        );
        assert!(rel < 1e-6, "{after}: rel L2 {rel}");
        assert!(moved > 0.1, "{after}: the rotation should matter");
    }
}

fn cogvideox_inputs(frames: i64, h: i64, w: i64) -> Vec<Tensor> {
    let n = (frames * 4 * h * w) as usize;
    vec![
        Tensor::from_f32(
            "hidden_states",
            vec![1, frames, 4, h, w],
            &pseudo_random("x", n),
        ),
        Tensor::from_f32(
            "encoder_hidden_states",
            vec![1, 3, 20],
            &pseudo_random("c", 60),
        ),
        Tensor::from_i64("timestep", vec![1], &[321]),
    ]
}

/// CogVideoX 1.0 (5b): an 8 x 8 latent (4 x 4 patches) on a model whose base grid is 4 x 6
/// (`sample_height` 8, `sample_width` 12). `get_resize_crop_region_for_grid((4, 4), 6, 4)`: the grid is
/// taller than the base (1 > 4/6), so it is resized to height 4, width round(4 / 4 * 4) = 4 and centred:
/// top 0, left round((6 - 4) / 2) = 1, i.e. ((0, 1), (4, 5)). Rows are linspace(0, 4 * 3/4, 4) =
/// 0, 1, 2, 3, columns linspace(1, 5 * 3/4, 4) = 1, 1.9167, 2.8333, 3.75, frames linspace(0, 3 * 2/3, 3)
/// = 0, 1, 2.
#[test]
fn cogvideox_5b_rotary_embedding_matches_closed_form() {
    let tmp = tempfile::tempdir().unwrap();
    let config = cogvideox_rope_config(None, 12);
    common::write_f32_checkpoint(
        tmp.path(),
        &config,
        &cogvideox_shapes([2, 16, 4, 4, 24, 20, 1, 2], None),
    );
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let opts = BuildOptions {
        width: Some(8),
        ..Default::default()
    };
    let model = build_model(&ckpt, &opts).unwrap();
    let step = (3.75 - 1.0) / 3.0;
    let grid = RopeGrid {
        rows: vec![0.0, 1.0, 2.0, 3.0],
        cols: vec![1.0, 1.0 + step, 3.75 - step, 3.75],
        frames: vec![0.0, 1.0, 2.0],
    };
    let inputs = cogvideox_inputs(3, 8, 8);
    assert_rotary_matches(&model, &inputs, &grid, 3);
    assert_eq!(kinds(&model), ["full"], "joint attention with RoPE");
    let out = run_with_probes(&model, &inputs, &[]);
    assert!(out["sample"].iter().all(|v| v.is_finite()));
    assert_eq!(out["sample"].len(), 3 * 4 * 8 * 8);
}

/// CogVideoX 1.5: `patch_size_t` 2, 9 sample frames = 3 latent frames, padded to 4 as the pipeline
/// pads them (2 temporal patches); integer positions (`grid_type = "slice"`): frames 0, 1, rows and
/// columns 0..4.
#[test]
fn cogvideox_15_rotary_embedding_matches_closed_form() {
    let tmp = tempfile::tempdir().unwrap();
    let config = cogvideox_rope_config(Some(2), 8);
    common::write_f32_checkpoint(
        tmp.path(),
        &config,
        &cogvideox_shapes([2, 16, 4, 4, 24, 20, 1, 2], Some(2)),
    );
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let model = build_model(&ckpt, &BuildOptions::default()).unwrap();
    let frames = model.graph.inputs[0].shape().unwrap()[1].value();
    assert_eq!(
        frames,
        Some(4),
        "3 latent frames padded to a multiple of patch_size_t"
    );
    let grid = RopeGrid {
        rows: vec![0.0, 1.0, 2.0, 3.0],
        cols: vec![0.0, 1.0, 2.0, 3.0],
        frames: vec![0.0, 1.0],
    };
    assert_rotary_matches(&model, &cogvideox_inputs(4, 8, 8), &grid, 3);
    // Larger than the base grid: diffusers' slice table cannot cover it.
    let err = build_model(
        &ckpt,
        &BuildOptions {
            height: Some(10),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("sample_height"), "{err:#}");
}

// --- Wan2.2: per-token timesteps ------------------------------------------------------------------

fn wan_tiny_inputs(timestep: Tensor) -> Vec<Tensor> {
    vec![
        Tensor::from_f32(
            "hidden_states",
            vec![1, 8, 2, 4, 4],
            &pseudo_random("x", 256),
        ),
        timestep,
        Tensor::from_f32(
            "encoder_hidden_states",
            vec![1, 8, 48],
            &pseudo_random("c", 384),
        ),
    ]
}

fn wan_tiny_shapes(per_token: bool) -> BuildOptions {
    BuildOptions {
        frames: Some(2),
        height: Some(4),
        width: Some(4),
        text_len: Some(8),
        timestep_per_token: per_token,
        ..Default::default()
    }
}

fn layer_norm(x: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    x.iter().map(|v| (v - mean) / (var + eps).sqrt()).collect()
}

/// `timestep` [B, tokens] (Wan2.2 TI2V's `expand_timesteps`) on the wan-tiny checkpoint, 8 tokens:
/// - all entries equal to t: the same output as the scalar-timestep graph at t (max rel ≤ 1e-5);
/// - the first frame's 4 tokens at 0 and the others at 700.5 (the TI2V pattern: the conditioning frame
///   is clean): every per-token modulation (block 0's six, the final layer's two) equals, row by row,
///   the scalar graph's modulation at that token's timestep; and each use of them (the two modulated
///   norms, the two gates of block 0, the final modulated norm) equals the formula computed here in f64
///   from the graph's own values before it.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn wan_per_token_timesteps() {
    let ckpt = Checkpoint::open(&fixture("wan-tiny").join("ckpt")).unwrap();
    let per_token = build_model(&ckpt, &wan_tiny_shapes(true)).unwrap();
    let scalar = build_model(&ckpt, &wan_tiny_shapes(false)).unwrap();
    assert_eq!(
        per_token.graph.inputs[1].shape().unwrap().len(),
        2,
        "timestep [B, tokens]"
    );
    let token_ts = |ts: &[f32]| Tensor::from_f32("timestep", vec![1, 8], ts);
    let scalar_t = |t: f32| Tensor::from_f32("timestep", vec![1], &[t]);

    let same = run_with_probes(&per_token, &wan_tiny_inputs(token_ts(&[612.25; 8])), &[]);
    let reference = run_with_probes(&scalar, &wan_tiny_inputs(scalar_t(612.25)), &[]);
    let f = ditc::metrics::compare(&same["sample"], &reference["sample"]);
    eprintln!(
        "equal per-token timesteps vs scalar: max rel {:.2e}",
        f.max_rel
    );
    assert!(f.max_rel <= 1e-5, "max rel {}", f.max_rel);

    let ts = [0.0, 0.0, 0.0, 0.0, 700.5, 700.5, 700.5, 700.5];
    let mods: Vec<String> = (0..6)
        .map(|k| format!("blocks.0/modulation_chunks/{k}"))
        .chain((0..2).map(|k| format!("norm_out/chunks/{k}")))
        .collect();
    let scalar_mods: Vec<String> = (0..6)
        .map(|k| format!("blocks.0/modulation_chunks:{k}"))
        .chain((0..2).map(|k| format!("norm_out/chunks:{k}")))
        .collect();
    let uses = [
        "patch_embedding/tokens",
        "blocks.0.norm1/modulate",
        "blocks.0.attn1.to_out.0/unflatten",
        "blocks.0.attn1/gate",
        "blocks.0.attn2/residual",
        "blocks.0.norm3/modulate",
        "blocks.0.ffn.net.2/unflatten",
        "blocks.0.ffn/gate",
        "blocks.2.ffn/residual",
        "norm_out/modulate",
    ];
    let probes: Vec<&str> = mods.iter().map(String::as_str).chain(uses).collect();
    let got = run_with_probes(&per_token, &wan_tiny_inputs(token_ts(&ts)), &probes);
    let scalar_probes: Vec<&str> = scalar_mods.iter().map(String::as_str).collect();
    let at: BTreeMap<u32, BTreeMap<String, Vec<f32>>> = [0.0f32, 700.5]
        .iter()
        .map(|&t| {
            let out = run_with_probes(&scalar, &wan_tiny_inputs(scalar_t(t)), &scalar_probes);
            (t.to_bits(), out)
        })
        .collect();
    let dim = 64;
    for (m, s) in mods.iter().zip(&scalar_mods) {
        let rows = &got[m];
        assert_eq!(rows.len(), 8 * dim, "{m}: [1, 8, 64]");
        let want: Vec<f32> = ts
            .iter()
            .flat_map(|t| at[&t.to_bits()][s].clone())
            .collect();
        let f = ditc::metrics::compare(rows, &want);
        assert!(
            f.max_rel <= 1e-6,
            "{m}: max rel {} vs the scalar graph",
            f.max_rel
        );
        let differ = ditc::metrics::compare(&rows[..dim], &rows[4 * dim..5 * dim]);
        assert!(
            differ.rel_l2 > 1e-2,
            "{m}: the two timesteps should give different rows"
        );
    }
    let token = |name: &str, j: usize| f64s(&got[name][j * dim..(j + 1) * dim]);
    let check = |what: &str, want: Vec<f64>, got_name: &str| {
        let g = f64s(&got[got_name]);
        let rel = rel_l2(&g, &want);
        eprintln!("per-token {what}: closed form vs graph rel L2 {rel:.2e}");
        assert!(rel < 1e-5, "{what}: rel L2 {rel}");
    };
    let modulated = |x: &str, scale: &str, shift: &str| -> Vec<f64> {
        (0..8)
            .flat_map(|j| {
                let (s, t) = (token(scale, j), token(shift, j));
                layer_norm(&token(x, j), 1e-6)
                    .iter()
                    .enumerate()
                    .map(|(c, v)| v * (1.0 + s[c]) + t[c])
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let gated = |x: &str, gate: &str| -> Vec<f64> {
        (0..8)
            .flat_map(|j| {
                let g = token(gate, j);
                token(x, j)
                    .iter()
                    .zip(g)
                    .map(|(v, g)| v * g)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    check("norm1", modulated(uses[0], &mods[1], &mods[0]), uses[1]);
    check("attn1 gate", gated(uses[2], &mods[2]), uses[3]);
    check("norm3", modulated(uses[4], &mods[4], &mods[3]), uses[5]);
    check("ffn gate", gated(uses[6], &mods[5]), uses[7]);
    check("norm_out", modulated(uses[8], &mods[7], &mods[6]), uses[9]);
}

// --- refusals --------------------------------------------------------------------------------------

fn build_error(class: &str, config: serde_json::Value, opts: &BuildOptions) -> String {
    let ckpt = common::sparse_bf16_checkpoint(class, &config, &Shapes::new());
    format!("{:#}", build_model(&ckpt, opts).unwrap_err())
}

/// Config values the builders do not reproduce are refused naming the config key (before any weight).
#[test]
fn unsupported_values_are_refused_naming_the_key() {
    let cog = "CogVideoXTransformer3DModel";
    let rope = cogvideox_rope_config(None, 12);
    let with = |base: &serde_json::Value, key: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[key] = v;
        c
    };
    let none = BuildOptions::default();
    for (config, opts, key) in [
        (
            with(&rope, "use_learned_positional_embeddings", true.into()),
            &none,
            "use_learned_positional_embeddings",
        ),
        (
            with(&rope, "ofs_embed_dim", 512.into()),
            &none,
            "ofs_embed_dim",
        ),
        (
            with(&rope, "attention_head_dim", 24.into()),
            &none,
            "attention_head_dim 24",
        ),
        (
            with(
                &with(&rope, "use_rotary_positional_embeddings", false.into()),
                "patch_size_t",
                2.into(),
            ),
            &none,
            "patch_size_t without use_rotary_positional_embeddings",
        ),
        (
            with(&rope, "use_rotary_positional_embeddings", false.into()),
            &BuildOptions {
                rotary_emb: Some(RotaryEmb::Pipeline),
                ..Default::default()
            },
            "use_rotary_positional_embeddings",
        ),
    ] {
        let err = build_error(cog, config, opts);
        assert!(err.contains(key), "expected '{key}' in: {err}");
    }
    let wan = "WanTransformer3DModel";
    let i2v = serde_json::json!({
        "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 12, "out_channels": 4,
        "text_dim": 24, "freq_dim": 32, "ffn_dim": 64, "num_layers": 1, "image_dim": 20,
        "added_kv_proj_dim": 32, "rope_max_seq_len": 64
    });
    let t2v = with(
        &with(&i2v, "image_dim", serde_json::Value::Null),
        "added_kv_proj_dim",
        serde_json::Value::Null,
    );
    for (config, opts, key) in [
        (
            with(&i2v, "pos_embed_seq_len", 514.into()),
            &none,
            "pos_embed_seq_len",
        ),
        (
            with(&i2v, "added_kv_proj_dim", 16.into()),
            &none,
            "added_kv_proj_dim 16",
        ),
        (
            with(&i2v, "added_kv_proj_dim", serde_json::Value::Null),
            &none,
            "image_dim without added_kv_proj_dim",
        ),
        (
            t2v,
            &BuildOptions {
                image_len: Some(5),
                ..Default::default()
            },
            "no image_dim",
        ),
    ] {
        let err = build_error(wan, config, opts);
        assert!(err.contains(key), "expected '{key}' in: {err}");
    }
}

// --- real layouts ---------------------------------------------------------------------------------

/// THUDM/CogVideoX-5b's transformer config.json (diffusers format).
fn cogvideox_5b_config() -> serde_json::Value {
    serde_json::json!({
        "activation_fn": "gelu-approximate", "attention_bias": true, "attention_head_dim": 64,
        "dropout": 0.0, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 16,
        "max_text_seq_length": 226, "norm_elementwise_affine": true, "norm_eps": 1e-05,
        "num_attention_heads": 48, "num_layers": 42, "out_channels": 16, "patch_size": 2,
        "sample_frames": 49, "sample_height": 60, "sample_width": 90,
        "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
        "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
        "timestep_activation_fn": "silu", "use_learned_positional_embeddings": false,
        "use_rotary_positional_embeddings": true
    })
}

/// Wan-AI/Wan2.1-I2V-14B-480P-Diffusers' transformer config.json.
fn wan_i2v_14b_config() -> serde_json::Value {
    serde_json::json!({
        "added_kv_proj_dim": 5120, "attention_head_dim": 128, "cross_attn_norm": true, "eps": 1e-06,
        "ffn_dim": 13824, "freq_dim": 256, "image_dim": 1280, "in_channels": 36,
        "num_attention_heads": 40, "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2],
        "pos_embed_seq_len": null, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
        "text_dim": 4096
    })
}

/// Every tensor of `WanTransformer3DModel` with image conditioning, as diffusers declares it.
fn wan_i2v_shapes([heads, hd, cin, cout, text, freq, ffn, layers, image]: [i64; 9]) -> Shapes {
    let d = heads * hd;
    let mut v: Shapes = vec![
        ("patch_embedding.weight".into(), vec![d, cin, 1, 2, 2]),
        ("patch_embedding.bias".into(), vec![d]),
        ("scale_shift_table".into(), vec![1, 2, d]),
    ];
    let c = "condition_embedder";
    linear(&mut v, &format!("{c}.time_embedder.linear_1"), freq, d);
    linear(&mut v, &format!("{c}.time_embedder.linear_2"), d, d);
    linear(&mut v, &format!("{c}.time_proj"), d, 6 * d);
    linear(&mut v, &format!("{c}.text_embedder.linear_1"), text, d);
    linear(&mut v, &format!("{c}.text_embedder.linear_2"), d, d);
    norm(&mut v, &format!("{c}.image_embedder.norm1"), image, true);
    linear(
        &mut v,
        &format!("{c}.image_embedder.ff.net.0.proj"),
        image,
        image,
    );
    linear(&mut v, &format!("{c}.image_embedder.ff.net.2"), image, d);
    norm(&mut v, &format!("{c}.image_embedder.norm2"), d, true);
    for i in 0..layers {
        let b = format!("blocks.{i}");
        v.push((format!("{b}.scale_shift_table"), vec![1, 6, d]));
        for a in ["attn1", "attn2"] {
            for m in ["to_q", "to_k", "to_v", "to_out.0"] {
                linear(&mut v, &format!("{b}.{a}.{m}"), d, d);
            }
            norm(&mut v, &format!("{b}.{a}.norm_q"), d, false);
            norm(&mut v, &format!("{b}.{a}.norm_k"), d, false);
        }
        linear(&mut v, &format!("{b}.attn2.add_k_proj"), d, d);
        linear(&mut v, &format!("{b}.attn2.add_v_proj"), d, d);
        norm(&mut v, &format!("{b}.attn2.norm_added_k"), d, false);
        norm(&mut v, &format!("{b}.norm2"), d, true);
        linear(&mut v, &format!("{b}.ffn.net.0.proj"), d, ffn);
        linear(&mut v, &format!("{b}.ffn.net.2"), ffn, d);
    }
    linear(&mut v, "proj_out", d, cout * 4);
    v
}

/// The published CogVideoX-5b and Wan2.1-I2V-14B-480P layouts (tensor names and shapes from diffusers'
/// modeling code, weights a sparse BF16 file) build with nothing missing, misshapen or unused; their
/// parameter counts equal the config's arithmetic (written out here per module); every BF16 weight is
/// kept and cast in the graph; the attention map has each block's sites of the right kinds.
#[test]
fn real_cogvideox_5b_and_wan_i2v_14b_layouts_are_accepted() {
    // CogVideoX-5b: D = 48 x 64 = 3072, T = 512. Per block: two adaLN-zero linears T -> 6D and their
    // LayerNorms, per-head q/k LayerNorms (64), q/k/v/out D -> D, FFN D -> 4D -> D. Outside: the patch
    // conv (16 x 2 x 2 -> D), text projection 4096 -> D, time MLP D -> T -> T, norm_final, the final
    // adaLN linear T -> 2D and its LayerNorm, proj_out D -> 2 x 2 x 16.
    let (d, t) = (3072i64, 512i64);
    let block = 2 * (t * 6 * d + 6 * d + 2 * d)
        + 2 * 2 * 64
        + 4 * (d * d + d)
        + (d * 4 * d + 4 * d)
        + (4 * d * d + d);
    let outside = (d * 64 + d)
        + (4096 * d + d)
        + (d * t + t)
        + (t * t + t)
        + 2 * d
        + (t * 2 * d + 2 * d)
        + 2 * d
        + (d * 64 + 64);
    let cog_params = 42 * block + outside;
    // Wan2.1-I2V-14B: D = 40 x 128 = 5120. Per block: the table (6D), self- and cross-attention
    // (4 linears D -> D, RMS q/k weights), the image keys/values (2 linears D -> D, norm_added_k),
    // norm2 (LayerNorm), FFN D -> 13824 -> D. Outside: patch conv (36 x 1 x 2 x 2 -> D), the final table
    // (2D), time MLP 256 -> D -> D, time_proj D -> 6D, text MLP 4096 -> D -> D, the image embedder
    // (LayerNorm 1280, 1280 -> 1280 -> D, LayerNorm D), proj_out D -> 16 x 4.
    let (d, f) = (5120i64, 13824i64);
    let block = 6 * d
        + 2 * (4 * (d * d + d) + 2 * d)
        + 2 * (d * d + d)
        + d
        + 2 * d
        + (d * f + f)
        + (f * d + d);
    let outside = (d * 36 * 4 + d)
        + 2 * d
        + (256 * d + d)
        + (d * d + d)
        + (d * 6 * d + 6 * d)
        + (4096 * d + d)
        + (d * d + d)
        + 2 * 1280
        + (1280 * 1280 + 1280)
        + (1280 * d + d)
        + 2 * d
        + (d * 64 + 64);
    let wan_params = 40 * block + outside;
    let cases = [
        (
            "CogVideoX-5b",
            "CogVideoXTransformer3DModel",
            cogvideox_5b_config(),
            cogvideox_shapes([48, 64, 16, 16, 512, 4096, 42, 2], None),
            cog_params,
            BuildOptions {
                frames: Some(2),
                height: Some(4),
                width: Some(4),
                ..Default::default()
            },
            repeat(&["full"], 42),
        ),
        (
            "Wan2.1-I2V-14B-480P",
            "WanTransformer3DModel",
            wan_i2v_14b_config(),
            wan_i2v_shapes([40, 128, 36, 16, 4096, 256, 13824, 40, 1280]),
            wan_params,
            // 512 text + 257 image tokens (the pipeline's), so the image keys/values are in the graph.
            BuildOptions {
                frames: Some(2),
                height: Some(4),
                width: Some(4),
                ..Default::default()
            },
            repeat(&["full", "cross", "cross"], 40),
        ),
    ];
    for (label, class, config, shapes, params, opts, want_kinds) in cases {
        let ckpt = common::sparse_bf16_checkpoint(class, &config, &shapes);
        assert_eq!(
            ckpt.parameters() as i64,
            params,
            "{label}: config arithmetic"
        );
        let model = build_model(&ckpt, &opts).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        let casts = model
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Cast" && n.name.ends_with("/cast"))
            .count();
        assert_eq!(
            casts,
            shapes.len(),
            "{label}: every BF16 weight cast in the graph"
        );
        assert_eq!(kinds(&model), want_kinds, "{label}");
        eprintln!(
            "{label}: {} tensors, {} parameters, {} attention sites",
            shapes.len(),
            ckpt.parameters(),
            want_kinds.len()
        );
    }
}
