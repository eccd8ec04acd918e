//! A cost model for attention on an H100: estimated time of a site, dense and block-sparse.
//!
//! Sources (reference.md §3, this project's own measurements on one H100, torch 2.11, BF16):
//! dense SDPA runs at 602 TFLOP/s at Wan2.1's shapes (32,760 tokens); block-sparse attention
//! (FlexAttention, 128-token tiles) against it at the same shapes: 80% of the blocks skipped 2.39x,
//! 90% 4.30x, 95% 7.87x; at Latte's 1024-token spatial attention, no gain.
//!
//! The model: dense time = score and value FLOPs / 602 TFLOP/s. Sparse time = dense time / speedup,
//! where the speedup at a skipped fraction `s` is `e(s) / (1 - s)` with the efficiency `e` (speedup x
//! kept fraction) interpolated linearly between the measured points (e = 1 at s = 0, held at its 95%
//! value beyond), and scaled by the sequence length: no gain at 1024 keys or fewer, the full curve at
//! Wan's 32,760 keys and above, log-linear in between (an assumption: nothing between was measured).

/// Quantized attention over BF16 attention (the same FLOPs), an assumption from published peaks, not
/// measured by this project: FlashAttention-3 reports up to ~1.2 PFLOP/s in FP8 against up to
/// ~740 TFLOP/s in BF16 on an H100 (Shah et al. 2024), a factor ~1.6. SageAttention2's INT8 Q·Kᵀ and
/// FP8 P·V run on tensor cores whose dense INT8 and FP8 peaks are equal on an H100 (1979 TOPS and
/// TFLOP/s, SXM), so the same factor is assumed for it.
pub const FP8_ATTENTION_FACTOR: f64 = 1.6;
pub const SAGE_ATTENTION_FACTOR: f64 = 1.6;

/// Estimated milliseconds of `flops` score/value FLOPs of quantized attention (`factor` one of the
/// constants above).
pub fn quantized_ms(flops: u64, factor: f64) -> f64 {
    dense_ms(flops) / factor
}

/// Dense SDPA throughput at Wan's shapes on an H100 (TFLOP/s).
pub const DENSE_TFLOPS: f64 = 602.0;

/// Measured (skipped fraction, speedup over dense SDPA) at Wan's shapes.
pub const MEASURED: [(f64, f64); 3] = [(0.8, 2.39), (0.9, 4.30), (0.95, 7.87)];

/// Key lengths where the curve was measured: no gain at Latte's 1024, the full curve at Wan's 32,760.
const NO_GAIN_KEYS: f64 = 1024.0;
const CURVE_KEYS: f64 = 32760.0;

/// Estimated milliseconds of `flops` score/value FLOPs of dense attention.
pub fn dense_ms(flops: u64) -> f64 {
    flops as f64 / (DENSE_TFLOPS * 1e12) * 1e3
}

/// Estimated speedup of block-sparse attention keeping `kept` of the score blocks (0 < kept <= 1)
/// over dense attention, for a sequence of `key_len` keys.
pub fn sparse_speedup(kept: f64, key_len: i64) -> f64 {
    let kept = kept.clamp(1e-6, 1.0);
    let skipped = 1.0 - kept;
    let points =
        std::iter::once((0.0, 1.0)).chain(MEASURED.iter().map(|&(s, x)| (s, x * (1.0 - s))));
    let points: Vec<(f64, f64)> = points.collect();
    let efficiency = match points.iter().position(|&(s, _)| s >= skipped) {
        Some(0) => 1.0,
        Some(i) => {
            let ((s0, e0), (s1, e1)) = (points[i - 1], points[i]);
            e0 + (e1 - e0) * (skipped - s0) / (s1 - s0)
        }
        None => points.last().expect("measured points").1,
    };
    let curve = (efficiency / kept).max(1.0);
    let t =
        ((key_len as f64 / NO_GAIN_KEYS).ln() / (CURVE_KEYS / NO_GAIN_KEYS).ln()).clamp(0.0, 1.0);
    1.0 + (curve - 1.0) * t
}

/// Estimated milliseconds of a block-sparse site: its dense FLOPs, the fraction kept, its keys.
pub fn sparse_ms(dense_flops: u64, kept: f64, key_len: i64) -> f64 {
    dense_ms(dense_flops) / sparse_speedup(kept, key_len)
}

