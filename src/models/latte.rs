//! `LatteTransformer3DModel` (diffusers `latte_transformer_3d.py`): per frame, 2-D patch embedding with
//! sincos positions; alternating spatial blocks (self-attention over the patches of a frame,
//! cross-attention to the caption) and temporal blocks (self-attention over the frames of a patch), all
//! adaLN-single; then the PixArt-style final layer and unpatchify back to `[B, C, F, H, W]`.
//!
//! Inputs `hidden_states` [B, C, F, H, W], `timestep` [B] int64, `encoder_hidden_states` [B, L, caption];
//! output `sample` [B, out, F, H, W].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::basic_block::{basic_block, check_block_config, BlockSpec, Modulation};
use super::embed::sincos_1d;
use super::graph_builder::GraphBuilder;
use super::{unpatchify_2d, BuildOptions, Family};
use crate::ir::DataType;

#[derive(Deserialize, Serialize)]
#[serde(default)]
struct Config {
    num_attention_heads: i64,
    attention_head_dim: i64,
    in_channels: Option<i64>,
    out_channels: Option<i64>,
    num_layers: i64,
    dropout: f64,
    cross_attention_dim: Option<i64>,
    attention_bias: bool,
    sample_size: i64,
    patch_size: Option<i64>,
    activation_fn: String,
    num_embeds_ada_norm: Option<i64>,
    norm_type: String,
    norm_elementwise_affine: bool,
    norm_eps: f64,
    caption_channels: Option<i64>,
    video_length: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_attention_heads: 16,
            attention_head_dim: 88,
            in_channels: None,
            out_channels: None,
            num_layers: 1,
            dropout: 0.0,
            cross_attention_dim: None,
            attention_bias: false,
            sample_size: 64,
            patch_size: None,
            activation_fn: "geglu".into(),
            num_embeds_ada_norm: None,
            norm_type: "layer_norm".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            caption_channels: None,
            video_length: 16,
        }
    }
}

pub struct Latte;

