//! `PixArtTransformer2DModel` (diffusers `pixart_transformer_2d.py`): text-to-image DiT. Patch embedding
//! with sincos positions, adaLN-single blocks with cross-attention to the projected caption, the same
//! final layer as Latte, unpatchify.
//!
//! Inputs `hidden_states` [B, C, H, W], `encoder_hidden_states` [B, L, caption_channels], `timestep` [B]
//! int64; output `sample` [B, out, H, W]. PixArt-alpha's resolution/aspect-ratio conditions
//! (`use_additional_conditions`, on by default at sample_size 128) are refused, not ignored.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::basic_block::{basic_block, check_block_config, BlockSpec, Modulation};
use super::graph_builder::GraphBuilder;
use super::{BuildOptions, Family};
use crate::ir::DataType;

#[derive(Deserialize, Serialize)]
#[serde(default)]
struct Config {
    num_attention_heads: i64,
    attention_head_dim: i64,
    in_channels: i64,
    out_channels: Option<i64>,
    num_layers: i64,
    dropout: f64,
    norm_num_groups: i64,
    cross_attention_dim: Option<i64>,
    attention_bias: bool,
    sample_size: i64,
    patch_size: i64,
    activation_fn: String,
    num_embeds_ada_norm: Option<i64>,
    upcast_attention: bool,
    norm_type: String,
    norm_elementwise_affine: bool,
    norm_eps: f64,
    interpolation_scale: Option<f64>,
    use_additional_conditions: Option<bool>,
    caption_channels: Option<i64>,
    attention_type: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: Some(8),
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            cross_attention_dim: Some(1152),
            attention_bias: true,
            sample_size: 128,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_single".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: None,
            use_additional_conditions: None,
            caption_channels: None,
            attention_type: Some("default".into()),
        }
    }
}

pub struct PixArt;

impl Family for PixArt {
    const CLASS: &'static str = "PixArtTransformer2DModel";

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        check_block_config(
            Self::CLASS,
            &c.norm_type,
            "ada_norm_single",
            &c.activation_fn,
        )?;
        if c.use_additional_conditions.unwrap_or(c.sample_size == 128) {
            bail!("use_additional_conditions (resolution and aspect-ratio embeddings, PixArt-alpha 1024px) is not implemented; set \"use_additional_conditions\": false only if the checkpoint has no resolution_embedder");
        }
        if c.attention_type.as_deref().unwrap_or("default") != "default" {
            bail!(
                "attention_type {:?} is not supported (only 'default')",
                c.attention_type
            );
        }
        let Some(cross_dim) = c.cross_attention_dim else {
            bail!("cross_attention_dim must be set (PixArt blocks cross-attend to the caption)");
        };
        let (cin, p, dim) = (
            c.in_channels,
            c.patch_size,
            super::inner_dim(c.num_attention_heads, c.attention_head_dim)?,
        );
        let cout = c.out_channels.unwrap_or(cin);
        let (height, width) = opts.latent_size(c.sample_size, c.sample_size);
        let text = opts.text_len.unwrap_or(120);
        let grid = super::PatchGrid::new(height, width, p, dim)?;
        let (h, w, n) = (grid.h, grid.w, grid.tokens());

        let x = b.input(
            "hidden_states",
            DataType::F32,
            opts.dims(&[cin, height, width]),
        );
        let caption_in = c.caption_channels.unwrap_or(cross_dim);
        let enc = b.input(
            "encoder_hidden_states",
            DataType::F32,
            opts.dims(&[text, caption_in]),
        );
        let t = b.input(
            "timestep",
            opts.timestep_dtype(Self::TIMESTEP_DTYPE),
            opts.dims(&[]),
        );

        let interp = c
            .interpolation_scale
            .unwrap_or((c.sample_size / 64).max(1) as f64);
        let base = (c.sample_size / p) as f64;
        let mut x = super::patch_embed_sincos(b, &x, cin, dim, &grid, base, interp);

        let (t6, t_emb) = super::ada_norm_single(b, "adaln_single", &t, dim);
        let context = match c.caption_channels {
            Some(cc) if cross_dim != dim => {
                bail!("caption_channels {cc} is projected to the inner dim {dim}, but cross_attention_dim is {cross_dim}")
            }
            Some(cc) => super::caption_projection(b, "caption_projection", &enc, text, cc, dim),
            None => enc.clone(),
        };
        let spec = BlockSpec {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            attention_bias: c.attention_bias,
            norm_eps: c.norm_eps,
            norm_elementwise_affine: c.norm_elementwise_affine,
            cross: Some((cross_dim, text)),
        };
        for i in 0..c.num_layers {
            let path = format!("transformer_blocks.{i}");
            x = basic_block(
                b,
                &path,
                &spec,
                &x,
                n,
                Some(&context),
                &Modulation::Single { timestep: &t6 },
            );
        }
        let table = b.weight("scale_shift_table", &[2, dim]);
        let x = super::final_layer_single(b, &x, &t_emb, &table, 1e-6, [n, dim, p * p * cout]);
        let x = super::unpatchify_2d(b, &x, h, w, p, cout);
        b.output(
            &x,
            "sample",
            DataType::F32,
            opts.dims(&[cout, height, width]),
        );
        Ok(())
    }
}
