//! `CogVideoXTransformer3DModel` (diffusers `cogvideox_transformer_3d.py`), CogVideoX 1.0 with sincos
//! positions (CogVideoX-2b): per-frame Conv2d patches and the projected text joined into one sequence
//! `[text, video]`; every block runs *joint* full attention over it (LayerNorm'd q/k per head) and one
//! feed-forward, both modulated by `CogVideoXLayerNormZero` (separate shift/scale/gate for text and
//! video); the final AdaLayerNorm, `proj_out` and unpatchify produce `[B, F, C, H, W]`.
//!
//! Inputs `hidden_states` [B, F, C, H, W] (diffusers' CogVideoX layout, declared to the analysis as
//! `ditc.layout=BFCHW`), `encoder_hidden_states` [B, max_text_seq_length, text_embed_dim], `timestep`
//! [B] int64; output `sample` [B, F, C, H, W]. Refused: rotary positions (CogVideoX-5b), learned
//! positions, temporal patches and the `ofs` embedding (CogVideoX 1.5).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::embed::{sincos_1d, sincos_2d_grid};
use super::graph_builder::GraphBuilder;
use super::layers::tokens;
use super::{BuildOptions, Family};
use crate::ir::{AttrValue, DataType};

#[derive(Deserialize, Serialize)]
#[serde(default)]
struct Config {
    num_attention_heads: i64,
    attention_head_dim: i64,
    in_channels: i64,
    out_channels: Option<i64>,
    flip_sin_to_cos: bool,
    freq_shift: i64,
    time_embed_dim: i64,
    ofs_embed_dim: Option<i64>,
    text_embed_dim: i64,
    num_layers: i64,
    dropout: f64,
    attention_bias: bool,
    sample_width: i64,
    sample_height: i64,
    sample_frames: i64,
    patch_size: i64,
    patch_size_t: Option<i64>,
    temporal_compression_ratio: i64,
    max_text_seq_length: i64,
    activation_fn: String,
    timestep_activation_fn: String,
    norm_elementwise_affine: bool,
    norm_eps: f64,
    spatial_interpolation_scale: f64,
    temporal_interpolation_scale: f64,
    use_rotary_positional_embeddings: bool,
    use_learned_positional_embeddings: bool,
    patch_bias: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_attention_heads: 30,
            attention_head_dim: 64,
            in_channels: 16,
            out_channels: Some(16),
            flip_sin_to_cos: true,
            freq_shift: 0,
            time_embed_dim: 512,
            ofs_embed_dim: None,
            text_embed_dim: 4096,
            num_layers: 30,
            dropout: 0.0,
            attention_bias: true,
            sample_width: 90,
            sample_height: 60,
            sample_frames: 49,
            patch_size: 2,
            patch_size_t: None,
            temporal_compression_ratio: 4,
            max_text_seq_length: 226,
            activation_fn: "gelu-approximate".into(),
            timestep_activation_fn: "silu".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            spatial_interpolation_scale: 1.875,
            temporal_interpolation_scale: 1.0,
            use_rotary_positional_embeddings: false,
            use_learned_positional_embeddings: false,
            patch_bias: true,
        }
    }
}

pub struct CogVideoX;

/// Sizes one block needs.
struct Dims {
    dim: i64,
    heads: i64,
    head_dim: i64,
    text: i64,
    video: i64,
    time_dim: i64,
    eps: f64,
    affine: bool,
    bias: bool,
}

impl Family for CogVideoX {
    const CLASS: &'static str = "CogVideoXTransformer3DModel";

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        check_supported(&c)?;
        let (cin, p, dim) = (
            c.in_channels,
            c.patch_size,
            super::inner_dim(c.num_attention_heads, c.attention_head_dim)?,
        );
        let cout = c.out_channels.unwrap_or(cin);
        let frames = opts
            .frames
            .unwrap_or((c.sample_frames - 1) / c.temporal_compression_ratio + 1);
        let (height, width) = opts.latent_size(c.sample_height, c.sample_width);
        let text = opts.text_len.unwrap_or(c.max_text_seq_length);
        if text != c.max_text_seq_length {
            bail!("CogVideoX adds a joint position table of max_text_seq_length = {} text tokens: --text-len must be {}", c.max_text_seq_length, c.max_text_seq_length);
        }
        super::check_divisible("height", height, p, "the patch size")?;
        super::check_divisible("width", width, p, "the patch size")?;
        if dim % 16 != 0 {
            bail!(
                "the inner dim {dim} must be a multiple of 16 for CogVideoX's 3-D sincos positions"
            );
        }
        let (h, w) = (height / p, width / p);
        super::check_table("position", frames * h * w, dim)?;
        let d = Dims {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            text,
            video: frames * h * w,
            time_dim: c.time_embed_dim,
            eps: c.norm_eps,
            affine: c.norm_elementwise_affine,
            bias: c.attention_bias,
        };

        let x = b.input_with_layout(
            "hidden_states",
            DataType::F32,
            opts.dims(&[frames, cin, height, width]),
            "BFCHW",
        );
        let enc = b.input(
            "encoder_hidden_states",
            DataType::F32,
            opts.dims(&[text, c.text_embed_dim]),
        );
        let t = b.input(
            "timestep",
            opts.timestep_dtype(Self::TIMESTEP_DTYPE),
            opts.dims(&[]),
        );

