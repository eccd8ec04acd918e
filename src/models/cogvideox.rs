//! `CogVideoXTransformer3DModel` (diffusers `cogvideox_transformer_3d.py`): CogVideoX 1.0 with sincos
//! positions (CogVideoX-2b) or rotary positions (CogVideoX-5b), and CogVideoX 1.5 (`patch_size_t`:
//! patches of `patch_size_t` frames, rotary positions). Patches (per-frame Conv2d, or 1.5's Linear over
//! `patch_size_t x p x p` cubes) and the projected text are joined into one sequence `[text, video]`;
//! every block runs *joint* full attention over it (LayerNorm'd q/k per head, the rotary embedding on the
//! video tokens' q and k only) and one feed-forward, both modulated by `CogVideoXLayerNormZero`
//! (separate shift/scale/gate for text and video); the final AdaLayerNorm, `proj_out` and unpatchify
//! produce `[B, F, C, H, W]`.
//!
//! The rotary tables are not part of the transformer: `CogVideoXPipeline` computes them for the shapes
//! (`_prepare_rotary_positional_embeddings`) and passes them as `image_rotary_emb`. The graph bakes
//! exactly those tables (`--rotary-emb pipeline`, the default), or leaves them out (`--rotary-emb none`:
//! the transformer's forward without `image_rotary_emb`, which has no positions at all).
//!
//! Inputs `hidden_states` [B, F, C, H, W] (diffusers' CogVideoX layout, declared to the analysis as
//! `ditc.layout=BFCHW`), `encoder_hidden_states` [B, max_text_seq_length, text_embed_dim], `timestep`
//! [B] int64; output `sample` [B, F, C, H, W]. Refused: learned positions and the `ofs` embedding (the
//! image-to-video checkpoints CogVideoX-5b-I2V and 1.5-I2V).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::embed::{sincos_1d, sincos_2d_grid};
use super::graph_builder::GraphBuilder;
use super::layers::tokens;
use super::{BuildOptions, Family, RotaryEmb};
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

/// The latent shape and its patch grid: `frames x height x width` latents in patches of
/// `pt x p x p` (pt = 1 for CogVideoX 1.0) make `f x h x w` video tokens.
struct Grid {
    frames: i64,
    height: i64,
    width: i64,
    pt: i64,
    p: i64,
    f: i64,
    h: i64,
    w: i64,
}

impl Grid {
    fn tokens(&self) -> i64 {
        self.f * self.h * self.w
    }
}

/// The rotary embedding of the video tokens: `[1, 1, video, head_dim/2, 1]` cos and sin constants,
/// one angle per rotated pair (x[2i], x[2i+1]).
type Rope = (String, String);

impl Family for CogVideoX {
    const CLASS: &'static str = "CogVideoXTransformer3DModel";

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        check_supported(&c)?;
        let (cin, dim) = (
            c.in_channels,
            super::inner_dim(c.num_attention_heads, c.attention_head_dim)?,
        );
        let cout = c.out_channels.unwrap_or(cin);
        let g = grid(&c, opts)?;
        let text = opts.text_len.unwrap_or(c.max_text_seq_length);
        if text != c.max_text_seq_length {
            bail!("CogVideoX adds a joint position table of max_text_seq_length = {} text tokens: --text-len must be {}", c.max_text_seq_length, c.max_text_seq_length);
        }
        super::check_table("position", g.tokens(), dim)?;
        let d = Dims {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            text,
            video: g.tokens(),
            time_dim: c.time_embed_dim,
            eps: c.norm_eps,
            affine: c.norm_elementwise_affine,
            bias: c.attention_bias,
        };
        let rotary = match (c.use_rotary_positional_embeddings, opts.rotary_emb) {
            (false, Some(_)) => bail!("--rotary-emb applies to checkpoints with use_rotary_positional_embeddings = true; this one has sincos positions"),
            (false, None) => {
                if dim % 16 != 0 {
                    bail!("the inner dim {dim} must be a multiple of 16 for CogVideoX's 3-D sincos positions");
                }
                false
            }
            (true, Some(RotaryEmb::None)) => false,
            (true, _) => true,
        };