/// The cost model's estimate of one attention site per call, from the graph as it is (README
/// "Compute accounting and the cost model").
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SiteCost {
    pub site: usize,
    /// The node that computes it (the softmax, or the `ai.ditc` op that replaced the site).
    pub node: String,
    pub flops_dense: u64,
    /// Dense BF16 attention at 602 TFLOP/s.
    pub h100_ms_dense: f64,
    /// Kept fraction of the score blocks (top-k sparse sites; null: dense, or mass mode).
    pub kept_fraction: Option<f64>,
    /// `fp8` (Q/DQ FP8 attention) or `sage` (SageAttention2 numerics), null: BF16.
    pub quantized: Option<String>,
    /// The quantized-attention factor applied (1 for BF16).
    pub quantized_factor: f64,
    /// Dense time / sparse speedup (if sparse) / quantized factor.
    pub h100_ms_estimated: f64,
}

/// Per site: its kept fraction (top-k `SparseLinearAttention` / `SageSparseLinearAttention` node at the
/// anchor), its quantized format (a `SageAttention` / `SageSparseLinearAttention` node, or FP8 Q/DQ on
/// the softmax output) and the estimates.
pub fn site_costs(model: &crate::ir::Model, sites: &[super::AttentionSite]) -> Vec<SiteCost> {
    sites
        .iter()
        .map(|s| site_cost(model, s.id, &s.anchor, s.flops, s.key_len))
        .collect()
}

fn site_cost(
    model: &crate::ir::Model,
    site: usize,
    anchor: &str,
    flops: u64,
    key_len: i64,
) -> SiteCost {
    let node = model.graph.nodes.iter().find(|n| n.name == anchor);
    let op = node.map_or("", |n| n.op_type.as_str());
    let kept_fraction = node
        .filter(|n| {
            matches!(op, "SparseLinearAttention" | "SageSparseLinearAttention")
                && n.attr_float("mass").unwrap_or(0.0) <= 0.0
        })
        .and_then(|n| Some((n.attr_int("keep_blocks")?, n.attr_int("key_blocks")?)))
        .filter(|&(_, nk)| nk > 0)
        .map(|(k, nk)| k as f64 / nk as f64);
    let quantized = match op {
        "SageAttention" | "SageSparseLinearAttention" => Some("sage"),
        _ if fp8_softmax(model, anchor) => Some("fp8"),
        _ => None,
    };
    let factor = match quantized {
        Some("sage") => SAGE_ATTENTION_FACTOR,
        Some(_) => FP8_ATTENTION_FACTOR,
        None => 1.0,
    };
    let sparse = kept_fraction.map_or(1.0, |k| sparse_speedup(k, key_len));
    SiteCost {
        site,
        node: anchor.to_string(),
        flops_dense: flops,
        h100_ms_dense: dense_ms(flops),
        kept_fraction,
        quantized: quantized.map(String::from),
        quantized_factor: factor,
        h100_ms_estimated: dense_ms(flops) / sparse / factor,
    }
}

/// The sites a ditc pass fused into `ai.ditc` attention ops (`SageAttention`,
/// `SparseLinearAttention`, `SageSparseLinearAttention`), which the DiT map of a bundle's graph does
/// not re-find: their cost from the op's Q, K, V shapes (FLOPs `2·B·H·Lq·Lk·(D + Dv)`) and attributes.
/// `site` is the id in the node name (`ditc.sage.site3`: the source graph's site 3); `known` anchors
/// (ops the DiT map did re-find) are skipped.
pub fn ditc_op_costs(model: &crate::ir::Model, known: &[String]) -> Vec<SiteCost> {
    let types = crate::ir::infer_types(&model.graph, model.default_opset());
    let shape = |v: &str| types.get(v).and_then(|t| t.shape.clone());
    model
        .graph
        .nodes
        .iter()
        .filter(|n| {
            n.domain == "ai.ditc"
                && !known.contains(&n.name)
                && matches!(
                    n.op_type.as_str(),
                    "SageAttention" | "SparseLinearAttention" | "SageSparseLinearAttention"
                )
        })
        .filter_map(|n| {
            let (q, k, v) = (
                shape(n.inputs.first()?)?,
                shape(n.inputs.get(1)?)?,
                shape(n.inputs.get(2)?)?,
            );
            let (&[b, h, lq, d], &[_, _, lk, _], &[_, _, _, dv]) =
                (q.as_slice(), k.as_slice(), v.as_slice())
            else {
                return None;
            };
            let flops = (2 * b * h * lq * lk * (d + dv)) as u64;
            let site = n.name.rsplit("site").next()?.parse().ok()?;
            Some(site_cost(model, site, &n.name, flops, lk))
        })
        .collect()
}

