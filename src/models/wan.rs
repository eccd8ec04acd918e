//! `WanTransformer3DModel` (diffusers `transformer_wan.py`): Conv3d patch embedding, 3-D rotary
//! position embedding (frames / rows / columns share each head's dims), blocks of full self-attention
//! with RMS-normalised q/k and RoPE, cross-attention to the projected text, and a feed-forward, all
//! modulated by `scale_shift_table` + the timestep projection; unpatchify to `[B, C, F, H, W]`.
//!
//! Image-to-video (Wan2.1 I2V: `image_dim`, `added_kv_proj_dim`): the CLIP image tokens go through
//! `condition_embedder.image_embedder` and are put before the text; each cross-attention attends to the
//! image part with its own `add_k_proj` / `add_v_proj` (+ `norm_added_k`) and adds that to the text
//! part's attention. Which tokens are "image" is decided as diffusers' `WanAttnProcessor` decides it:
//! everything before the *last 512* tokens (UMT5's 512, hard-coded there), see [`image_context_length`].
//!
//! Wan2.2 TI2V (`--timestep-per-token`): `timestep` [B, tokens], one value per video token as the
//! pipeline's `expand_timesteps` passes it; every modulation (blocks and final layer) is then per token.
//!
//! Inputs `hidden_states` [B, C, F, H, W], `timestep` [B] (or [B, tokens]) float32 (`sigma * 1000` as
//! WanPipeline passes it; int64 with `--timestep-dtype int64`), `encoder_hidden_states` [B, L, text_dim],
//! `encoder_hidden_states_image` [B, image_len, image_dim] for I2V; output `sample`. Refused:
//! `pos_embed_seq_len` (FLF2V's two-image positions).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::embed::rope_1d;
use super::graph_builder::GraphBuilder;
use super::layers::tokens;
use super::{BuildOptions, Family, TimestepDtype};
use crate::ir::{AttrValue, DataType};

