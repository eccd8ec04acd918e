//! Learned SLA weights: the linear branch's `proj_l` (Linear(head_dim, head_dim), PyTorch layout
//! [out, in]) of each block, read from a checkpoint that carries them (`sparse-linear-attention`
//! option `sla_weights`; README "Sparse-linear attention").
//!
//! Accepted names, per transformer block N (the DiT map's block index; for Wan, the checkpoint's
//! `blocks.N`):
//! - TurboDiffusion's: `blocks.N.self_attn.attn_op.local_attn.proj_l.weight` / `.bias` (its
//!   `replace_attention` sets `WanSelfAttention.attn_op.local_attn = SparseLinearAttention(...)`,
//!   whose `proj_l` is the projection), optionally prefixed by `net.` as its training checkpoints are;
//! - diffusers-style (ditc's): `blocks.N.attn1.proj_l.weight` / `.bias`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::sparse_linear_attention::SitePlan;
use crate::ir::{Graph, Tensor};

/// One block's learned projection.
pub struct Projection {
    pub block: usize,
    pub dim: i64,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// The checkpoint's name of the weight (errors name it).
    pub weight_name: String,
}

/// The block index and part (`weight` or `bias`) of an SLA `proj_l` tensor name, with the naming
/// (`true`: TurboDiffusion's), or None for any other tensor.
pub fn parse_name(name: &str) -> Option<(usize, &str, bool)> {
    let rest = name.strip_prefix("net.").unwrap_or(name);
    let rest = rest.strip_prefix("blocks.")?;
    let (index, rest) = rest.split_once('.')?;
    let block: usize = index.parse().ok()?;
    let (turbo, part) = if let Some(p) = rest.strip_prefix("self_attn.attn_op.local_attn.proj_l.") {
        (true, p)
    } else if let Some(p) = rest.strip_prefix("attn1.proj_l.") {
        if name.starts_with("net.") {
            return None;
        }
        (false, p)
    } else {
        return None;
    };
    matches!(part, "weight" | "bias").then_some((block, part, turbo))
}

