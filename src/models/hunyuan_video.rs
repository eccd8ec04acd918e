//! `HunyuanVideoTransformer3DModel` (diffusers `transformer_hunyuan_video.py`), text-to-video: a Conv3d
//! patch embedding; the text tokens refined by `HunyuanVideoTokenRefiner` (self-attention over the
//! text under its attention mask, gated by the timestep and the masked mean of the text); one
//! condition vector from the timestep, the pooled text projection and (with `guidance_embeds`) the
//! guidance; `num_layers` dual-stream blocks (video and text each with their own adaLN-Zero,
//! projections and feed-forward, one joint attention over `[video, text]`), then
//! `num_single_layers` single-stream blocks on the joined sequence (attention and MLP in parallel,
//! one output projection); 3-D rotary positions (`rope_axes_dim`, `rope_theta`) on the video
//! queries and keys only; text keys past the mask's length are masked out of every joint attention;
//! the final `AdaLayerNormContinuous`, `proj_out` and unpatchify to `[B, C, F, H, W]`.
//!
//! Inputs as diffusers' forward: `hidden_states` [B, C, F, H, W], `timestep` [B] float32 (flow
//! matching: the pipeline passes `sigma * 1000` unrounded; int64 with `--timestep-dtype int64`),
//! `encoder_hidden_states` [B, L, text_embed_dim], `encoder_attention_mask` [B, L] int64,
//! `pooled_projections` [B, pooled_projection_dim], and `guidance` [B] float32 (the pipeline passes
//! `guidance_scale * 1000`) when `guidance_embeds`; output `sample`. Refused: `image_condition_type`
//! `token_replace` (I2V with first-frame token modulation) and `qk_norm` other than `rms_norm`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::graph_builder::GraphBuilder;
use super::layers::tokens;
use super::{BuildOptions, Family, TimestepDtype};
use crate::ir::{AttrValue, DataType};

#[derive(Deserialize, Serialize)]
#[serde(default)]
struct Config {
    in_channels: i64,
    out_channels: Option<i64>,
    num_attention_heads: i64,
    attention_head_dim: i64,
    num_layers: i64,
    num_single_layers: i64,
    num_refiner_layers: i64,
    mlp_ratio: f64,
    patch_size: i64,
    patch_size_t: i64,
    qk_norm: Option<String>,
    guidance_embeds: bool,
    text_embed_dim: i64,
    pooled_projection_dim: i64,
    rope_theta: f64,
    rope_axes_dim: Vec<i64>,
    image_condition_type: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            in_channels: 16,
            out_channels: Some(16),
            num_attention_heads: 24,
            attention_head_dim: 128,
            num_layers: 20,
            num_single_layers: 40,
            num_refiner_layers: 2,
            mlp_ratio: 4.0,
            patch_size: 2,
            patch_size_t: 1,
            qk_norm: Some("rms_norm".into()),
            guidance_embeds: true,
            text_embed_dim: 4096,
            pooled_projection_dim: 768,
            rope_theta: 256.0,
            rope_axes_dim: vec![16, 56, 56],
            image_condition_type: None,
        }
    }
}

/// Latent shape of HunyuanVideoPipeline's default 129 x 720 x 1280 video (VAE: 4x in time, 8x in
/// space), and its `max_sequence_length` of text tokens.
const DEFAULT_FRAMES: i64 = 33;
const DEFAULT_HEIGHT: i64 = 90;
const DEFAULT_WIDTH: i64 = 160;
const DEFAULT_TEXT: i64 = 256;
/// Every LayerNorm and RMSNorm of the model uses this epsilon.
const EPS: f64 = 1e-6;
/// Sinusoid channels of every timestep / guidance projection (`Timesteps(256, flip_sin_to_cos=True)`).
const FREQ_DIM: i64 = 256;
/// The token refiner's feed-forward width ratio: diffusers builds `HunyuanVideoTokenRefiner` without
/// passing the model's `mlp_ratio`, so it keeps its own default.
const REFINER_MLP_RATIO: i64 = 4;

pub struct HunyuanVideo;

/// Sizes the blocks need.
struct Dims {
    dim: i64,
    heads: i64,
    head_dim: i64,
    /// Video tokens (f * h * w patches) and text tokens.
    video: i64,
    text: i64,
    /// Hidden width of the dual-stream feed-forwards and of the single-stream MLP.
    mlp: i64,
}

impl Dims {
    fn joint(&self) -> i64 {
        self.video + self.text
    }
}

