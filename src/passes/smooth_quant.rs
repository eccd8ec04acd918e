//! SmoothQuant (Xiao et al. 2023), applied by `quantize-w8a8` before it quantizes (`smooth_quant`,
//! `smooth_quant_alpha`).
//!
//! Activation outliers live in a few input channels; per-tensor INT8 activations then waste their range
//! on them. SmoothQuant moves that range into the weights, which are quantized per output channel and
//! absorb it cheaply. Per input channel `j` of an activation `X` read by weights `W` (rows = input
//! channels):
//!
//! ```text
//! s_j = amax_X[j]^alpha / max|W[j, :]|^(1 - alpha)     (clamped to 1e-4 ..= 1e4)
//! X' = X / s          (an inserted `Mul` by 1/s)
//! W' = diag(s) W      (each input row multiplied by s_j)
//! ```
//!
//! so `X' W' = X W` exactly in real arithmetic (to float rounding in f32). A large `amax_X[j]` gives a
//! large `s_j`, which shrinks that channel of the activation: the outlier moves into the weights.
//! When several layers read one activation (Q/K/V), `max|W[j, :]|` is taken over all of them and all get
//! the same `s`. Convolutions, and activations shared with them, are left alone (their input channels
//! are not a weight row). A channel whose range or weight row is all zero keeps `s_j = 1`.
//!
//! Invariants: the original activation value keeps its name and consumers outside the targets; the
//! smoothed weights are new initializers (`<weight>.smoothed.<activation>`), so a weight shared with an
//! unsmoothed reader is not changed under it.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::quantize_w8a8::Target;
use crate::calibration::{CalibrationStats, TensorStats};
use crate::ir::{Model, Node, Tensor};

/// The SmoothQuant factor of one input channel, from its activation range and its weight row's range.
pub fn channel_scale(activation_amax: f32, weight_row_max: f32, alpha: f64) -> f32 {
    if activation_amax > 0.0 && weight_row_max > 0.0 {
        ((activation_amax as f64).powf(alpha) / (weight_row_max as f64).powf(1.0 - alpha))
            .clamp(1e-4, 1e4) as f32
    } else {
        1.0
    }
}

/// Smooth every 2-D-weight target's activation in `model`. Returns the targets retargeted to the
/// smoothed activations and weights, and the stats with the smoothed activations' ranges added.
pub fn apply(
    model: &mut Model,
    targets: &[Target],
    stats: &CalibrationStats,
    alpha: f64,
) -> Result<(Vec<Target>, CalibrationStats)> {
    let mut stats = stats.clone();
    let mut out = targets.to_vec();
    for (activation, members) in smoothable_groups(model, targets) {
        let Some(amax) = stats.channel_amax(&activation).map(|a| a.to_vec()) else {
            bail!("SmoothQuant needs per-channel ranges for '{activation}': recalibrate with `ditc calibrate`");
        };
        let row_max = weight_row_max(model, targets, &members, &activation, amax.len())?;
        let s: Vec<f32> = amax
            .iter()
            .zip(&row_max)
            .map(|(&a, &w)| channel_scale(a, w, alpha))
            .collect();
        let smoothed = insert_activation_divide(model, &activation, &s);
        let new_amax = amax.iter().zip(&s).map(|(a, s)| a / s).fold(0f32, f32::max);
        stats.tensors.insert(
            smoothed.clone(),
            TensorStats {
                amax: new_amax,
                channel_amax: None,
            },
        );
        for &m in &members {
            let t = &mut out[m];
            t.weight = scale_weight_rows(model, t, &activation, &s)?;
            t.activation = smoothed.clone();
        }
    }
    Ok((out, stats))
}

/// Targets grouped by activation, for activations read only through 2-D weights.
fn smoothable_groups(model: &Model, targets: &[Target]) -> BTreeMap<String, Vec<usize>> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let two_d = model
            .graph
            .initializer(&t.weight)
            .is_some_and(|w| w.dims.len() == 2);
        if two_d {
            groups.entry(t.activation.clone()).or_default().push(i);
        }
    }
    // Convolutions (and activations shared with them) are not smoothed.
    groups.retain(|a, members| {
        targets.iter().filter(|t| &t.activation == a).count() == members.len()
    });
    groups
}

