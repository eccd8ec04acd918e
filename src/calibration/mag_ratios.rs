//! MagCache calibration (`ditc calibrate --mag-ratios`): the magnitude ratios of the block stack's
//! residual along a full sampling run, per guidance branch, as diffusers' calibration mode measures
//! them.
//!
//! The float graph runs every step with nothing skipped (with classifier-free guidance: the
//! conditional call, then the unconditional one, combined as the runtime does). At each call the
//! stack's residual `r = last block's output - first block's input` (hidden-states stream, f32) is
//! read; the ratio is `1.0` at the first step, else `mean(‖r_t‖₂ / (‖r_{t-1}‖₂ + 1e-8))`, the norm
//! over the last axis, the mean over batch and tokens. With several cases the per-step ratios are
//! averaged over them. The result is a [`RatiosFile`], which `mag_ratios` can name.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

pub use super::full_run::Calibration;
use super::full_run::{output_f32, run_full};
use crate::analysis::analyse;
use crate::analysis::stack::find_stack;
use crate::ir::{infer_types, Tensor, ValueInfo};
use crate::schedule::guidance::{branches, Branch};
use crate::schedule::mag_cache::{RatiosFile, RATIOS_FORMAT};

/// The ratios of every branch, averaged over `cases` (each a case's tensors: `noise` and the
/// model's condition inputs, plus the negative).
pub fn calibrate(c: &Calibration, cases: &[Vec<Tensor>], progress: bool) -> Result<RatiosFile> {
    let types = infer_types(&c.model.graph, c.model.default_opset());
    let stack = find_stack(&c.model.graph, &analyse(c.model), &types)?;
    let (first, last) = (stack.input().to_string(), stack.output().to_string());
    let mut probed = c.model.clone();
    for v in [&first, &last] {
        let info = &types[v.as_str()];
        let dims = stack
            .shape
            .iter()
            .map(|&d| crate::ir::Dim::Value(d))
            .collect();
        probed.graph.outputs.push(ValueInfo::tensor(
            v,
            info.dtype.unwrap_or(crate::ir::DataType::F32),
            dims,
        ));
    }
    let width = *stack.shape.last().context("the stream has no axes")? as usize;
    if width == 0 {
        bail!("the block stack's stream has an empty last axis");
    }
    let steps = c.sampler.steps();
    let mut sums: BTreeMap<Branch, Vec<f64>> = branches(c.guidance)
        .iter()
        .map(|&b| (b, vec![0.0; steps]))
        .collect();
    // Per (case, branch): the previous step's residual.
    let mut previous: BTreeMap<(usize, Branch), Vec<f32>> = BTreeMap::new();
    run_full(c, &probed, cases, progress, |call| {
        previous.retain(|(case, _), _| *case == call.case);
        let (a, b) = (
            output_f32(call.outputs, &first)?,
            output_f32(call.outputs, &last)?,
        );
        let residual: Vec<f32> = b.iter().zip(&a).map(|(o, i)| o - i).collect();
        let ratio = match previous.get(&(call.case, call.branch)) {
            None => 1.0,
            Some(prev) => mean_norm_ratio(&residual, prev, width),
        };
        sums.get_mut(&call.branch).expect("every branch")[call.step] += ratio;
        previous.insert((call.case, call.branch), residual);
        Ok(())
    })?;
    let mean = |v: &Vec<f64>| -> Vec<f64> { v.iter().map(|s| s / cases.len() as f64).collect() };
    Ok(RatiosFile {
        format: RATIOS_FORMAT.into(),
        version: 1,
        source: c.source.clone(),
        steps,
        cond: mean(&sums[&Branch::Cond]),
        uncond: sums.get(&Branch::Uncond).map(mean),
    })
}

/// `mean(‖r‖₂ / (‖prev‖₂ + 1e-8))` over the rows of `width` values, as torch computes it on f32: the
/// norms and the quotients in f32 (the sums of squares accumulated in f64 and rounded), the mean
/// accumulated in f64.
pub(crate) fn mean_norm_ratio(r: &[f32], prev: &[f32], width: usize) -> f64 {
    let norm = |row: &[f32]| -> f32 {
        (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32).sqrt()
    };
    let rows = r.len() / width;
    let total: f64 = r
        .chunks(width)
        .zip(prev.chunks(width))
        .map(|(a, b)| (norm(a) / (norm(b) + 1e-8f32)) as f64)
        .sum();
    (total / rows as f64) as f32 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_the_mean_of_per_token_norm_ratios() {
        // Two tokens of width 2: norms 5 and 1 now, 2.5 and 2 before -> ratios 2 and 0.5.
        let now = [3.0, 4.0, 0.0, 1.0];
        let before = [1.5, 2.0, 2.0, 0.0];
        let r = mean_norm_ratio(&now, &before, 2);
        assert!((r - 1.25).abs() < 1e-6, "{r}");
    }
}