/// What every joint attention shares: the additive key mask and the rotary tables.
struct Joint<'a> {
    mask: &'a str,
    cos: &'a str,
    sin: &'a str,
}

impl Family for HunyuanVideo {
    const CLASS: &'static str = "HunyuanVideoTransformer3DModel";
    /// Flow matching: HunyuanVideoPipeline passes `sigma * 1000` unrounded.
    const TIMESTEP_DTYPE: TimestepDtype = TimestepDtype::Float32;

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        let rope_axes = check_supported(&c)?;
        let dim = super::inner_dim(c.num_attention_heads, c.attention_head_dim)?;
        let mlp = mlp_width(dim, c.mlp_ratio)?;
        let (pt, p) = (c.patch_size_t, c.patch_size);
        let cout = c.out_channels.unwrap_or(c.in_channels);
        let frames = opts.frames.unwrap_or(DEFAULT_FRAMES);
        let (height, width) = opts.latent_size(DEFAULT_HEIGHT, DEFAULT_WIDTH);
        let text = opts.text_len.unwrap_or(DEFAULT_TEXT);
        super::check_divisible("frames", frames, pt, "patch_size_t")?;
        super::check_divisible("height", height, p, "patch_size")?;
        super::check_divisible("width", width, p, "patch_size")?;
        let grid = [frames / pt, height / p, width / p];
        let video = grid.iter().product();
        super::check_table("rotary", video, c.attention_head_dim)?;
        super::check_table("attention mask", text, text)?;
        let d = Dims {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            video,
            text,
            mlp,
        };

        let x = b.input(
            "hidden_states",
            DataType::F32,
            opts.dims(&[c.in_channels, frames, height, width]),
        );
        let t = b.input(
            "timestep",
            opts.timestep_dtype(Self::TIMESTEP_DTYPE),
            opts.dims(&[]),
        );
        let enc = b.input(
            "encoder_hidden_states",
            DataType::F32,
            opts.dims(&[text, c.text_embed_dim]),
        );
        let mask = b.input("encoder_attention_mask", DataType::I64, opts.dims(&[text]));
        let pooled = b.input(
            "pooled_projections",
            DataType::F32,
            opts.dims(&[c.pooled_projection_dim]),
        );
        let guidance = c
            .guidance_embeds
            .then(|| b.input("guidance", DataType::F32, opts.dims(&[])));

        let temb = condition_embedding(b, &c, dim, &t, &pooled, guidance.as_deref());
        let mut x = patch_embed(b, &x, &c, &d);
        let mut context = token_refiner(b, &c, &d, &enc, &mask, &t);
        let mask = joint_mask(b, &mask, &d);
        let (cos, sin) = rope_tables(b, rope_axes, c.rope_theta, grid);
        let joint = Joint {
            mask: &mask,
            cos: &cos,
            sin: &sin,
        };

        for i in 0..c.num_layers {
            let path = format!("transformer_blocks.{i}");
            (x, context) = dual_block(b, &path, &d, (&x, &context), &temb, &joint);
        }
        // Every single-stream block joins [video, text], runs, and splits again: joined once here.
        let mut h = b.concat("single_transformer_blocks/joint", &x, &context, 1);
        for i in 0..c.num_single_layers {
            let path = format!("single_transformer_blocks.{i}");
            h = single_block(b, &path, &d, &h, &temb, &joint);
        }
        let parts = b.split_sizes("single_transformer_blocks/split", &h, &[video, text], 1);
        let x = output_layer(b, &parts[0], &temb, &d, (&c, grid));
        b.output(
            &x,
            "sample",
            DataType::F32,
            opts.dims(&[cout, frames, height, width]),
        );
        Ok(())
    }
}

/// `norm_out` (`AdaLayerNormContinuous`: scale first, then shift), `proj_out` and unpatchify: the
/// video tokens [B, f*h*w, dim] as `[B, C, F, H, W]`.
fn output_layer(
    b: &mut GraphBuilder,
    x: &str,
    temb: &str,
    d: &Dims,
    (c, [f, h, w]): (&Config, [i64; 3]),
) -> String {
    let (dim, pt, p) = (d.dim, c.patch_size_t, c.patch_size);
    let cout = c.out_channels.unwrap_or(c.in_channels);
    let m = b.adaln_chunks("norm_out.silu", "norm_out.linear", temb, dim, dim, 2);
    let x = b.layer_norm("norm_out.norm", x, dim, EPS, false, false);
    let x = b.modulate("norm_out/modulate", &x, &m[0], &m[1]);
    let out = cout * pt * p * p;
    let x = b.linear("proj_out", &x, &tokens(d.video), dim, out, true);
    // [B, f*h*w, C*pt*p*p] -> [B, f, h, w, C, pt, p, p] -> [B, C, f, pt, h, p, w, p] -> [B, C, F, H, W]
    let x = b.reshape("unpatchify/grid", &x, &[-1, f, h, w, cout, pt, p, p]);
    let x = b.transpose("unpatchify/permute", &x, &[0, 4, 1, 5, 2, 6, 3, 7]);
    b.reshape("unpatchify", &x, &[-1, cout, f * pt, h * p, w * p])
}