/// Input channel of flat element `i` of a 2-D weight with `cols` columns: rows for MatMul `[K, N]`
/// (output axis 1), columns for Gemm with transB `[N, K]` (output axis 0).
fn input_channel(t: &Target, i: usize, cols: usize) -> usize {
    if t.axis == 1 {
        i / cols
    } else {
        i % cols
    }
}

/// `max|W[j, :]|` per input channel j over every weight reading `activation`.
fn weight_row_max(
    model: &Model,
    targets: &[Target],
    members: &[usize],
    activation: &str,
    channels: usize,
) -> Result<Vec<f32>> {
    let mut row_max = vec![0f32; channels];
    for &m in members {
        let t = &targets[m];
        let w = model.graph.initializer(&t.weight).context("weight")?;
        let cols = w.dims[1] as usize;
        let inputs = if t.axis == 1 { w.dims[0] } else { w.dims[1] } as usize;
        if inputs != channels {
            bail!(
                "'{activation}' has {channels} calibrated channels but weight '{}' has {inputs} input channels",
                t.weight
            );
        }
        for (i, x) in w.to_f32_vec().context("f32 weight")?.iter().enumerate() {
            let j = input_channel(t, i, cols);
            row_max[j] = row_max[j].max(x.abs());
        }
    }
    Ok(row_max)
}

/// Insert `activation * (1/s)` right after the node making `activation`; returns the new value's name.
fn insert_activation_divide(model: &mut Model, activation: &str, s: &[f32]) -> String {
    let inv = format!("{activation}.smooth_inv");
    let smoothed = format!("{activation}.smoothed");
    let inverse: Vec<f32> = s.iter().map(|x| 1.0 / x).collect();
    model
        .graph
        .initializers
        .push(Tensor::from_f32(&inv, vec![s.len() as i64], &inverse));
    let at = model
        .graph
        .nodes
        .iter()
        .position(|n| n.outputs.iter().any(|o| o == activation))
        .map(|i| i + 1)
        .unwrap_or(0);
    model.graph.nodes.insert(
        at,
        Node::new(
            &format!("{activation}.smooth"),
            "Mul",
            &[activation, &inv],
            &[&smoothed],
        ),
    );
    smoothed
}

/// A copy of `t`'s weight with input channel j multiplied by `s[j]`; returns its name.
fn scale_weight_rows(model: &mut Model, t: &Target, activation: &str, s: &[f32]) -> Result<String> {
    let w = model.graph.initializer(&t.weight).context("weight")?;
    let cols = w.dims[1] as usize;
    let dims = w.dims.clone();
    let scaled: Vec<f32> = w
        .to_f32_vec()
        .context("f32 weight")?
        .iter()
        .enumerate()
        .map(|(i, x)| x * s[input_channel(t, i, cols)])
        .collect();
    let name = format!("{}.smoothed.{activation}", t.weight);
    if model.graph.initializer(&name).is_none() {
        model
            .graph
            .initializers
            .push(Tensor::from_f32(&name, dims, &scaled));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::channel_scale;

    #[test]
    fn a_large_activation_channel_gets_a_large_factor() {
        // The outlier channel (amax 100) must be divided by more than the ordinary one (amax 1).
        let (outlier, ordinary) = (channel_scale(100.0, 0.5, 0.5), channel_scale(1.0, 0.5, 0.5));
        assert!(outlier > ordinary * 9.0, "{outlier} vs {ordinary}");
        assert!(
            (channel_scale(4.0, 1.0, 0.5) - 2.0).abs() < 1e-6,
            "4^0.5 / 1^0.5"
        );
        assert!(
            (channel_scale(1.0, 4.0, 0.5) - 0.5).abs() < 1e-6,
            "1^0.5 / 4^0.5"
        );
        assert_eq!(channel_scale(0.0, 1.0, 0.5), 1.0);
    }
}
