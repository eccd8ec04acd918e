//! Which quantized layers cost the most fidelity, and how many to keep in high precision for a budget
//! (`ditc calibrate --sensitivity`; `quantize-w8a8.budget_psnr` / `budget_cosine` read the result).
//!
//! Ranking: each layer alone is quantized and the prediction's relative L2 error against the float
//! model is averaged over points sampled along the calibration trajectories. Budget table: the final
//! latent of the first calibration case, sampled with the k most sensitive layers kept in float
//! (k = 0, 1, 2, 4, ... up to all), compared with the float model's (PSNR, cosine): measured, not
//! estimated, so a budget is only ever met by a measurement.

use anyhow::{Context, Result};

use super::collect::{ReplayPoint, Trajectory};
use super::{BudgetPoint, CalibrationStats, LayerSensitivity};
use crate::ir::Model;
use crate::metrics::compare;
use crate::passes::quantize_w8a8::{quantize_layers_with, Format, Target};
use crate::runtime::TractRunner;

/// Sensitivity is measured at every this-many-th step of each calibration trajectory.
pub const SENSITIVITY_EVERY: usize = 10;

/// Layers by the mean relative L2 error of the prediction when only that layer is quantized (most
/// sensitive first).
pub fn rank_layers(
    model: &Model,
    targets: &[Target],
    stats: &CalibrationStats,
    format: Format,
    points: &[ReplayPoint],
    prediction: &str,
    progress: bool,
) -> Result<Vec<LayerSensitivity>> {
    let bar = crate::progress::steps_bar(targets.len() as u64, "sensitivity", progress);
    let mut ranked = Vec::new();
    for t in targets {
        let mut m = model.clone();
        quantize_layers_with(&mut m, std::slice::from_ref(t), stats, None, format)?;
        let runner = TractRunner::new(&m, &points[0].0)?;
        let mut total = 0.0;
        for (feed, reference) in points {
            let out = runner.run(feed)?;
            let pred = out
                .iter()
                .find(|o| o.name == prediction)
                .context("no prediction")?;
            total += compare(&pred.to_f32_vec().context("f32")?, reference).rel_l2;
        }
        ranked.push(LayerSensitivity {
            node: t.node.clone(),
            rel_l2: total / points.len() as f64,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    ranked.sort_by(|a, b| b.rel_l2.total_cmp(&a.rel_l2));
    Ok(ranked)
}

/// Fidelity of the final latent of `trajectory` with the k most sensitive layers (from
/// `stats.sensitivity`) kept in high precision, k = 0, 1, 2, 4, ... up to all of them.
pub fn budget_table(
    model: &Model,
    targets: &[Target],
    stats: &CalibrationStats,
    format: Format,
    trajectory: &Trajectory,
    reference: &[f32],
    progress: bool,
) -> Result<Vec<BudgetPoint>> {
    let ks = keep_counts(targets.len());
    let bar = crate::progress::steps_bar(ks.len() as u64, "budget table", progress);
    let mut table = Vec::new();
    for k in ks {
        let keep: Vec<String> = stats
            .sensitivity
            .iter()
            .take(k)
            .map(|s| s.node.clone())
            .collect();
        let chosen: Vec<Target> = targets
            .iter()
            .filter(|t| !keep.contains(&t.node))
            .cloned()
            .collect();
        let mut m = model.clone();
        quantize_layers_with(&mut m, &chosen, stats, None, format)?;
        let f = compare(&trajectory.run(&m, &mut None, |_, _, _| Ok(()))?, reference);
        table.push(BudgetPoint {
            keep_float: keep,
            psnr_db: f.psnr_db.min(999.0),
            cosine: f.cosine,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(table)
}

/// 0, 1, 2, 4, ... doubling, ending at `n`.
fn keep_counts(n: usize) -> Vec<usize> {
    let mut ks = vec![0usize];
    while *ks.last().expect("non-empty") < n {
        let next = (ks.last().expect("non-empty") * 2).max(1).min(n);
        ks.push(next);
    }
    ks
}

#[cfg(test)]
mod tests {
    #[test]
    fn keep_counts_double_up_to_all() {
        assert_eq!(super::keep_counts(0), vec![0]);
        assert_eq!(super::keep_counts(5), vec![0, 1, 2, 4, 5]);
        assert_eq!(super::keep_counts(64), vec![0, 1, 2, 4, 8, 16, 32, 64]);
    }
}
