//! diffusers' `BasicTransformerBlock` (attention.py) as used by Latte, PixArt and DiT: self-attention
//! `attn1`, optional cross-attention `attn2`, feed-forward `ff`, with either adaLN-single modulation
//! (Latte, PixArt: a per-block `scale_shift_table` added to the shared timestep projection) or
//! adaLN-Zero (DiT: each block embeds timestep and class label itself in `norm1.emb`).

use anyhow::{bail, Result};

use super::graph_builder::GraphBuilder;
use super::layers::tokens;

/// How the block is modulated.
pub enum Modulation<'a> {
    /// `ada_norm_single`: the shared `[B', 6*dim]` timestep projection.
    Single { timestep: &'a str },
    /// `ada_norm_zero`: the raw int64 timestep and class labels, embedded per block.
    Zero {
        timestep: &'a str,
        class_labels: &'a str,
        num_classes: i64,
    },
}

pub struct BlockSpec {
    pub dim: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub attention_bias: bool,
    pub norm_eps: f64,
    pub norm_elementwise_affine: bool,
    /// `(context features, context length)` when the block has cross-attention.
    pub cross: Option<(i64, i64)>,
}

/// The `BasicTransformerBlock` flavour a model's config asks for must be the one its forward runs
/// (`norm_type`) with the activation built here.
pub fn check_block_config(
    class: &str,
    norm_type: &str,
    expected: &str,
    activation_fn: &str,
) -> Result<()> {
    if norm_type != expected {
        bail!("norm_type '{norm_type}' is not supported ({class}'s forward runs '{expected}')");
    }
    if activation_fn != "gelu-approximate" {
        bail!("activation_fn '{activation_fn}' is not supported (ditc builds 'gelu-approximate', the DiT/PixArt/Latte default)");
    }
    Ok(())
}

/// One block at `path` on `x` = [B', seq, dim]; `context` = [B', ctx_len, ctx_dim] for cross-attention.
pub fn basic_block(
    b: &mut GraphBuilder,
    path: &str,
    spec: &BlockSpec,
    x: &str,
    seq: i64,
    context: Option<&str>,
    modulation: &Modulation,
) -> String {
    let dim = spec.dim;
    let lead = tokens(seq);
    let mods = match modulation {
        Modulation::Single { timestep } => {
            let table = b.weight(&format!("{path}.scale_shift_table"), &[6, dim]);
            let t = b.reshape(&format!("{path}/timestep_rows"), timestep, &[-1, 6, dim]);
            let t = b.add(&format!("{path}/modulation"), &t, &table);
            b.chunk(&format!("{path}/modulation_chunks"), &t, 6, 1)
        }
        Modulation::Zero {
            timestep,
            class_labels,
            num_classes,
        } => ada_norm_zero_modulation(
            b,
            &format!("{path}.norm1"),
            dim,
            timestep,
            class_labels,
            *num_classes,
        ),
    };
    let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] =
        [0, 1, 2, 3, 4, 5].map(|i| mods[i].clone());
    let single = matches!(modulation, Modulation::Single { .. });

    // Self-attention. adaLN-Zero's norm1 is a fixed LayerNorm(eps 1e-6, no affine).
    let normed = if single {
        b.layer_norm(
            &format!("{path}.norm1"),
            x,
            dim,
            spec.norm_eps,
            spec.norm_elementwise_affine,
            true,
        )
    } else {
        b.layer_norm(&format!("{path}.norm1.norm"), x, dim, 1e-6, false, false)
    };
    let normed = b.modulate(
        &format!("{path}.norm1/modulate"),
        &normed,
        &scale_msa,
        &shift_msa,
    );
    let attn = attention(b, &format!("{path}.attn1"), spec, &normed, seq, None);
    let attn = b.mul(&format!("{path}.attn1/gate"), &gate_msa, &attn);
    let mut h = b.add(&format!("{path}.attn1/residual"), &attn, x);

    // Cross-attention: adaLN-single feeds it the un-normalised stream (diffusers' Latte/PixArt path).
    if let (Some(ctx), Some(_)) = (context, spec.cross) {
        let q_in = if single {
            h.clone()
        } else {
            b.layer_norm(
                &format!("{path}.norm2"),
                &h,
                dim,
                spec.norm_eps,
                spec.norm_elementwise_affine,
                true,
            )
        };
        let attn = attention(b, &format!("{path}.attn2"), spec, &q_in, seq, Some(ctx));
        h = b.add(&format!("{path}.attn2/residual"), &attn, &h);
    }

    // Feed-forward.
    let norm_name = if single { "norm2" } else { "norm3" };
    let normed = b.layer_norm(
        &format!("{path}.{norm_name}"),
        &h,
        dim,
        spec.norm_eps,
        spec.norm_elementwise_affine,
        true,
    );
    let normed = b.modulate(
        &format!("{path}.{norm_name}/modulate"),
        &normed,
        &scale_mlp,
        &shift_mlp,
    );
    let ff = b.feed_forward(&format!("{path}.ff"), &normed, &lead, dim, 4 * dim, true);
    let ff = b.mul(&format!("{path}.ff/gate"), &gate_mlp, &ff);
    b.add(&format!("{path}.ff/residual"), &ff, &h)
}