/// Every SLA `proj_l` tensor of `tensors`, by block: each block with both weight and bias, under one
/// naming, weight [D, D] and bias [D].
pub fn collect(tensors: &[Tensor], source: &str) -> Result<BTreeMap<usize, Projection>> {
    let mut parts: BTreeMap<usize, BTreeMap<&str, Vec<&Tensor>>> = BTreeMap::new();
    for t in tensors {
        if let Some((block, part, _)) = parse_name(&t.name) {
            parts
                .entry(block)
                .or_default()
                .entry(part)
                .or_default()
                .push(t);
        }
    }
    let mut out = BTreeMap::new();
    for (block, p) in parts {
        let one = |part: &str| -> Result<&Tensor> {
            match p.get(part).map(Vec::as_slice) {
                Some([t]) => Ok(*t),
                Some(many) => bail!(
                    "{source}: block {block}'s proj_l {part} appears under two names ({}): keep one naming",
                    many.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
                None => bail!("{source}: block {block} has a proj_l {} but no proj_l {part}", if part == "weight" { "bias" } else { "weight" }),
            }
        };
        let (w, b) = (one("weight")?, one("bias")?);
        let d = w.dims.first().copied().unwrap_or(0);
        if w.dims.len() != 2 || w.dims[1] != d || d < 1 {
            bail!(
                "{source}: {} has shape {:?}: proj_l's weight is [head_dim, head_dim]",
                w.name,
                w.dims
            );
        }
        if b.dims != [d] {
            bail!(
                "{source}: {} has shape {:?}, its weight {} implies [{d}]",
                b.name,
                b.dims,
                w.name
            );
        }
        let values = |t: &Tensor| {
            t.to_f32_vec().with_context(|| {
                format!(
                    "{source}: {} is {} (a float tensor is needed)",
                    t.name, t.dtype
                )
            })
        };
        out.insert(
            block,
            Projection {
                block,
                dim: d,
                weight: values(w)?,
                bias: values(b)?,
                weight_name: w.name.clone(),
            },
        );
    }
    Ok(out)
}

/// The projections of `path`: a safetensors file, or a diffusers checkpoint folder.
pub fn read(path: &Path) -> Result<BTreeMap<usize, Projection>> {
    let source = format!("sla_weights '{}'", path.display());
    let tensors = if path.is_dir() {
        crate::checkpoint::Checkpoint::open(path)
            .with_context(|| source.clone())?
            .tensors
    } else {
        crate::tensors::read_safetensors(path).with_context(|| source.clone())?
    };
    let found = collect(&tensors, &source)?;
    if found.is_empty() {
        bail!("{source} holds no SLA proj_l tensors (names blocks.N.self_attn.attn_op.local_attn.proj_l.weight/.bias as TurboDiffusion writes them, or blocks.N.attn1.proj_l.weight/.bias)");
    }
    Ok(found)
}

/// Which projection each planned site takes (by site id), every refusal checked before the graph
/// changes: a block with more than one selected site, a site outside any block, a head dim that
/// differs from the weight's, selected blocks without weights, weights for blocks the model lacks.
pub(crate) fn assign<'a>(
    weights: &'a BTreeMap<usize, Projection>,
    plans: &[SitePlan],
    blocks: usize,
) -> Result<HashMap<usize, &'a Projection>> {
    if weights.is_empty() {
        return Ok(HashMap::new());
    }
    if let Some(b) = weights.keys().find(|&&b| b >= blocks) {
        bail!(
            "sla_weights: {} is for block {b}, but the model has {blocks} transformer blocks",
            weights[b].weight_name
        );
    }
    let mut by_block: BTreeMap<usize, usize> = BTreeMap::new();
    let mut missing = Vec::new();
    let mut out = HashMap::new();
    for plan in plans {
        let Some(block) = plan.block else {
            bail!(
                "sla_weights: attention site {} is in no transformer block, so no block's proj_l applies",
                plan.id
            );
        };
        if let Some(other) = by_block.insert(block, plan.id) {
            bail!("sla_weights: block {block} has two selected sites ({other} and {}): a block's proj_l serves one self-attention; select one kind with `kinds`", plan.id);
        }
        let Some(p) = weights.get(&block) else {
            missing.push(block);
            continue;
        };
        if p.dim != plan.head_dim {
            bail!(
                "sla_weights: {} is [{d}, {d}], but attention site {} (block {block}) has head dim {}",
                p.weight_name,
                plan.id,
                plan.head_dim,
                d = p.dim
            );
        }
        out.insert(plan.id, p);
    }
    if !missing.is_empty() {
        bail!(
            "sla_weights: weights for some blocks only: the selected sites of blocks {missing:?} have no proj_l (the file has blocks {:?})",
            weights.keys().collect::<Vec<_>>()
        );
    }
    Ok(out)
}

/// Put `p` in the graph as initializers `ditc.sla.proj_l.blockN.weight` / `.bias`; their names.
pub fn install(graph: &mut Graph, p: &Projection) -> (String, String) {
    let (w, b) = (
        format!("ditc.sla.proj_l.block{}.weight", p.block),
        format!("ditc.sla.proj_l.block{}.bias", p.block),
    );
    if graph.initializer(&w).is_none() {
        graph
            .initializers
            .push(Tensor::from_f32(&w, vec![p.dim, p.dim], &p.weight));
        graph
            .initializers
            .push(Tensor::from_f32(&b, vec![p.dim], &p.bias));
    }
    (w, b)
}

#[cfg(test)]
mod tests {
    use super::parse_name;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("blocks.3.self_attn.attn_op.local_attn.proj_l.weight"),
            Some((3, "weight", true))
        );
        assert_eq!(
            parse_name("net.blocks.12.self_attn.attn_op.local_attn.proj_l.bias"),
            Some((12, "bias", true))
        );
        assert_eq!(
            parse_name("blocks.0.attn1.proj_l.weight"),
            Some((0, "weight", false))
        );
        assert_eq!(parse_name("blocks.0.attn1.to_q.weight"), None);
        assert_eq!(parse_name("blocks.x.attn1.proj_l.weight"), None);
        assert_eq!(parse_name("blocks.0.attn2.proj_l.weight"), None);
    }
}
