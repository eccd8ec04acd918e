//! `DiTTransformer2DModel` (diffusers `dit_transformer_2d.py`): class-conditional image DiT. Patch
//! embedding with sincos positions, adaLN-Zero blocks (each embeds timestep + class label itself),
//! final layer modulated by block 0's conditioning through `proj_out_1`, `proj_out_2`, unpatchify.
//!
//! Inputs `hidden_states` [B, C, H, W], `timestep` [B] int64, `class_labels` [B] int64; output `sample`
//! [B, out, H, W].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::basic_block::{
    basic_block, check_block_config, combined_timestep_label, BlockSpec, Modulation,
};
use super::graph_builder::GraphBuilder;
use super::layers::tokens;
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
    attention_bias: bool,
    sample_size: i64,
    patch_size: i64,
    activation_fn: String,
    num_embeds_ada_norm: Option<i64>,
    upcast_attention: bool,
    norm_type: String,
    norm_elementwise_affine: bool,
    norm_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: None,
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            attention_bias: true,
            sample_size: 32,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_zero".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-5,
        }
    }
}

pub struct Dit;

impl Family for Dit {
    const CLASS: &'static str = "DiTTransformer2DModel";

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        check_block_config(Self::CLASS, &c.norm_type, "ada_norm_zero", &c.activation_fn)?;
        let Some(num_classes) = c.num_embeds_ada_norm else {
            bail!("num_embeds_ada_norm must be set for adaLN-Zero");
        };
        let (cin, p, dim) = (
            c.in_channels,
            c.patch_size,
            super::inner_dim(c.num_attention_heads, c.attention_head_dim)?,
        );
        let cout = c.out_channels.unwrap_or(cin);
        let (height, width) = opts.latent_size(c.sample_size, c.sample_size);
        let grid = super::PatchGrid::new(height, width, p, dim)?;
        if height != width {
            bail!("DiT's unpatchify assumes a square latent (diffusers takes sqrt of the token count): height {height} != width {width}");
        }
        let (h, w, n) = (grid.h, grid.w, grid.tokens());

        let x = b.input(
            "hidden_states",
            DataType::F32,
            opts.dims(&[cin, height, width]),
        );
        let t = b.input(
            "timestep",
            opts.timestep_dtype(Self::TIMESTEP_DTYPE),
            opts.dims(&[]),
        );
        let labels = b.input("class_labels", DataType::I64, opts.dims(&[]));

        let base = (c.sample_size / p) as f64;
        let mut x = super::patch_embed_sincos(b, &x, cin, dim, &grid, base, 1.0);

        let spec = BlockSpec {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            attention_bias: c.attention_bias,
            norm_eps: c.norm_eps,
            norm_elementwise_affine: c.norm_elementwise_affine,
            cross: None,
        };
        let modulation = Modulation::Zero {
            timestep: &t,
            class_labels: &labels,
            num_classes,
        };
        for i in 0..c.num_layers {
            x = basic_block(
                b,
                &format!("transformer_blocks.{i}"),
                &spec,
                &x,
                n,
                None,
                &modulation,
            );
        }

        // Final layer: block 0's conditioning again (diffusers calls transformer_blocks[0].norm1.emb).
        let cond = combined_timestep_label(
            b,
            "transformer_blocks.0.norm1.emb",
            dim,
            &t,
            &labels,
            num_classes,
        );
        let parts = b.adaln_chunks("proj_out_1/silu", "proj_out_1", &cond, dim, dim, 2);
        let normed = b.layer_norm("norm_out", &x, dim, 1e-6, false, false);
        let normed = b.modulate("norm_out/modulate", &normed, &parts[1], &parts[0]);
        let x = b.linear("proj_out_2", &normed, &tokens(n), dim, p * p * cout, true);
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