        let x = b.input_with_layout(
            "hidden_states",
            DataType::F32,
            opts.dims(&[g.frames, cin, g.height, g.width]),
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

        // patch_embed: text projection, video patches, sincos positions on the video part (2b only).
        let mut text_h = b.linear(
            "patch_embed.text_proj",
            &enc,
            &tokens(text),
            c.text_embed_dim,
            dim,
            true,
        );
        let mut video = match c.patch_size_t {
            None => frame_patches(b, &c, &g, dim, &x),
            Some(_) => cube_patches(b, &g, cin, dim, &x),
        };
        if !c.use_rotary_positional_embeddings {
            let table = positions(
                &c,
                dim as usize,
                g.frames as usize,
                g.h as usize,
                g.w as usize,
            );
            let pos = b.const_f32("patch_embed.pos_embedding", vec![1, d.video, dim], &table);
            video = b.add("patch_embed/add_positions", &video, &pos);
        }
        let rope = if rotary {
            let (cos, sin) = rotary_tables(&c, &g)?;
            let shape = vec![1, 1, d.video, c.attention_head_dim / 2, 1];
            Some((
                b.const_f32("rope.freqs_cos", shape.clone(), &cos),
                b.const_f32("rope.freqs_sin", shape, &sin),
            ))
        } else {
            None
        };

        for i in 0..c.num_layers {
            (video, text_h) = block(
                b,
                &format!("transformer_blocks.{i}"),
                &d,
                (&video, &text_h),
                &temb,
                rope.as_ref(),
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
        let patch = g.pt * g.p * g.p * cout;
        let x = b.linear("proj_out", &x, &tokens(d.video), dim, patch, true);
        let x = unpatchify(b, &g, cout, &x);
        b.output(
            &x,
            "sample",
            DataType::F32,
            opts.dims(&[g.frames, cout, g.height, g.width]),
        );
        Ok(())
    }
}

fn check_supported(c: &Config) -> Result<()> {
    let mut refused = Vec::new();
    if c.use_learned_positional_embeddings {
        refused.push("use_learned_positional_embeddings (CogVideoX-5b-I2V's learned positions)");
    }
    if c.patch_size_t.is_some() && !c.use_rotary_positional_embeddings {
        refused.push("patch_size_t without use_rotary_positional_embeddings (diffusers' sincos table does not count temporal patches)");
    }
    if c.ofs_embed_dim.is_some() {
        refused.push("ofs_embed_dim (CogVideoX 1.5-I2V's ofs embedding)");
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

/// The latent shape (options, else the config's sample size) and its patch grid, checked. CogVideoX
/// 1.5's default frames are rounded up to a multiple of `patch_size_t`, as `CogVideoXPipeline` pads
/// its latents.
fn grid(c: &Config, opts: &BuildOptions) -> Result<Grid> {
    let p = c.patch_size;
    let pt = c.patch_size_t.unwrap_or(1);
    let latent_frames = (c.sample_frames - 1) / c.temporal_compression_ratio + 1;
    let frames = opts.frames.unwrap_or((latent_frames + pt - 1) / pt * pt);
    let (height, width) = opts.latent_size(c.sample_height, c.sample_width);
    super::check_divisible("frames", frames, pt, "patch_size_t")?;
    super::check_divisible("height", height, p, "the patch size")?;
    super::check_divisible("width", width, p, "the patch size")?;
    Ok(Grid {
        frames,
        height,
        width,
        pt,
        p,
        f: frames / pt,
        h: height / p,
        w: width / p,
    })
}

/// CogVideoX 1.0's `patch_embed.proj`: a Conv2d per frame; tokens frame-major `[B, F*h*w, dim]`.
fn frame_patches(b: &mut GraphBuilder, c: &Config, g: &Grid, dim: i64, x: &str) -> String {
    let (cin, p) = (c.in_channels, g.p);
    let x = b.reshape(
        "patch_embed/frames_as_batch",
        x,
        &[-1, cin, g.height, g.width],
    );
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
    let x = b.reshape("patch_embed/flatten", &x, &[-1, g.frames, dim, g.h * g.w]);
    let x = b.transpose("patch_embed/tokens", &x, &[0, 1, 3, 2]);
    b.reshape("patch_embed/sequence", &x, &[-1, g.tokens(), dim])
}

/// CogVideoX 1.5's `patch_embed.proj`: a Linear over each `pt x p x p` cube of the `[B, F, C, H, W]`
/// latent, its features ordered (C, pt, p, p) as diffusers' permute leaves them.
fn cube_patches(b: &mut GraphBuilder, g: &Grid, cin: i64, dim: i64, x: &str) -> String {
    let (pt, p) = (g.pt, g.p);
    // [B, F, C, H, W] -> [B, f, pt, C, h, p, w, p] -> [B, f, h, w, C, pt, p, p]
    let x = b.reshape("patch_embed/cubes", x, &[-1, g.f, pt, cin, g.h, p, g.w, p]);
    let x = b.transpose("patch_embed/cube_features", &x, &[0, 1, 4, 6, 3, 2, 5, 7]);
    let features = cin * pt * p * p;
    let x = b.reshape("patch_embed/sequence", &x, &[-1, g.tokens(), features]);
    b.linear(
        "patch_embed.proj",
        &x,
        &tokens(g.tokens()),
        features,
        dim,
        true,
    )
}

/// `proj_out`'s tokens back to `[B, F, C, H, W]` (diffusers' CogVideoX 1.0 and 1.5 unpatchify).
fn unpatchify(b: &mut GraphBuilder, g: &Grid, cout: i64, x: &str) -> String {
    let (p, pt) = (g.p, g.pt);
    // [B, f*h*w, C*pt*p*p] -> [B, f, h, w, C, pt, p, p] -> [B, f, pt, C, h, p, w, p] -> [B, F, C, H, W]
    let x = b.reshape("unpatchify/grid", x, &[-1, g.f, g.h, g.w, cout, pt, p, p]);
    let x = b.transpose("unpatchify/permute", &x, &[0, 1, 5, 4, 2, 6, 3, 7]);
    b.reshape("unpatchify", &x, &[-1, g.frames, cout, g.height, g.width])
}

/// `CogVideoXPipeline._prepare_rotary_positional_embeddings` for this grid: diffusers'
/// `get_3d_rotary_pos_embed` over (frames, rows, columns) with head_dim/4 temporal and 3/8 x head_dim
/// dims for each spatial axis, in float32 as torch computes it. CogVideoX 1.0 places the grid by
/// `get_resize_crop_region_for_grid` on the `sample_height/p x sample_width/p` base grid (`linspace`
/// positions); 1.5 uses integer positions (`grid_type = "slice"`), which the base grid must cover.
/// Returns (cos, sin), each `[tokens, head_dim/2]`: one angle per rotated pair.
fn rotary_tables(c: &Config, g: &Grid) -> Result<(Vec<f32>, Vec<f32>)> {
    let hd = c.attention_head_dim;
    if hd % 16 != 0 {
        bail!("attention_head_dim {hd}: CogVideoXPipeline's 3-D rotary table splits it into {} + {} + {} dims (frames, rows, columns), which diffusers computes only for multiples of 16 (every part even); --rotary-emb none builds the transformer without it", hd / 4, hd / 8 * 3, hd / 8 * 3);
    }
    let (base_h, base_w) = (c.sample_height / g.p, c.sample_width / g.p);
    let (rows, cols, times) = match c.patch_size_t {
        None => {
            let ((top, left), (bottom, right)) = resize_crop_region((g.h, g.w), base_w, base_h);
            let end = |stop: i64, n: i64| stop as f64 * (n - 1) as f64 / n as f64;
            let f = g.f as f64;
            (
                linspace_f32(top as f64, end(bottom, g.h), g.h as usize),
                linspace_f32(left as f64, end(right, g.w), g.w as usize),
                linspace_f32(0.0, f * (f - 1.0) / f, g.f as usize),
            )
        }
        Some(_) => {
            if g.h > base_h || g.w > base_w {
                bail!("a {} x {} patch grid is larger than the rotary table of CogVideoX 1.5 (sample_height / patch_size x sample_width / patch_size = {base_h} x {base_w}): diffusers cannot run these shapes", g.h, g.w);
            }
            let arange = |n: i64| (0..n).map(|i| i as f32).collect::<Vec<f32>>();
            (arange(g.h), arange(g.w), arange(g.f))
        }
    };
    let (dt, ds) = (hd as usize / 4, hd as usize / 8 * 3);
    let (ft, fh, fw) = (
        rotary_freqs(dt, &times),
        rotary_freqs(ds, &rows),
        rotary_freqs(ds, &cols),
    );
    let (half_t, half_s) = (dt / 2, ds / 2);
    let n = (g.f * g.h * g.w) as usize * hd as usize / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for t in 0..g.f as usize {
        for r in 0..g.h as usize {
            for col in 0..g.w as usize {
                for angles in [
                    &ft[t * half_t..(t + 1) * half_t],
                    &fh[r * half_s..(r + 1) * half_s],
                    &fw[col * half_s..(col + 1) * half_s],
                ] {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
    }
    Ok((cos, sin))
}

/// diffusers' `get_1d_rotary_pos_embed(dim, pos, theta=10000, use_real=True)` angles in float32
/// (`freqs_dtype` float32): `pos * 1 / 10000^(2i / dim)`, `[positions, dim/2]` (the repeat-interleaved
/// copies dropped).
fn rotary_freqs(dim: usize, positions: &[f32]) -> Vec<f32> {
    let freqs: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / dim as f32))
        .collect();
    positions
        .iter()
        .flat_map(|&p| freqs.iter().map(move |&f| p * f))
        .collect()
}

/// torch's float32 `linspace(start, end, steps)` (CPU kernel: the first half counts up from `start`,
/// the second half down from `end`).
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps <= 1 {
        return vec![s; steps];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// diffusers' `get_resize_crop_region_for_grid((h, w), tgt_width, tgt_height)`: the grid resized to fit
/// the target and centred, as ((top, left), (bottom, right)); Python's `round` (ties to even).
fn resize_crop_region(
    (h, w): (i64, i64),
    tgt_width: i64,
    tgt_height: i64,
) -> ((i64, i64), (i64, i64)) {
    let (th, tw) = (tgt_height as f64, tgt_width as f64);
    let (hf, wf) = (h as f64, w as f64);
    let (resize_height, resize_width) = if hf / wf > th / tw {
        (tgt_height, (th / hf * wf).round_ties_even() as i64)
    } else {
        ((tw / wf * hf).round_ties_even() as i64, tgt_width)
    };
    let top = ((th - resize_height as f64) / 2.0).round_ties_even() as i64;
    let left = ((tw - resize_width as f64) / 2.0).round_ties_even() as i64;
    ((top, left), (top + resize_height, left + resize_width))
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
    (video, text): (&str, &str),
    temb: &str,
    rope: Option<&Rope>,
) -> (String, String) {
    let seq = d.text + d.video;
    let [v, t, gate, text_gate] = norm_zero(b, &format!("{path}.norm1"), d, video, text, temb);
    let joint = b.concat(&format!("{path}.attn1/joint"), &t, &v, 1);
    let attn = joint_attention(b, &format!("{path}.attn1"), d, &joint, rope);
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

/// Self-attention over the joint sequence with per-head LayerNorm on q and k (`norm_q`, `norm_k`),
/// then the rotary embedding on the video tokens' q and k (`CogVideoXAttnProcessor2_0`).
fn joint_attention(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    x: &str,
    rope: Option<&Rope>,
) -> String {
    let (dim, heads, hd) = (d.dim, d.heads, d.head_dim);
    let seq = d.text + d.video;
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
    let mut q = b.layer_norm(&format!("{path}.norm_q"), &q, hd, 1e-6, true, true);
    let mut k = b.layer_norm(&format!("{path}.norm_k"), &k, hd, 1e-6, true, true);
    if let Some(rope) = rope {
        q = rotate_video(b, &format!("{path}/q/rope"), d, &q, rope);
        k = rotate_video(b, &format!("{path}/k/rope"), d, &k, rope);
    }
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

/// diffusers' `apply_rotary_emb` (`use_real_unbind_dim = -1`) on the video tokens of `x`
/// [B, heads, text + video, head_dim]: each pair (x[2i], x[2i+1]) rotated by its angle,
/// `(x1 cos - x2 sin, x1 sin + x2 cos)`; the text tokens pass unchanged.
fn rotate_video(b: &mut GraphBuilder, name: &str, d: &Dims, x: &str, (cos, sin): &Rope) -> String {
    let parts = b.split_sizes(&format!("{name}/split_text"), x, &[d.text, d.video], 2);
    let pairs = b.reshape(
        &format!("{name}/pairs"),
        &parts[1],
        &[-1, d.heads, d.video, d.head_dim / 2, 2],
    );
    let xs = b.chunk(&format!("{name}/split"), &pairs, 2, -1);
    let (x1, x2) = (&xs[0], &xs[1]);
    let a = b.mul(&format!("{name}/x1cos"), x1, cos);
    let c = b.mul(&format!("{name}/x2sin"), x2, sin);
    let even = b.op(&format!("{name}/even"), "Sub", &[&a, &c], vec![]);
    let e = b.mul(&format!("{name}/x1sin"), x1, sin);
    let f = b.mul(&format!("{name}/x2cos"), x2, cos);
    let odd = b.add(&format!("{name}/odd"), &e, &f);
    let joined = b.concat(&format!("{name}/join"), &even, &odd, -1);
    let video = b.reshape(
        &format!("{name}/video"),
        &joined,
        &[-1, d.heads, d.video, d.head_dim],
    );
    b.concat(name, &parts[0], &video, 2)
}

#[cfg(test)]
mod tests {
    use super::{linspace_f32, resize_crop_region};

    /// Values worked out by hand from diffusers' `get_resize_crop_region_for_grid`.
    #[test]
    fn crop_region_centres_the_resized_grid() {
        // CogVideoX-5b at its native 480 x 720: the 30 x 45 grid fills the 30 x 45 base.
        assert_eq!(resize_crop_region((30, 45), 45, 30), ((0, 0), (30, 45)));
        // A square 4 x 4 grid on a 4 x 6 base: height 4, width 4, one column of margin on the left.
        assert_eq!(resize_crop_region((4, 4), 6, 4), ((0, 1), (4, 5)));
        // A wide 2 x 8 grid on a 4 x 4 base: width 4, height round(4 / 8 * 2) = 1, top round(1.5) = 2.
        assert_eq!(resize_crop_region((2, 8), 4, 4), ((2, 0), (3, 4)));
        // Ties round to even as Python does: 3 x 6 on 5 x 5 gives height round(2.5) = 2.
        assert_eq!(resize_crop_region((3, 6), 5, 5), ((2, 0), (4, 5)));
    }

    #[test]
    fn linspace_hits_both_ends() {
        assert_eq!(linspace_f32(1.0, 3.75, 4)[3], 3.75);
        assert_eq!(linspace_f32(0.0, 2.0, 3), vec![0.0, 1.0, 2.0]);
        assert_eq!(linspace_f32(2.0, 5.0, 1), vec![2.0]);
    }
}