/// Refuses what the builder does not reproduce, naming each config key; returns `rope_axes_dim`.
fn check_supported(c: &Config) -> Result<[i64; 3]> {
    let mut refused = Vec::new();
    match c.image_condition_type.as_deref() {
        // latent_concat only widens in_channels (the pipeline concatenates the image latents): the
        // transformer's computation is the text-to-video one.
        None | Some("latent_concat") => {}
        Some(other) => refused.push(format!(
            "image_condition_type {other:?} (built: null and \"latent_concat\"; \"token_replace\" modulates the first frame's tokens separately)"
        )),
    }
    if c.qk_norm.as_deref() != Some("rms_norm") {
        let value = c
            .qk_norm
            .as_deref()
            .map_or("null".into(), |v| format!("{v:?}"));
        refused.push(format!("qk_norm {value} (built: \"rms_norm\")"));
    }
    if !(c.mlp_ratio.is_finite() && c.mlp_ratio > 0.0) {
        refused.push(format!("mlp_ratio {} (must be positive)", c.mlp_ratio));
    }
    if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
        refused.push(format!("rope_theta {} (must be positive)", c.rope_theta));
    }
    for (key, n) in [
        ("num_single_layers", c.num_single_layers),
        ("num_refiner_layers", c.num_refiner_layers),
    ] {
        if n > super::MAX_LAYERS {
            refused.push(format!("{key} {n} (at most {})", super::MAX_LAYERS));
        }
    }
    let axes = match c.rope_axes_dim[..] {
        [t, h, w] if [t, h, w].iter().all(|a| a % 2 == 0) && t + h + w == c.attention_head_dim => {
            Some([t, h, w])
        }
        _ => {
            refused.push(format!(
                "rope_axes_dim {:?} (needs 3 even sizes adding up to attention_head_dim {})",
                c.rope_axes_dim, c.attention_head_dim
            ));
            None
        }
    };
    match axes {
        Some(axes) if refused.is_empty() => Ok(axes),
        _ => bail!("not supported for HunyuanVideo: {}", refused.join("; ")),
    }
}

/// `int(dim * mlp_ratio)`, as diffusers sizes the feed-forwards.
fn mlp_width(dim: i64, ratio: f64) -> Result<i64> {
    let width = (dim as f64 * ratio) as i64;
    if !(1..=super::MAX_CONFIG_INT).contains(&width) {
        bail!(
            "mlp_ratio {ratio} gives a feed-forward width of {width} (1..={})",
            super::MAX_CONFIG_INT
        );
    }
    Ok(width)
}

/// `HunyuanVideoConditionEmbedding` at `time_text_embed`: timestep embedding (+ guidance embedding)
/// + the pooled text projection, [B, dim].
fn condition_embedding(
    b: &mut GraphBuilder,
    c: &Config,
    dim: i64,
    timestep: &str,
    pooled: &str,
    guidance: Option<&str>,
) -> String {
    let path = "time_text_embed";
    let temb = timestep_embedding(b, path, "timestep_embedder", timestep, dim);
    let text = silu_projection(
        b,
        &format!("{path}.text_embedder"),
        pooled,
        &[-1],
        c.pooled_projection_dim,
        dim,
    );
    let temb = match guidance {
        Some(g) => {
            let gemb = timestep_embedding(b, path, "guidance_embedder", g, dim);
            b.add(&format!("{path}/add_guidance"), &temb, &gemb)
        }
        None => temb,
    };
    b.add(path, &temb, &text)
}

/// `{path}.time_proj` sinusoids of `t` through the `TimestepEmbedding` `{path}.{embedder}`.
fn timestep_embedding(
    b: &mut GraphBuilder,
    path: &str,
    embedder: &str,
    t: &str,
    dim: i64,
) -> String {
    let proj = b.timestep_proj(&format!("{path}.time_proj"), t, FREQ_DIM, true, 0.0);
    b.timestep_embedding(&format!("{path}.{embedder}"), &proj, FREQ_DIM, dim)
}

