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