        let proj = b.timestep_proj("time_proj", &t, dim, c.flip_sin_to_cos, c.freq_shift as f32);
        let temb = b.timestep_embedding("time_embedding", &proj, dim, c.time_embed_dim);

        // patch_embed: text projection, per-frame patches, positions on the video part.
        let text_h = b.linear(
            "patch_embed.text_proj",
            &enc,
            &tokens(text),
            c.text_embed_dim,
            dim,
            true,
        );
        let x = b.reshape("patch_embed/frames_as_batch", &x, &[-1, cin, height, width]);
        let wt = b.weight("patch_embed.proj.weight", &[dim, cin, p, p]);
        let mut conv_in = vec![x.as_str(), wt.as_str()];
        let bias = c
            .patch_bias
            .then(|| b.weight("patch_embed.proj.bias", &[dim]));
        if let Some(bias) = &bias {
            conv_in.push(bias);
        }
        let x = b.op(
            "patch_embed.proj",
            "Conv",
            &conv_in,
            vec![
                ("kernel_shape", AttrValue::Ints(vec![p, p])),
                ("strides", AttrValue::Ints(vec![p, p])),
            ],
        );
        let x = b.reshape("patch_embed/flatten", &x, &[-1, frames, dim, h * w]);
        let x = b.transpose("patch_embed/tokens", &x, &[0, 1, 3, 2]);
        let x = b.reshape("patch_embed/sequence", &x, &[-1, d.video, dim]);
        let table = positions(&c, dim as usize, frames as usize, h as usize, w as usize);
        let pos = b.const_f32("patch_embed.pos_embedding", vec![1, d.video, dim], &table);
        let mut video = b.add("patch_embed/add_positions", &x, &pos);
        let mut text_h = text_h;

        for i in 0..c.num_layers {
            (video, text_h) = block(
                b,
                &format!("transformer_blocks.{i}"),
                &d,
                &video,
                &text_h,
                &temb,
            );
        }

        let x = b.layer_norm(
            "norm_final",
            &video,
            dim,
            c.norm_eps,
            c.norm_elementwise_affine,
            true,
        );
        let parts = b.adaln_chunks(
            "norm_out.silu",
            "norm_out.linear",
            &temb,
            c.time_embed_dim,
            dim,
            2,
        );
        let x = b.layer_norm(
            "norm_out.norm",
            &x,
            dim,
            c.norm_eps,
            c.norm_elementwise_affine,
            true,
        );
        let x = b.modulate("norm_out/modulate", &x, &parts[1], &parts[0]);
        let x = b.linear("proj_out", &x, &tokens(d.video), dim, p * p * cout, true);
        // [B, F*h*w, C*p*p] -> [B, F, h, w, C, p, p] -> [B, F, C, h, p, w, p] -> [B, F, C, H, W]
        let x = b.reshape("unpatchify/grid", &x, &[-1, frames, h, w, cout, p, p]);
        let x = b.transpose("unpatchify/permute", &x, &[0, 1, 4, 2, 5, 3, 6]);
        let x = b.reshape("unpatchify", &x, &[-1, frames, cout, height, width]);
        b.output(
            &x,
            "sample",
            DataType::F32,
            opts.dims(&[frames, cout, height, width]),
        );
        Ok(())
    }
}

fn check_supported(c: &Config) -> Result<()> {
    let mut refused = Vec::new();
    if c.use_rotary_positional_embeddings {
        refused.push("use_rotary_positional_embeddings (CogVideoX-5b's 3-D RoPE)");
    }
    if c.use_learned_positional_embeddings {
        refused.push("use_learned_positional_embeddings");
    }
    if c.patch_size_t.is_some() {
        refused.push("patch_size_t (CogVideoX 1.5 temporal patches)");
    }
    if c.ofs_embed_dim.is_some() {
        refused.push("ofs_embed_dim (CogVideoX 1.5)");
    }
    if c.activation_fn != "gelu-approximate" {
        refused.push("activation_fn other than 'gelu-approximate'");
    }
    if c.timestep_activation_fn != "silu" {
        refused.push("timestep_activation_fn other than 'silu'");
    }
    if !refused.is_empty() {
        bail!("not implemented for CogVideoX: {}", refused.join(", "));
    }
    Ok(())
}

/// diffusers' `get_3d_sincos_pos_embed` for the video tokens (frame-major): per token, dim/4 temporal
/// sinusoids then 3*dim/4 spatial ones.
fn positions(c: &Config, dim: usize, frames: usize, h: usize, w: usize) -> Vec<f32> {
    let s = c.spatial_interpolation_scale as f32;
    let rows: Vec<f64> = (0..h).map(|i| (i as f32 / s) as f64).collect();
    let cols: Vec<f64> = (0..w).map(|j| (j as f32 / s) as f64).collect();
    let spatial = sincos_2d_grid(3 * dim / 4, &rows, &cols);
    let ts = c.temporal_interpolation_scale as f32;
    let times: Vec<f64> = (0..frames).map(|f| (f as f32 / ts) as f64).collect();
    let temporal = sincos_1d(dim / 4, &times);
    let (dt, ds) = (dim / 4, 3 * dim / 4);
    let mut out = Vec::with_capacity(frames * h * w * dim);
    for f in 0..frames {
        for tok in 0..h * w {
            out.extend(temporal[f * dt..(f + 1) * dt].iter().map(|&v| v as f32));
            out.extend(&spatial[tok * ds..(tok + 1) * ds]);
        }
    }
    out
}