/// `PixArtAlphaTextProjection(act_fn="silu")`: linear_1, SiLU, linear_2.
fn silu_projection(
    b: &mut GraphBuilder,
    path: &str,
    x: &str,
    lead: &[i64],
    in_f: i64,
    dim: i64,
) -> String {
    let h = b.linear(&format!("{path}.linear_1"), x, lead, in_f, dim, true);
    let h = b.silu(&format!("{path}.act_1"), &h);
    b.linear(&format!("{path}.linear_2"), &h, lead, dim, dim, true)
}

/// `HunyuanVideoPatchEmbed` at `x_embedder`: Conv3d patches as tokens [B, f*h*w, dim].
fn patch_embed(b: &mut GraphBuilder, x: &str, c: &Config, d: &Dims) -> String {
    let (pt, p) = (c.patch_size_t, c.patch_size);
    let w = b.weight("x_embedder.proj.weight", &[d.dim, c.in_channels, pt, p, p]);
    let bias = b.weight("x_embedder.proj.bias", &[d.dim]);
    let x = b.op(
        "x_embedder.proj",
        "Conv",
        &[x, &w, &bias],
        vec![
            ("kernel_shape", AttrValue::Ints(vec![pt, p, p])),
            ("strides", AttrValue::Ints(vec![pt, p, p])),
        ],
    );
    let x = b.reshape("x_embedder/flatten", &x, &[-1, d.dim, d.video]);
    b.transpose("x_embedder/tokens", &x, &[0, 2, 1])
}

// --- the token refiner ------------------------------------------------------------------------------

/// `HunyuanVideoTokenRefiner` at `context_embedder`: the text tokens [B, L, text_embed_dim] projected
/// to `dim` and refined by self-attention blocks under the text mask, [B, L, dim].
fn token_refiner(
    b: &mut GraphBuilder,
    c: &Config,
    d: &Dims,
    enc: &str,
    mask: &str,
    timestep: &str,
) -> String {
    let path = "context_embedder";
    let (len, in_f) = (d.text, c.text_embed_dim);
    let pooled = masked_mean(b, &format!("{path}/pooled_text"), enc, mask, len);
    let embed = format!("{path}.time_text_embed");
    let temb = timestep_embedding(b, &embed, "timestep_embedder", timestep, d.dim);
    let text = silu_projection(
        b,
        &format!("{embed}.text_embedder"),
        &pooled,
        &[-1],
        in_f,
        d.dim,
    );
    let temb = b.add(&embed, &temb, &text);
    let mut x = b.linear(
        &format!("{path}.proj_in"),
        enc,
        &tokens(len),
        in_f,
        d.dim,
        true,
    );
    let refiner = format!("{path}.token_refiner");
    let self_mask = refiner_mask(b, &format!("{refiner}/mask"), mask, len);
    for i in 0..c.num_refiner_layers {
        let block = format!("{refiner}.refiner_blocks.{i}");
        x = refiner_block(b, &block, d, &x, &temb, &self_mask);
    }
    x
}

/// `(x * mask).sum(1) / mask.sum(1)` over the `len` tokens of `x` [B, L, D], the mask as float.
fn masked_mean(b: &mut GraphBuilder, name: &str, x: &str, mask: &str, len: i64) -> String {
    let m = b.cast_f32(&format!("{name}/mask"), mask);
    let m = b.reshape(&format!("{name}/mask_column"), &m, &[-1, len, 1]);
    let weighted = b.mul(&format!("{name}/weighted"), x, &m);
    let sum = reduce_sum(b, &format!("{name}/sum"), &weighted, false);
    let count = reduce_sum(b, &format!("{name}/count"), &m, false);
    b.op(name, "Div", &[&sum, &count], vec![])
}

/// `x` summed over axis 1.
fn reduce_sum(b: &mut GraphBuilder, name: &str, x: &str, keepdims: bool) -> String {
    let axes = b.const_i64(&format!("{name}/axes"), &[1]);
    b.op(
        name,
        "ReduceSum",
        &[x, &axes],
        vec![("keepdims", AttrValue::Int(keepdims as i64))],
    )
}