impl Family for Latte {
    const CLASS: &'static str = "LatteTransformer3DModel";

    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()> {
        let c: Config = super::parse_config(config, Self::CLASS)?;
        check_block_config(
            Self::CLASS,
            &c.norm_type,
            "ada_norm_single",
            &c.activation_fn,
        )?;
        let (Some(cin), Some(p), Some(caption)) = (c.in_channels, c.patch_size, c.caption_channels)
        else {
            bail!("config.json must set in_channels, patch_size and caption_channels");
        };
        let cout = c.out_channels.unwrap_or(cin);
        let dim = super::inner_dim(c.num_attention_heads, c.attention_head_dim)?;
        let frames = opts.frames.unwrap_or(c.video_length);
        let (height, width) = opts.latent_size(c.sample_size, c.sample_size);
        let text = opts.text_len.unwrap_or(120);
        let grid = super::PatchGrid::new(height, width, p, dim)?;
        super::check_table("temporal position", c.video_length, dim)?;
        if frames != c.video_length && frames != 1 {
            bail!("Latte adds a fixed temporal position table of video_length = {} frames: --frames must be {} (or 1)", c.video_length, c.video_length);
        }
        if let Some(cross) = c.cross_attention_dim.filter(|&d| d != dim) {
            bail!("cross_attention_dim {cross} must equal the inner dim {dim} (the caption is projected to it)");
        }
        let (h, w, n) = (grid.h, grid.w, grid.tokens());

        let x = b.input(
            "hidden_states",
            DataType::F32,
            opts.dims(&[cin, frames, height, width]),
        );
        let t = b.input(
            "timestep",
            opts.timestep_dtype(Self::TIMESTEP_DTYPE),
            opts.dims(&[]),
        );
        let enc = b.input(
            "encoder_hidden_states",
            DataType::F32,
            opts.dims(&[text, caption]),
        );

        // Frames become batch rows: [B, C, F, H, W] -> [B*F, C, H, W] -> patches [B*F, N, D] + positions.
        let x = b.transpose("frames_first", &x, &[0, 2, 1, 3, 4]);
        let x = b.reshape("frames_as_batch", &x, &[-1, cin, height, width]);
        let base = (c.sample_size / p) as f64;
        let interp = (c.sample_size / 64).max(1) as f64;
        let mut x = super::patch_embed_sincos(b, &x, cin, dim, &grid, base, interp);

        // adaLN-single: timestep -> [B, 6D] projection and the [B, D] embedding for the final layer.
        let (t6, t_emb) = super::ada_norm_single(b, "adaln_single", &t, dim);
        let cap = super::caption_projection(b, "caption_projection", &enc, text, caption, dim);
        let cap_spatial =
            b.repeat_rows("encoder_hidden_states_spatial", &cap, frames, &[text, dim]);
        let t_spatial = b.repeat_rows("timestep_spatial", &t6, frames, &[6 * dim]);
        let t_temporal = b.repeat_rows("timestep_temp", &t6, n, &[6 * dim]);

        let spatial = BlockSpec {
            dim,
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            attention_bias: c.attention_bias,
            norm_eps: c.norm_eps,
            norm_elementwise_affine: c.norm_elementwise_affine,
            cross: c.cross_attention_dim.map(|d| (d, text)),
        };
        let temporal = BlockSpec {
            cross: None,
            ..spatial
        };
        let temp_pos: Vec<f32> = sincos_1d(
            dim as usize,
            &(0..c.video_length).map(|i| i as f64).collect::<Vec<_>>(),
        )
        .into_iter()
        .map(|v| v as f32)
        .collect();
        for i in 0..c.num_layers {
            let path = format!("transformer_blocks.{i}");
            let ctx = spatial.cross.map(|_| cap_spatial.as_str());
            x = basic_block(
                b,
                &path,
                &spatial,
                &x,
                n,
                ctx,
                &Modulation::Single {
                    timestep: &t_spatial,
                },
            );
            // [B*F, N, D] -> [B*N, F, D]
            let y = b.reshape(
                &format!("temporal_transformer_blocks.{i}/in_rows"),
                &x,
                &[-1, frames, n, dim],
            );
            let y = b.transpose(
                &format!("temporal_transformer_blocks.{i}/in_permute"),
                &y,
                &[0, 2, 1, 3],
            );
            let mut y = b.reshape(
                &format!("temporal_transformer_blocks.{i}/in"),
                &y,
                &[-1, frames, dim],
            );
            if i == 0 && frames > 1 {
                let tp = b.const_f32("temp_pos_embed", vec![1, frames, dim], &temp_pos);
                y = b.add("temp_pos_embed/add", &y, &tp);
            }
            let path = format!("temporal_transformer_blocks.{i}");
            let y = basic_block(
                b,
                &path,
                &temporal,
                &y,
                frames,
                None,
                &Modulation::Single {
                    timestep: &t_temporal,
                },
            );
            // [B*N, F, D] -> [B*F, N, D]
            let y = b.reshape(&format!("{path}/out_rows"), &y, &[-1, n, frames, dim]);
            let y = b.transpose(&format!("{path}/out_permute"), &y, &[0, 2, 1, 3]);
            x = b.reshape(&format!("{path}/out"), &y, &[-1, n, dim]);
        }

        let t_emb = b.repeat_rows("embedded_timestep", &t_emb, frames, &[dim]);
        let table = b.weight("scale_shift_table", &[2, dim]);
        let x = super::final_layer_single(b, &x, &t_emb, &table, 1e-6, [n, dim, p * p * cout]);
        // [B*F, N, p*p*C] -> [B*F, C, H, W] -> [B, C, F, H, W]
        let x = unpatchify_2d(b, &x, h, w, p, cout);
        let x = b.reshape("unpatchify/frames", &x, &[-1, frames, cout, height, width]);
        let x = b.transpose("unpatchify/channels_first", &x, &[0, 2, 1, 3, 4]);
        b.output(
            &x,
            "sample",
            DataType::F32,
            opts.dims(&[cout, frames, height, width]),
        );
        Ok(())
    }
}