/// FP8 attention sites of a bundle's graph (a `Softmax` whose output is FP8 Q/DQ'd, between
/// `MatMul(DQ(Q), DQ(Kᵀ))` and `MatMul(DQ(P), DQ(V))`), which its DiT map does not re-find (the Q/DQ
/// sit between the products), other than `known` anchors: FLOPs `2·numel(P)·(D + Dv)` from the
/// inferred shapes; `site` numbers them after the DiT map's `first_id` sites, in graph order.
pub fn fp8_site_costs(
    model: &crate::ir::Model,
    known: &[String],
    first_id: usize,
) -> Vec<SiteCost> {
    let g = &model.graph;
    let types = crate::ir::infer_types(g, model.default_opset());
    let shape = |v: &str| types.get(v).and_then(|t| t.shape.clone());
    let producer = |v: &str| g.nodes.iter().find(|n| n.outputs.iter().any(|o| o == v));
    let consumer = |v: &str, op: &str| {
        g.nodes
            .iter()
            .find(|n| n.op_type == op && n.inputs.iter().any(|i| i == v))
    };
    let mut out = Vec::new();
    for n in g.nodes.iter().filter(|n| n.op_type == "Softmax") {
        if known.contains(&n.name) || !fp8_softmax(model, &n.name) {
            continue;
        }
        let cost = (|| {
            let p = shape(n.outputs.first()?)?;
            let lk = *p.last()?;
            // Scores: walk back through the scale to the product.
            let mut v = n.inputs.first()?.clone();
            let qk = loop {
                let m = producer(&v)?;
                if m.op_type == "MatMul" {
                    break m;
                }
                v = m.inputs.first()?.clone();
            };
            let d = *shape(qk.inputs.first()?)?.last()?;
            let q = consumer(n.outputs.first()?, "QuantizeLinear")?;
            let dq = consumer(q.outputs.first()?, "DequantizeLinear")?;
            let pv = consumer(dq.outputs.first()?, "MatMul")?;
            let dv = *shape(pv.inputs.get(1)?)?.last()?;
            let flops = 2 * p.iter().product::<i64>() as u64 * (d + dv) as u64;
            Some(site_cost(model, first_id + out.len(), &n.name, flops, lk))
        })();
        out.extend(cost);
    }
    out
}

/// True when the output of node `anchor` (a softmax) is quantized to FP8 E4M3 by a `QuantizeLinear`.
fn fp8_softmax(model: &crate::ir::Model, anchor: &str) -> bool {
    let g = &model.graph;
    let Some(out) = g
        .nodes
        .iter()
        .find(|n| n.name == anchor)
        .and_then(|n| n.outputs.first())
    else {
        return false;
    };
    g.nodes.iter().any(|n| {
        n.op_type == "QuantizeLinear"
            && n.inputs.first() == Some(out)
            && n.inputs.get(2).is_some_and(|zp| {
                g.initializer(zp)
                    .is_some_and(|t| t.dtype == crate::ir::DataType::F8E4M3FN)
                    || g.nodes.iter().any(|c| {
                        c.op_type == "Constant"
                            && c.outputs.first() == Some(zp)
                            && c.attr_tensor("value")
                                .is_some_and(|t| t.dtype == crate::ir::DataType::F8E4M3FN)
                    })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_measured_points_at_wan_shapes() {
        for (skipped, speedup) in MEASURED {
            let got = sparse_speedup(1.0 - skipped, 32760);
            assert!(
                (got - speedup).abs() < 1e-9,
                "{skipped}: {got} vs {speedup}"
            );
        }
        assert!((sparse_speedup(1.0, 32760) - 1.0).abs() < 1e-12);
        // No gain at Latte's 1024-token attention, whatever is skipped.
        assert_eq!(sparse_speedup(0.1, 1024), 1.0);
        // Between the measured points: monotone.
        let (a, b) = (sparse_speedup(0.15, 32760), sparse_speedup(0.12, 32760));
        assert!(2.39 < a && a < b && b < 4.30, "{a} {b}");
        // 602 TFLOP/s: 602e9 FLOPs take 1 ms; FP8 attention 1.6x faster.
        assert!((dense_ms(602_000_000_000) - 1.0).abs() < 1e-12);
        assert!((quantized_ms(602_000_000_000, FP8_ATTENTION_FACTOR) - 0.625).abs() < 1e-12);
    }
}