/// The refiner's self-attention mask as an additive bias [B, 1, L, L]: token i may attend to token j
/// when both are unmasked, and every token to token 0 (diffusers sets that column so that masked
/// rows are not empty).
fn refiner_mask(b: &mut GraphBuilder, name: &str, mask: &str, len: i64) -> String {
    let to = AttrValue::Int(DataType::Bool.onnx_code() as i64);
    let nonzero = b.op(&format!("{name}/bool"), "Cast", &[mask], vec![("to", to)]);
    let valid = b.cast_f32(&format!("{name}/valid"), &nonzero);
    let rows = b.reshape(&format!("{name}/rows"), &valid, &[-1, 1, len, 1]);
    let cols = b.reshape(&format!("{name}/cols"), &valid, &[-1, 1, 1, len]);
    let pairs = b.mul(&format!("{name}/pairs"), &rows, &cols);
    let mut first = vec![0.0; len as usize];
    first[0] = 1.0;
    let first = b.const_f32(&format!("{name}/first_key"), vec![1, 1, 1, len], &first);
    let allowed = b.op(&format!("{name}/allowed"), "Max", &[&pairs, &first], vec![]);
    additive_mask(b, name, &allowed)
}

/// The joint attention's key mask as an additive bias [B, 1, 1, video + L]: key j is attended to
/// when `j < video + sum(encoder_attention_mask)` (diffusers counts the mask, so a mask is taken to
/// be ones then zeros).
fn joint_mask(b: &mut GraphBuilder, mask: &str, d: &Dims) -> String {
    let name = "attention_mask";
    let count = reduce_sum(b, &format!("{name}/text_len"), mask, true);
    let offsets: Vec<i64> = (0..d.joint()).map(|j| j - d.video).collect();
    let offsets = b.const_i64(&format!("{name}/text_position"), &offsets);
    let inside = b.op(
        &format!("{name}/inside"),
        "Less",
        &[&offsets, &count],
        vec![],
    );
    let allowed = b.cast_f32(&format!("{name}/allowed"), &inside);
    let bias = additive_mask(b, name, &allowed);
    b.reshape(&format!("{name}/keys"), &bias, &[-1, 1, 1, d.joint()])
}

/// 0 where `allowed` is 1, the most negative float where it is 0: added to the attention scores,
/// a masked key's weight underflows to exactly 0 as with SDPA's boolean mask (-inf), without an
/// infinity in the graph.
fn additive_mask(b: &mut GraphBuilder, name: &str, allowed: &str) -> String {
    let one = b.scalar(&format!("{name}/one"), 1.0);
    let off = b.op(&format!("{name}/off"), "Sub", &[allowed, &one], vec![]);
    let big = b.scalar(&format!("{name}/max"), f32::MAX);
    b.mul(&format!("{name}/bias"), &off, &big)
}

/// `HunyuanVideoIndividualTokenRefinerBlock`: masked self-attention and a SiLU feed-forward on the
/// text, each gated by `norm_out` of the refiner's condition `temb`.
fn refiner_block(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    x: &str,
    temb: &str,
    mask: &str,
) -> String {
    let (dim, len) = (d.dim, d.text);
    let gates = b.adaln_chunks(
        &format!("{path}.norm_out.nonlinearity"),
        &format!("{path}.norm_out.linear"),
        temb,
        dim,
        dim,
        2,
    );
    let normed = b.layer_norm(&format!("{path}.norm1"), x, dim, EPS, true, true);
    let attn = format!("{path}.attn");
    let [q, k, v] = ["to_q", "to_k", "to_v"].map(|p| {
        b.linear(
            &format!("{attn}.{p}"),
            &normed,
            &tokens(len),
            dim,
            dim,
            true,
        )
    });
    let q = b.split_heads(&format!("{attn}/q"), &q, len, d.heads, d.head_dim, false);
    let k = b.split_heads(&format!("{attn}/k"), &k, len, d.heads, d.head_dim, true);
    let v = b.split_heads(&format!("{attn}/v"), &v, len, d.heads, d.head_dim, false);
    let out = masked_sdpa(b, &attn, (&q, &k, &v), mask, len, d);
    let out = b.linear(
        &format!("{attn}.to_out.0"),
        &out,
        &tokens(len),
        dim,
        dim,
        true,
    );
    let gated = b.mul(&format!("{attn}/gate"), &out, &gates[0]);
    let x = b.add(&format!("{attn}/residual"), x, &gated);

    let normed = b.layer_norm(&format!("{path}.norm2"), &x, dim, EPS, true, true);
    let ff = format!("{path}.ff");
    let inner = REFINER_MLP_RATIO * dim;
    let h = b.linear(
        &format!("{ff}.net.0.proj"),
        &normed,
        &tokens(len),
        dim,
        inner,
        true,
    );
    let h = b.silu(&format!("{ff}.net.0"), &h);
    let h = b.linear(&format!("{ff}.net.2"), &h, &tokens(len), inner, dim, true);
    let gated = b.mul(&format!("{ff}/gate"), &h, &gates[1]);
    b.add(&format!("{ff}/residual"), &x, &gated)
}