/// diffusers' `Attention` with the default processor: to_q/to_k/to_v, SDPA, to_out.0.
fn attention(
    b: &mut GraphBuilder,
    path: &str,
    spec: &BlockSpec,
    x: &str,
    seq: i64,
    context: Option<&str>,
) -> String {
    let (dim, heads, hd) = (spec.dim, spec.heads, spec.head_dim);
    let inner = heads * hd;
    let (kv_in, kv_dim, kv_len) = match (context, spec.cross) {
        (Some(c), Some((cdim, clen))) => (c, cdim, clen),
        _ => (x, dim, seq),
    };
    let bias = spec.attention_bias;
    let q = b.linear(&format!("{path}.to_q"), x, &tokens(seq), dim, inner, bias);
    let k = b.linear(
        &format!("{path}.to_k"),
        kv_in,
        &tokens(kv_len),
        kv_dim,
        inner,
        bias,
    );
    let v = b.linear(
        &format!("{path}.to_v"),
        kv_in,
        &tokens(kv_len),
        kv_dim,
        inner,
        bias,
    );
    let q = b.split_heads(&format!("{path}/q"), &q, seq, heads, hd, false);
    let k = b.split_heads(&format!("{path}/k"), &k, kv_len, heads, hd, true);
    let v = b.split_heads(&format!("{path}/v"), &v, kv_len, heads, hd, false);
    let out = b.sdpa(path, &q, &k, &v, [seq, heads, hd]);
    b.linear(
        &format!("{path}.to_out.0"),
        &out,
        &tokens(seq),
        inner,
        dim,
        true,
    )
}

/// `AdaLayerNormZero`'s conditioning: CombinedTimestepLabelEmbeddings at `{norm1}.emb`, SiLU, linear to
/// 6*dim, as six `[B, 1, dim]` chunks (shift/scale/gate for attention, then for the MLP).
pub fn ada_norm_zero_modulation(
    b: &mut GraphBuilder,
    norm1: &str,
    dim: i64,
    timestep: &str,
    class_labels: &str,
    num_classes: i64,
) -> Vec<String> {
    let cond = combined_timestep_label(
        b,
        &format!("{norm1}.emb"),
        dim,
        timestep,
        class_labels,
        num_classes,
    );
    let (silu, linear) = (format!("{norm1}.silu"), format!("{norm1}.linear"));
    b.adaln_chunks(&silu, &linear, &cond, dim, dim, 6)
}

/// `CombinedTimestepLabelEmbeddings`: sinusoids (256, flip, shift 1) -> TimestepEmbedding, plus the class
/// label's row of `class_embedder.embedding_table` (num_classes + 1 rows: the last is CFG's null class).
pub fn combined_timestep_label(
    b: &mut GraphBuilder,
    path: &str,
    dim: i64,
    timestep: &str,
    class_labels: &str,
    num_classes: i64,
) -> String {
    let proj = b.timestep_proj(&format!("{path}.time_proj"), timestep, 256, true, 1.0);
    let t = b.timestep_embedding(&format!("{path}.timestep_embedder"), &proj, 256, dim);
    let table = b.weight(
        &format!("{path}.class_embedder.embedding_table.weight"),
        &[num_classes + 1, dim],
    );
    let c = b.op(
        &format!("{path}.class_embedder"),
        "Gather",
        &[&table, class_labels],
        vec![("axis", crate::ir::AttrValue::Int(0))],
    );
    b.add(path, &t, &c)
}