/// `CogVideoXLayerNormZero` at `path`: (normed video, normed text, video gate, text gate).
fn norm_zero(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    video: &str,
    text: &str,
    temb: &str,
) -> [String; 4] {
    let (silu, linear) = (format!("{path}.silu"), format!("{path}.linear"));
    let m = b.adaln_chunks(&silu, &linear, temb, d.time_dim, d.dim, 6);
    let norm = format!("{path}.norm");
    let v = b.layer_norm(&norm, video, d.dim, d.eps, d.affine, true);
    let v = b.modulate(&format!("{path}/modulate_video"), &v, &m[1], &m[0]);
    let t = b.layer_norm(&norm, text, d.dim, d.eps, d.affine, true);
    let t = b.modulate(&format!("{path}/modulate_text"), &t, &m[4], &m[3]);
    [v, t, m[2].clone(), m[5].clone()]
}

/// One `CogVideoXBlock`: joint attention and feed-forward over `[text, video]`; returns (video, text).
fn block(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    video: &str,
    text: &str,
    temb: &str,
) -> (String, String) {
    let seq = d.text + d.video;
    let [v, t, gate, text_gate] = norm_zero(b, &format!("{path}.norm1"), d, video, text, temb);
    let joint = b.concat(&format!("{path}.attn1/joint"), &t, &v, 1);
    let attn = joint_attention(b, &format!("{path}.attn1"), d, &joint, seq);
    let (video, text) = gated_residuals(
        b,
        &format!("{path}.attn1"),
        d,
        &attn,
        (video, text),
        (&gate, &text_gate),
    );

    let [v, t, gate, text_gate] = norm_zero(b, &format!("{path}.norm2"), d, &video, &text, temb);
    let joint = b.concat(&format!("{path}.ff/joint"), &t, &v, 1);
    let ff = b.feed_forward(
        &format!("{path}.ff"),
        &joint,
        &tokens(seq),
        d.dim,
        4 * d.dim,
        true,
    );
    gated_residuals(
        b,
        &format!("{path}.ff"),
        d,
        &ff,
        (&video, &text),
        (&gate, &text_gate),
    )
}

/// `out` over the joint sequence split back into text and video, each gated and added to its stream
/// (named `{name}/residual_video`, `{name}/residual_text`); returns (video, text).
fn gated_residuals(
    b: &mut GraphBuilder,
    name: &str,
    d: &Dims,
    out: &str,
    (video, text): (&str, &str),
    (gate, text_gate): (&str, &str),
) -> (String, String) {
    let parts = b.split_sizes(&format!("{name}/split"), out, &[d.text, d.video], 1);
    let gv = b.mul(&format!("{name}/gate_video"), gate, &parts[1]);
    let video = b.add(&format!("{name}/residual_video"), video, &gv);
    let gt = b.mul(&format!("{name}/gate_text"), text_gate, &parts[0]);
    let text = b.add(&format!("{name}/residual_text"), text, &gt);
    (video, text)
}

/// Self-attention over the joint sequence with per-head LayerNorm on q and k (`norm_q`, `norm_k`).
fn joint_attention(b: &mut GraphBuilder, path: &str, d: &Dims, x: &str, seq: i64) -> String {
    let (dim, heads, hd) = (d.dim, d.heads, d.head_dim);
    let q = b.linear(
        &format!("{path}.to_q"),
        x,
        &tokens(seq),
        dim,
        heads * hd,
        d.bias,
    );
    let k = b.linear(
        &format!("{path}.to_k"),
        x,
        &tokens(seq),
        dim,
        heads * hd,
        d.bias,
    );
    let v = b.linear(
        &format!("{path}.to_v"),
        x,
        &tokens(seq),
        dim,
        heads * hd,
        d.bias,
    );
    let q = b.split_heads(&format!("{path}/q"), &q, seq, heads, hd, false);
    let k = b.split_heads(&format!("{path}/k"), &k, seq, heads, hd, false);
    let q = b.layer_norm(&format!("{path}.norm_q"), &q, hd, 1e-6, true, true);
    let k = b.layer_norm(&format!("{path}.norm_k"), &k, hd, 1e-6, true, true);
    let k = b.transpose(&format!("{path}/k/keys_last"), &k, &[0, 1, 3, 2]);
    let v = b.split_heads(&format!("{path}/v"), &v, seq, heads, hd, false);
    let out = b.sdpa(path, &q, &k, &v, [seq, heads, hd]);
    b.linear(
        &format!("{path}.to_out.0"),
        &out,
        &tokens(seq),
        heads * hd,
        dim,
        true,
    )
}