/// Attention on head-split q [B, H, S, d], k^T [B, H, d, S], v [B, H, S, d] with an additive `mask`
/// on the scores, written out as MatMul -> Add -> Softmax -> MatMul; merged back to [B, S, H*d].
fn masked_sdpa(
    b: &mut GraphBuilder,
    path: &str,
    (q, k_t, v): (&str, &str, &str),
    mask: &str,
    seq: i64,
    d: &Dims,
) -> String {
    let scale = b.scalar(&format!("{path}/scale"), 1.0 / (d.head_dim as f32).sqrt());
    let q = b.mul(&format!("{path}/q_scaled"), q, &scale);
    let scores = b.op(&format!("{path}/scores"), "MatMul", &[&q, k_t], vec![]);
    // The scores first: the structure analysis walks back from the Softmax along the first operand.
    let scores = b.add(&format!("{path}/masked_scores"), &scores, mask);
    let probs = b.op(
        &format!("{path}/softmax"),
        "Softmax",
        &[&scores],
        vec![("axis", AttrValue::Int(-1))],
    );
    let out = b.op(&format!("{path}/context"), "MatMul", &[&probs, v], vec![]);
    let out = b.transpose(&format!("{path}/merge_heads"), &out, &[0, 2, 1, 3]);
    b.reshape(&format!("{path}/merge"), &out, &[-1, seq, d.dim])
}

// --- rotary positions -------------------------------------------------------------------------------