#[derive(Deserialize, Serialize)]
#[serde(default)]
struct Config {
    patch_size: Vec<i64>,
    num_attention_heads: i64,
    attention_head_dim: i64,
    in_channels: i64,
    out_channels: Option<i64>,
    text_dim: i64,
    freq_dim: i64,
    ffn_dim: i64,
    num_layers: i64,
    cross_attn_norm: bool,
    qk_norm: Option<String>,
    eps: f64,
    image_dim: Option<i64>,
    added_kv_proj_dim: Option<i64>,
    rope_max_seq_len: i64,
    pos_embed_seq_len: Option<i64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            patch_size: vec![1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

/// Latent shape of Wan2.1's default 81 x 480 x 832 video (VAE: 4x in time, 8x in space).
const DEFAULT_FRAMES: i64 = 21;
const DEFAULT_HEIGHT: i64 = 60;
const DEFAULT_WIDTH: i64 = 104;
const DEFAULT_TEXT: i64 = 512;
/// CLIP ViT-H/14's hidden states (256 patches + the class token), as WanImageToVideoPipeline passes them.
const DEFAULT_IMAGE: i64 = 257;
/// The text length `WanAttnProcessor` hard-codes when it splits image from text tokens.
const PROCESSOR_TEXT: i64 = 512;

pub struct Wan;

struct Dims {
    dim: i64,
    heads: i64,
    head_dim: i64,
    seq: i64,
    eps: f64,
    /// Modulations per video token (`timestep` [B, tokens]) rather than per sample.
    per_token: bool,
}

/// What a cross-attention attends to: the text part (value, tokens) and the image part if any.
struct Context {
    text: (String, i64),
    image: Option<(String, i64)>,
}

impl Family for Wan {
    const CLASS: &'static str = "WanTransformer3DModel";
    /// Flow matching: WanPipeline passes `sigma * 1000` unrounded.
    const TIMESTEP_DTYPE: TimestepDtype = TimestepDtype::Float32;

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        let dim = super::inner_dim(c.num_attention_heads, c.attention_head_dim)?;
        check_supported(&c, dim)?;
        let [pt, ph, pw] = c.patch_size[..] else {
            bail!("patch_size must have 3 entries, got {:?}", c.patch_size);
        };
        let cout = c.out_channels.unwrap_or(c.in_channels);
        let frames = opts.frames.unwrap_or(DEFAULT_FRAMES);
        let (height, width) = opts.latent_size(DEFAULT_HEIGHT, DEFAULT_WIDTH);
        let text = opts.text_len.unwrap_or(DEFAULT_TEXT);
        let image = match (c.image_dim, opts.image_len) {
            (Some(_), len) => Some(len.unwrap_or(DEFAULT_IMAGE)),
            (None, Some(_)) => bail!("--image-len applies to image-to-video checkpoints (image_dim); this config has no image_dim"),
            (None, None) => None,
        };
        super::check_divisible("frames", frames, pt, "the patch size")?;
        super::check_divisible("height", height, ph, "the patch size")?;
        super::check_divisible("width", width, pw, "the patch size")?;
        let (f, h, w) = (frames / pt, height / ph, width / pw);
        if f.max(h).max(w) > c.rope_max_seq_len {
            bail!(
                "a patch grid of {f} x {h} x {w} exceeds rope_max_seq_len {}",
                c.rope_max_seq_len
            );
        }
        super::check_divisible(
            "attention_head_dim",
            c.attention_head_dim,
            2,
            "rotary embeddings rotate pairs",
        )?;
        super::check_table("rotary", f * h * w, c.attention_head_dim)?;
        let d = Dims {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            seq: f * h * w,
            eps: c.eps,
            per_token: opts.timestep_per_token,
        };

        let x = b.input(
            "hidden_states",
            DataType::F32,
            opts.dims(&[c.in_channels, frames, height, width]),
        );
        let timestep_dims = if d.per_token {
            opts.dims(&[d.seq])
        } else {
            opts.dims(&[])
        };
        let t = b.input(
            "timestep",
            opts.timestep_dtype(Self::TIMESTEP_DTYPE),
            timestep_dims,
        );
        let enc = b.input(
            "encoder_hidden_states",
            DataType::F32,
            opts.dims(&[text, c.text_dim]),
        );
        let enc_image = match (image, c.image_dim) {
            (Some(len), Some(image_dim)) => Some(b.input(
                "encoder_hidden_states_image",
                DataType::F32,
                opts.dims(&[len, image_dim]),
            )),
            _ => None,
        };

        let (cos, sin) = rope_tables(b, c.attention_head_dim, c.rope_max_seq_len, (f, h, w));
        let wt = b.weight("patch_embedding.weight", &[dim, c.in_channels, pt, ph, pw]);
        let bias = b.weight("patch_embedding.bias", &[dim]);
        let x = b.op(
            "patch_embedding",
            "Conv",
            &[&x, &wt, &bias],
            vec![
                ("kernel_shape", AttrValue::Ints(vec![pt, ph, pw])),
                ("strides", AttrValue::Ints(vec![pt, ph, pw])),
            ],
        );
        let x = b.reshape("patch_embedding/flatten", &x, &[-1, dim, d.seq]);
        let mut x = b.transpose("patch_embedding/tokens", &x, &[0, 2, 1]);

        // condition_embedder: temb [B, D], timestep_proj [B, 6, D] (per token: [B*S, D] and
        // [B, S, 6, D]), text [B, L, D], image [B, I, D].
        let path = "condition_embedder";
        let t = if d.per_token {
            b.reshape(&format!("{path}/flatten_timesteps"), &t, &[-1])
        } else {
            t
        };
        let proj = b.timestep_proj(&format!("{path}.timesteps_proj"), &t, c.freq_dim, true, 0.0);
        let temb = b.timestep_embedding(&format!("{path}.time_embedder"), &proj, c.freq_dim, dim);
        let act = b.silu(&format!("{path}.act_fn"), &temb);
        let t6 = b.linear(
            &format!("{path}.time_proj"),
            &act,
            &[-1],
            dim,
            6 * dim,
            true,
        );
        let rows: &[i64] = if d.per_token {
            &[-1, d.seq, 6, dim]
        } else {
            &[-1, 6, dim]
        };
        let t6 = b.reshape(&format!("{path}.time_proj/rows"), &t6, rows);
        let text_ctx = super::caption_projection(
            b,
            &format!("{path}.text_embedder"),
            &enc,
            text,
            c.text_dim,
            dim,
        );
        let image_ctx = match (&enc_image, image, c.image_dim) {
            (Some(enc_image), Some(len), Some(image_dim)) => Some((
                image_embedder(
                    b,
                    &format!("{path}.image_embedder"),
                    enc_image,
                    len,
                    image_dim,
                    dim,
                ),
                len,
            )),
            _ => None,
        };
        let context = split_context(b, &c, text_ctx, text, image_ctx);

        for i in 0..c.num_layers {
            accept_sla_weights(b, i, c.attention_head_dim);
            x = block(
                b,
                &format!("blocks.{i}"),
                &d,
                &x,
                &context,
                &t6,
                (&cos, &sin),
                c.cross_attn_norm,
                c.ffn_dim,
            );
        }

        let table = b.weight("scale_shift_table", &[1, 2, dim]);
        let out = cout * pt * ph * pw;
        let x = if d.per_token {
            final_layer_per_token(b, &d, &x, &temb, &table, out)
        } else {
            super::final_layer_single(b, &x, &temb, &table, c.eps, [d.seq, dim, out])
        };
        // [B, f*h*w, pt*ph*pw*C] -> [B, C, f, pt, h, ph, w, pw] -> [B, C, F, H, W]
        let x = b.reshape("unpatchify/grid", &x, &[-1, f, h, w, pt, ph, pw, cout]);
        let x = b.transpose("unpatchify/permute", &x, &[0, 7, 1, 4, 2, 5, 3, 6]);
        let x = b.reshape("unpatchify", &x, &[-1, cout, frames, height, width]);
        b.output(
            &x,
            "sample",
            DataType::F32,
            opts.dims(&[cout, frames, height, width]),
        );
        Ok(())
    }
}

/// SLA-finetuned checkpoints (TurboDiffusion) carry the linear branch's `proj_l` per block: accepted
/// (shape-checked) and left out of the dense graph; `sparse-linear-attention`'s `sla_weights` reads
/// them (`crate::passes::sla_weights`).
fn accept_sla_weights(b: &mut GraphBuilder, block: i64, head_dim: i64) {
    for prefix in [
        format!("blocks.{block}.self_attn.attn_op.local_attn.proj_l"),
        format!("net.blocks.{block}.self_attn.attn_op.local_attn.proj_l"),
        format!("blocks.{block}.attn1.proj_l"),
    ] {
        let (w, bias) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        if b.has_weight(&w) || b.has_weight(&bias) {
            b.unused_weight(&w, &[head_dim, head_dim]);
            b.unused_weight(&bias, &[head_dim]);
        }
    }
}

fn check_supported(c: &Config, dim: i64) -> Result<()> {
    if c.pos_embed_seq_len.is_some() {
        bail!("pos_embed_seq_len (Wan FLF2V's positions over two images) is not implemented");
    }
    match (c.image_dim, c.added_kv_proj_dim) {
        (None, None) => {}
        (Some(_), Some(kv)) if kv == dim => {}
        (Some(_), Some(kv)) => bail!("added_kv_proj_dim {kv} is not supported: add_k_proj reads the image embedder's output, which has the inner dim {dim}"),
        (Some(_), None) => bail!("image_dim without added_kv_proj_dim is not supported (image tokens through the text key/value projections: no published Wan has it)"),
        (None, Some(_)) => bail!("added_kv_proj_dim without image_dim is not supported (no image embedder to feed add_k_proj)"),
    }
    if c.qk_norm.as_deref() != Some("rms_norm_across_heads") {
        bail!(
            "qk_norm {:?} is not supported (only 'rms_norm_across_heads')",
            c.qk_norm
        );
    }
    Ok(())
}

/// The number of leading tokens of the joined `[image, text]` context that diffusers'
/// `WanAttnProcessor` treats as image tokens: `context[:, :L - 512]` in Python, so everything before
/// the last 512 tokens, and for a context shorter than 512 what Python's negative slice leaves
/// (`max(0, 2L - 512)` tokens). Equal to the image length when the text has 512 tokens (the pipelines).
fn image_context_length(image: i64, text: i64) -> i64 {
    let total = image + text;
    let n = total - PROCESSOR_TEXT;
    if n >= 0 {
        n
    } else {
        (total + n).max(0)
    }
}

/// The cross-attention context as `WanAttnProcessor` splits it: image tokens (if any) then text.
fn split_context(
    b: &mut GraphBuilder,
    c: &Config,
    text: String,
    text_len: i64,
    image: Option<(String, i64)>,
) -> Context {
    let Some((image, image_len)) = image else {
        return Context {
            text: (text, text_len),
            image: None,
        };
    };
    let total = image_len + text_len;
    let split = image_context_length(image_len, text_len);
    if split == image_len {
        return Context {
            text: (text, text_len),
            image: Some((image, image_len)),
        };
    }
    let joint = b.concat("condition_embedder/image_and_text", &image, &text, 1);
    if split == 0 {
        // The image branch attends to no token at all: it adds nothing, and its weights serve nothing.
        if let Some(kv) = c.added_kv_proj_dim {
            mark_image_projections_unused(b, c, kv);
        }
        return Context {
            text: (joint, total),
            image: None,
        };
    }
    let parts = b.split_sizes(
        "condition_embedder/processor_split",
        &joint,
        &[split, total - split],
        1,
    );
    Context {
        text: (parts[1].clone(), total - split),
        image: Some((parts[0].clone(), split)),
    }
}

/// Every block's `add_k_proj`, `add_v_proj` and `norm_added_k` accepted without a use.
fn mark_image_projections_unused(b: &mut GraphBuilder, c: &Config, kv: i64) {
    let dim = c.num_attention_heads * c.attention_head_dim;
    for i in 0..c.num_layers {
        let path = format!("blocks.{i}.attn2");
        for m in ["add_k_proj", "add_v_proj"] {
            b.unused_weight(&format!("{path}.{m}.weight"), &[dim, kv]);
            b.unused_weight(&format!("{path}.{m}.bias"), &[dim]);
        }
        b.unused_weight(&format!("{path}.norm_added_k.weight"), &[dim]);
    }
}

/// `WanImageEmbedding` (no `pos_embed`): FP32LayerNorm, FeedForward (mult 1, exact GELU),
/// FP32LayerNorm, on [B, len, in_f] -> [B, len, dim].
fn image_embedder(
    b: &mut GraphBuilder,
    path: &str,
    x: &str,
    len: i64,
    in_f: i64,
    dim: i64,
) -> String {
    let lead = tokens(len);
    let h = b.layer_norm(&format!("{path}.norm1"), x, in_f, 1e-5, true, true);
    let h = b.linear(
        &format!("{path}.ff.net.0.proj"),
        &h,
        &lead,
        in_f,
        in_f,
        true,
    );
    let h = gelu_erf(b, &format!("{path}.ff.net.0"), &h);
    let h = b.linear(&format!("{path}.ff.net.2"), &h, &lead, in_f, dim, true);
    b.layer_norm(&format!("{path}.norm2"), &h, dim, 1e-5, true, true)
}

/// torch's exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
fn gelu_erf(b: &mut GraphBuilder, name: &str, x: &str) -> String {
    let r = b.scalar(&format!("{name}/rsqrt2"), std::f32::consts::FRAC_1_SQRT_2);
    let scaled = b.mul(&format!("{name}/scaled"), x, &r);
    let erf = b.op(&format!("{name}/erf"), "Erf", &[&scaled], vec![]);
    let one = b.scalar(&format!("{name}/one"), 1.0);
    let onep = b.add(&format!("{name}/1p"), &erf, &one);
    let half = b.scalar(&format!("{name}/half"), 0.5);
    let hx = b.mul(&format!("{name}/hx"), x, &half);
    b.mul(name, &hx, &onep)
}

/// The final layer with per-token modulation (Wan2.2 TI2V): shift/scale = `scale_shift_table` + the
/// token's timestep embedding (`temb` [B*S, dim]), LayerNorm (no affine), modulation, `proj_out`.
fn final_layer_per_token(
    b: &mut GraphBuilder,
    d: &Dims,
    x: &str,
    temb: &str,
    table: &str,
    out: i64,
) -> String {
    let t = b.reshape("norm_out/token_rows", temb, &[-1, d.seq, 1, d.dim]);
    let mods = b.add("norm_out/modulation", table, &t);
    let parts = per_token_chunks(b, "norm_out/chunks", d, &mods, 2);
    let normed = b.layer_norm("norm_out", x, d.dim, d.eps, false, false);
    let normed = b.modulate("norm_out/modulate", &normed, &parts[1], &parts[0]);
    b.linear("proj_out", &normed, &tokens(d.seq), d.dim, out, true)
}

/// `mods` [B, S, parts, dim] as `parts` tensors [B, S, dim].
fn per_token_chunks(
    b: &mut GraphBuilder,
    name: &str,
    d: &Dims,
    mods: &str,
    parts: usize,
) -> Vec<String> {
    b.chunk(name, mods, parts, 2)
        .iter()
        .enumerate()
        .map(|(i, m)| b.reshape(&format!("{name}/{i}"), m, &[-1, d.seq, d.dim]))
        .collect()
}

/// `WanRotaryPosEmbed` for a `f x h x w` patch grid: per token, the frame, row and column tables
/// side by side, one value per rotated pair: `[1, seq, 1, head_dim/2, 1]` cos and sin constants.
fn rope_tables(
    b: &mut GraphBuilder,
    head_dim: i64,
    max_len: i64,
    (f, h, w): (i64, i64, i64),
) -> (String, String) {
    let hd = head_dim as usize;
    let hw_dim = 2 * (hd / 6);
    let t_dim = hd - 2 * hw_dim;
    let max = max_len as usize;
    let tables = [
        rope_1d(t_dim, max, 10000.0),
        rope_1d(hw_dim, max, 10000.0),
        rope_1d(hw_dim, max, 10000.0),
    ];
    let dims = [t_dim, hw_dim, hw_dim];
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for fi in 0..f as usize {
        for hi in 0..h as usize {
            for wi in 0..w as usize {
                for (axis, pos) in [fi, hi, wi].into_iter().enumerate() {
                    let dim = dims[axis];
                    let row = pos * dim..(pos + 1) * dim;
                    // Every frequency appears twice (repeat_interleave); the rotation needs it once.
                    cos.extend(
                        tables[axis].0[row.clone()]
                            .iter()
                            .step_by(2)
                            .map(|&v| v as f32),
                    );
                    sin.extend(tables[axis].1[row].iter().step_by(2).map(|&v| v as f32));
                }
            }
        }
    }
    let shape = vec![1, f * h * w, 1, head_dim / 2, 1];
    (
        b.const_f32("rope.freqs_cos", shape.clone(), &cos),
        b.const_f32("rope.freqs_sin", shape, &sin),
    )
}

/// Rotate pairs (x[2i], x[2i+1]) of `x` [B, S, H, hd] by the angles of `cos`/`sin`.
fn apply_rope(
    b: &mut GraphBuilder,
    name: &str,
    x: &str,
    d: &Dims,
    (cos, sin): (&str, &str),
) -> String {
    let pairs = b.reshape(
        &format!("{name}/pairs"),
        x,
        &[-1, d.seq, d.heads, d.head_dim / 2, 2],
    );
    let xs = b.chunk(&format!("{name}/split"), &pairs, 2, -1);
    let (x1, x2) = (&xs[0], &xs[1]);
    let a = b.mul(&format!("{name}/x1cos"), x1, cos);
    let bb = b.mul(&format!("{name}/x2sin"), x2, sin);
    let even = b.op(&format!("{name}/even"), "Sub", &[&a, &bb], vec![]);
    let c = b.mul(&format!("{name}/x1sin"), x1, sin);
    let e = b.mul(&format!("{name}/x2cos"), x2, cos);
    let odd = b.add(&format!("{name}/odd"), &c, &e);
    let joined = b.op(
        &format!("{name}/join"),
        "Concat",
        &[&even, &odd],
        vec![("axis", AttrValue::Int(-1))],
    );
    b.reshape(name, &joined, &[-1, d.seq, d.heads, d.head_dim])
}

/// `WanAttention`: q/k/v projections, RMS norm over all heads, optional RoPE, SDPA, `to_out.0`. For
/// cross-attention `context` gives the text part (value, tokens) and an image part, which gets its own
/// keys and values (`add_k_proj`, `norm_added_k`, `add_v_proj`) and its attention added to the text's.
fn attention(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    x: &str,
    context: Option<&Context>,
    rope: Option<(&str, &str)>,
) -> String {
    let (kv, kv_len) = match context {
        Some(c) => (c.text.0.as_str(), c.text.1),
        None => (x, d.seq),
    };
    let q = b.linear(
        &format!("{path}.to_q"),
        x,
        &tokens(d.seq),
        d.dim,
        d.dim,
        true,
    );
    let k = b.linear(
        &format!("{path}.to_k"),
        kv,
        &tokens(kv_len),
        d.dim,
        d.dim,
        true,
    );
    let v = b.linear(
        &format!("{path}.to_v"),
        kv,
        &tokens(kv_len),
        d.dim,
        d.dim,
        true,
    );
    let q = b.rms_norm(&format!("{path}.norm_q"), &q, d.dim, d.eps);
    let k = b.rms_norm(&format!("{path}.norm_k"), &k, d.dim, d.eps);
    let (q, k) = match rope {
        Some(r) => {
            let q = b.reshape(
                &format!("{path}/q/heads"),
                &q,
                &[-1, d.seq, d.heads, d.head_dim],
            );
            let k = b.reshape(
                &format!("{path}/k/heads"),
                &k,
                &[-1, d.seq, d.heads, d.head_dim],
            );
            let q = apply_rope(b, &format!("{path}/q/rope"), &q, d, r);
            let k = apply_rope(b, &format!("{path}/k/rope"), &k, d, r);
            let q = b.transpose(&format!("{path}/q/transpose"), &q, &[0, 2, 1, 3]);
            let k = b.transpose(&format!("{path}/k/transpose"), &k, &[0, 2, 3, 1]);
            (q, k)
        }
        None => (
            b.split_heads(&format!("{path}/q"), &q, d.seq, d.heads, d.head_dim, false),
            b.split_heads(&format!("{path}/k"), &k, kv_len, d.heads, d.head_dim, true),
        ),
    };
    let v = b.split_heads(&format!("{path}/v"), &v, kv_len, d.heads, d.head_dim, false);
    let mut out = b.sdpa(path, &q, &k, &v, [d.seq, d.heads, d.head_dim]);
    if let Some((image, image_len)) = context.and_then(|c| c.image.as_ref()) {
        let image_out = image_attention(b, path, d, &q, (image, *image_len));
        out = b.add(&format!("{path}/text_plus_image"), &out, &image_out);
    }
    b.linear(
        &format!("{path}.to_out.0"),
        &out,
        &tokens(d.seq),
        d.dim,
        d.dim,
        true,
    )
}

/// I2V: the queries `q` [B, H, S, hd] attend to the image tokens through `add_k_proj` (RMS-normed by
/// `norm_added_k`) and `add_v_proj`; returns [B, S, dim] before `to_out`.
fn image_attention(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    q: &str,
    (image, len): (&str, i64),
) -> String {
    let k = b.linear(
        &format!("{path}.add_k_proj"),
        image,
        &tokens(len),
        d.dim,
        d.dim,
        true,
    );
    let v = b.linear(
        &format!("{path}.add_v_proj"),
        image,
        &tokens(len),
        d.dim,
        d.dim,
        true,
    );
    let k = b.rms_norm(&format!("{path}.norm_added_k"), &k, d.dim, d.eps);
    let k = b.split_heads(
        &format!("{path}/image_k"),
        &k,
        len,
        d.heads,
        d.head_dim,
        true,
    );
    let v = b.split_heads(
        &format!("{path}/image_v"),
        &v,
        len,
        d.heads,
        d.head_dim,
        false,
    );
    b.sdpa(
        &format!("{path}/image"),
        q,
        &k,
        &v,
        [d.seq, d.heads, d.head_dim],
    )
}

#[allow(clippy::too_many_arguments)]
fn block(
    b: &mut GraphBuilder,
    path: &str,
    d: &Dims,
    x: &str,
    context: &Context,
    t6: &str,
    rope: (&str, &str),
    cross_attn_norm: bool,
    ffn_dim: i64,
) -> String {
    let dim = d.dim;
    let table = b.weight(&format!("{path}.scale_shift_table"), &[1, 6, dim]);
    let mods = b.add(&format!("{path}/modulation"), &table, t6);
    let name = format!("{path}/modulation_chunks");
    let m = if d.per_token {
        per_token_chunks(b, &name, d, &mods, 6)
    } else {
        b.chunk(&name, &mods, 6, 1)
    };
    let (shift, scale, gate, c_shift, c_scale, c_gate) = (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);

    let normed = b.layer_norm(&format!("{path}.norm1"), x, dim, d.eps, false, false);
    let normed = b.modulate(&format!("{path}.norm1/modulate"), &normed, scale, shift);
    let attn = attention(b, &format!("{path}.attn1"), d, &normed, None, Some(rope));
    let attn = b.mul(&format!("{path}.attn1/gate"), &attn, gate);
    let h = b.add(&format!("{path}.attn1/residual"), x, &attn);

    let normed = if cross_attn_norm {
        b.layer_norm(&format!("{path}.norm2"), &h, dim, d.eps, true, true)
    } else {
        h.clone()
    };
    let attn = attention(b, &format!("{path}.attn2"), d, &normed, Some(context), None);
    let h = b.add(&format!("{path}.attn2/residual"), &h, &attn);

    let normed = b.layer_norm(&format!("{path}.norm3"), &h, dim, d.eps, false, false);
    let normed = b.modulate(&format!("{path}.norm3/modulate"), &normed, c_scale, c_shift);
    let ff = b.feed_forward(
        &format!("{path}.ffn"),
        &normed,
        &tokens(d.seq),
        dim,
        ffn_dim,
        true,
    );
    let ff = b.mul(&format!("{path}.ffn/gate"), &ff, c_gate);
    b.add(&format!("{path}.ffn/residual"), &h, &ff)
}

#[cfg(test)]
mod tests {
    use super::image_context_length;

    /// Python's slicing of a context of L = image + text tokens: `[:, :L - 512]` are image tokens.
    #[test]
    fn image_tokens_as_diffusers_processor_slices_them() {
        // The pipelines: 257 CLIP tokens + 512 UMT5 tokens.
        assert_eq!(image_context_length(257, 512), 257);
        // More text than 512: its first tokens count as image tokens.
        assert_eq!(image_context_length(5, 600), 93);
        // L = 515: [:, :3].
        assert_eq!(image_context_length(5, 510), 3);
        // L = 305: [:, :-207] keeps 305 - 207 = 98 tokens.
        assert_eq!(image_context_length(5, 300), 98);
        // L = 11 (the wan-i2v-tiny fixture): [:, :-501] is empty.
        assert_eq!(image_context_length(5, 6), 0);
    }
}