/// `HunyuanVideoRotaryPosEmbed` for an `f x h x w` patch grid, computed in float32 as diffusers does
/// (`get_1d_rotary_pos_embed` per axis, `use_real=True`): per token the frame, row and column angles
/// side by side, one per rotated pair, as `[1, f*h*w, 1, head_dim/2, 1]` cos and sin constants.
fn rope_tables(
    b: &mut GraphBuilder,
    axes: [i64; 3],
    theta: f64,
    grid: [i64; 3],
) -> (String, String) {
    let theta = theta as f32;
    let freqs: Vec<Vec<f32>> = axes
        .iter()
        .map(|&dim| {
            (0..dim / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
                .collect()
        })
        .collect();
    let tokens: i64 = grid.iter().product();
    let half: i64 = axes.iter().sum::<i64>() / 2;
    let mut cos = Vec::with_capacity((tokens * half) as usize);
    let mut sin = Vec::with_capacity((tokens * half) as usize);
    for t in 0..grid[0] {
        for y in 0..grid[1] {
            for x in 0..grid[2] {
                for (pos, axis_freqs) in [t, y, x].into_iter().zip(&freqs) {
                    for &f in axis_freqs {
                        let angle = (pos as f32 * f) as f64;
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
            }
        }
    }
    let shape = vec![1, tokens, 1, half, 1];
    (
        b.const_f32("rope.freqs_cos", shape.clone(), &cos),
        b.const_f32("rope.freqs_sin", shape, &sin),
    )
}

/// diffusers' `apply_rotary_emb` (`use_real_unbind_dim=-1`) on the video tokens `x` [B, S, H, hd]:
/// each pair (x[2i], x[2i+1]) rotated by its angle.
fn apply_rope(b: &mut GraphBuilder, name: &str, x: &str, d: &Dims, j: &Joint) -> String {
    let pairs = b.reshape(
        &format!("{name}/pairs"),
        x,
        &[-1, d.video, d.heads, d.head_dim / 2, 2],
    );
    let xs = b.chunk(&format!("{name}/split"), &pairs, 2, -1);
    let (re, im) = (&xs[0], &xs[1]);
    let a = b.mul(&format!("{name}/re_cos"), re, j.cos);
    let c = b.mul(&format!("{name}/im_sin"), im, j.sin);
    let even = b.op(&format!("{name}/even"), "Sub", &[&a, &c], vec![]);
    let a = b.mul(&format!("{name}/re_sin"), re, j.sin);
    let c = b.mul(&format!("{name}/im_cos"), im, j.cos);
    let odd = b.add(&format!("{name}/odd"), &a, &c);
    let joined = b.concat(&format!("{name}/join"), &even, &odd, -1);
    b.reshape(name, &joined, &[-1, d.video, d.heads, d.head_dim])
}

// --- transformer blocks -----------------------------------------------------------------------------

/// A linear projection of `x` [B, seq, dim] at `path` as heads [B, seq, H, hd], RMS-normalised per
/// head by `norm` (diffusers' `qk_norm="rms_norm"`) when given.
fn heads(
    b: &mut GraphBuilder,
    path: &str,
    norm: Option<&str>,
    x: &str,
    seq: i64,
    d: &Dims,
) -> String {
    let y = b.linear(path, x, &tokens(seq), d.dim, d.dim, true);
    let y = b.reshape(
        &format!("{path}/heads"),
        &y,
        &[-1, seq, d.heads, d.head_dim],
    );
    match norm {
        Some(norm) => b.rms_norm(norm, &y, d.head_dim, EPS),
        None => y,
    }
}

/// `HunyuanVideoAttnProcessor2_0`'s attention over the joint sequence: q, k, v [B, N, H, hd] ->
/// [B, N, dim], text keys masked.
fn joint_attention(
    b: &mut GraphBuilder,
    path: &str,
    (q, k, v): (&str, &str, &str),
    d: &Dims,
    j: &Joint,
) -> String {
    let q = b.transpose(&format!("{path}/q/transpose"), q, &[0, 2, 1, 3]);
    let k = b.transpose(&format!("{path}/k/transpose"), k, &[0, 2, 3, 1]);
    let v = b.transpose(&format!("{path}/v/transpose"), v, &[0, 2, 1, 3]);
    masked_sdpa(b, path, (&q, &k, &v), j.mask, d.joint(), d)
}

/// `HunyuanVideoTransformerBlock`: video and text each modulated by their own `AdaLayerNormZero`,
/// joint attention (RoPE on the video queries and keys), then a feed-forward per stream; returns
/// (video, text).
fn dual_block(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    (x, context): (&str, &str),
    temb: &str,
    j: &Joint,
) -> (String, String) {
    let dim = d.dim;
    let (nx, m) = ada_norm_zero(b, &format!("{path}.norm1"), x, temb, dim);
    let (nc, mc) = ada_norm_zero(b, &format!("{path}.norm1_context"), context, temb, dim);

    let attn = format!("{path}.attn");
    let q = heads(
        b,
        &format!("{attn}.to_q"),
        Some(&format!("{attn}.norm_q")),
        &nx,
        d.video,
        d,
    );
    let k = heads(
        b,
        &format!("{attn}.to_k"),
        Some(&format!("{attn}.norm_k")),
        &nx,
        d.video,
        d,
    );
    let v = heads(b, &format!("{attn}.to_v"), None, &nx, d.video, d);
    let q = apply_rope(b, &format!("{attn}/q/rope"), &q, d, j);
    let k = apply_rope(b, &format!("{attn}/k/rope"), &k, d, j);
    let text = d.text;
    let add_q = format!("{attn}.norm_added_q");
    let add_k = format!("{attn}.norm_added_k");
    let eq = heads(b, &format!("{attn}.add_q_proj"), Some(&add_q), &nc, text, d);
    let ek = heads(b, &format!("{attn}.add_k_proj"), Some(&add_k), &nc, text, d);
    let ev = heads(b, &format!("{attn}.add_v_proj"), None, &nc, text, d);
    let q = b.concat(&format!("{attn}/q/joint"), &q, &eq, 1);
    let k = b.concat(&format!("{attn}/k/joint"), &k, &ek, 1);
    let v = b.concat(&format!("{attn}/v/joint"), &v, &ev, 1);
    let out = joint_attention(b, &attn, (&q, &k, &v), d, j);
    let parts = b.split_sizes(&format!("{attn}/split"), &out, &[d.video, text], 1);
    let out_x = b.linear(
        &format!("{attn}.to_out.0"),
        &parts[0],
        &tokens(d.video),
        dim,
        dim,
        true,
    );
    let out_c = b.linear(
        &format!("{attn}.to_add_out"),
        &parts[1],
        &tokens(text),
        dim,
        dim,
        true,
    );
    let g = b.mul(&format!("{attn}/gate"), &out_x, &m[2]);
    let x = b.add(&format!("{attn}/residual"), x, &g);
    let g = b.mul(&format!("{attn}/gate_context"), &out_c, &mc[2]);
    let context = b.add(&format!("{attn}/residual_context"), context, &g);

    let x = gated_feed_forward(
        b,
        &format!("{path}.ff"),
        &format!("{path}.norm2"),
        &x,
        &m,
        d.video,
        d,
    );
    let context = gated_feed_forward(
        b,
        &format!("{path}.ff_context"),
        &format!("{path}.norm2_context"),
        &context,
        &mc,
        text,
        d,
    );
    (x, context)
}

/// `AdaLayerNormZero` at `path` (no embedding of its own): `x` normed and modulated, and its six
/// chunks (shift, scale, gate for attention, then for the feed-forward), each [B, 1, dim].
fn ada_norm_zero(
    b: &mut GraphBuilder,
    path: &str,
    x: &str,
    temb: &str,
    dim: i64,
) -> (String, Vec<String>) {
    let chunks = b.adaln_chunks(
        &format!("{path}.silu"),
        &format!("{path}.linear"),
        temb,
        dim,
        dim,
        6,
    );
    let normed = b.layer_norm(&format!("{path}.norm"), x, dim, EPS, false, false);
    let normed = b.modulate(&format!("{path}/modulate"), &normed, &chunks[1], &chunks[0]);
    (normed, chunks)
}

/// `x + gate_mlp * ff(norm2(x) * (1 + scale_mlp) + shift_mlp)` (tanh-GELU feed-forward at `ff`), with
/// the chunks `m` of the stream's `AdaLayerNormZero`.
fn gated_feed_forward(
    b: &mut GraphBuilder,
    ff: &str,
    norm: &str,
    x: &str,
    m: &[String],
    seq: i64,
    d: &Dims,
) -> String {
    let normed = b.layer_norm(norm, x, d.dim, EPS, false, false);
    let normed = b.modulate(&format!("{norm}/modulate"), &normed, &m[4], &m[3]);
    let y = b.feed_forward(ff, &normed, &tokens(seq), d.dim, d.mlp, true);
    let y = b.mul(&format!("{ff}/gate"), &m[5], &y);
    b.add(&format!("{ff}/residual"), x, &y)
}

/// `HunyuanVideoSingleTransformerBlock` on the joint sequence `h` [B, video + L, dim]: one
/// `AdaLayerNormZeroSingle`, attention (RoPE on the video part of q and k) and a tanh-GELU MLP in
/// parallel, both through one `proj_out`, gated, plus the residual.
fn single_block(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    h: &str,
    temb: &str,
    j: &Joint,
) -> String {
    let (dim, n) = (d.dim, d.joint());
    let m = b.adaln_chunks(
        &format!("{path}.norm.silu"),
        &format!("{path}.norm.linear"),
        temb,
        dim,
        dim,
        3,
    );
    let normed = b.layer_norm(&format!("{path}.norm.norm"), h, dim, EPS, false, false);
    let normed = b.modulate(&format!("{path}.norm/modulate"), &normed, &m[1], &m[0]);
    let mlp = b.linear(
        &format!("{path}.proj_mlp"),
        &normed,
        &tokens(n),
        dim,
        d.mlp,
        true,
    );
    let mlp = b.gelu_tanh(&format!("{path}.act_mlp"), &mlp);

    let attn = format!("{path}.attn");
    let q = heads(
        b,
        &format!("{attn}.to_q"),
        Some(&format!("{attn}.norm_q")),
        &normed,
        n,
        d,
    );
    let k = heads(
        b,
        &format!("{attn}.to_k"),
        Some(&format!("{attn}.norm_k")),
        &normed,
        n,
        d,
    );
    let v = heads(b, &format!("{attn}.to_v"), None, &normed, n, d);
    let q = rope_on_video(b, &format!("{attn}/q"), &q, d, j);
    let k = rope_on_video(b, &format!("{attn}/k"), &k, d, j);
    let out = joint_attention(b, &attn, (&q, &k, &v), d, j);

    let both = b.concat(&format!("{path}/attn_and_mlp"), &out, &mlp, 2);
    let y = b.linear(
        &format!("{path}.proj_out"),
        &both,
        &tokens(n),
        dim + d.mlp,
        dim,
        true,
    );
    let y = b.mul(&format!("{path}/gate"), &m[2], &y);
    b.add(&format!("{path}/residual"), &y, h)
}

/// RoPE on the video tokens of `x` [B, video + L, H, hd]; the text tokens pass unchanged.
fn rope_on_video(b: &mut GraphBuilder, name: &str, x: &str, d: &Dims, j: &Joint) -> String {
    let parts = b.split_sizes(&format!("{name}/split"), x, &[d.video, d.text], 1);
    let video = apply_rope(b, &format!("{name}/rope"), &parts[0], d, j);
    b.concat(&format!("{name}/joint"), &video, &parts[1], 1)
}
