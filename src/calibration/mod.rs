//! Calibration statistics: the activation ranges static INT8 scales are made from.
//!
//! Format (`ditc calibrate` writes it; anything else may, e.g. a PyTorch forward hook):
//!
//! ```json
//! { "format": "ditc-calibration", "version": 1, "method": "max",
//!   "source": "where the numbers came from (free text)",
//!   "samples": 100,
//!   "tensors": { "<graph value name>": { "amax": 3.25, "channel_amax": [0.5, 3.25, ...] } } }
//! ```
//!
//! `amax` is the largest |x| seen for that value (the input of a quantized layer) over all samples;
//! `channel_amax` (optional; SmoothQuant needs it) the same per channel of the last axis.
//! Keys are value names of the graph being converted (`ditc calibrate MODEL` uses the same ones).
//!
//! Submodules: [`collect`] measures the ranges along sampling trajectories, [`sensitivity`] ranks layers
//! and measures the fidelity budget table, [`mag_ratios`] measures MagCache's magnitude ratios.

pub mod collect;
pub mod full_run;
pub mod mag_ratios;
pub mod profile;
pub mod sensitivity;
pub mod teacache_fit;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "ditc-calibration";

/// The smallest activation range a scale is made from. An activation that was exactly 0 at every
/// calibrated step (or a hand-written `amax` of 0) is given this range, so its scale (1e-6/127 for
/// INT8) is positive and zeros still quantize to exactly 0.
pub const AMAX_FLOOR: f32 = 1e-6;
const _: () = assert!(AMAX_FLOOR > 0.0, "a zero floor would allow zero scales");

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationStats {
    pub format: String,
    pub version: u32,
    pub method: String,
    #[serde(default)]
    pub source: String,
    /// Model calls the statistics cover.
    #[serde(default)]
    pub samples: usize,
    pub tensors: BTreeMap<String, TensorStats>,
    /// Layers ranked by fidelity lost when only that layer is quantized (most sensitive first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitivity: Vec<LayerSensitivity>,
    /// Measured fidelity of the final latent when the `keep_float` most sensitive layers stay in high
    /// precision (ascending in size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budget: Vec<BudgetPoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSensitivity {
    pub node: String,
    /// Mean relative L2 error of the model's prediction with only this layer quantized.
    pub rel_l2: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetPoint {
    pub keep_float: Vec<String>,
    pub psnr_db: f64,
    pub cosine: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorStats {
    pub amax: f32,
    /// Largest |x| per channel of the last axis (needed by SmoothQuant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_amax: Option<Vec<f32>>,
}

/// What a manifest records about the calibration used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CalibrationInfo {
    pub file: String,
    pub sha256: String,
    pub method: String,
    pub source: String,
    pub samples: usize,
}

impl CalibrationStats {
    pub fn read(path: &Path) -> Result<CalibrationStats> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read calibration stats '{}'", path.display()))?;
        let stats: CalibrationStats = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "'{}' is not a calibration stats file (see the README for the format)",
                path.display()
            )
        })?;
        if stats.format != FORMAT || stats.version != 1 {
            bail!(
                "'{}': format '{}' version {} (expected '{FORMAT}' version 1)",
                path.display(),
                stats.format,
                stats.version
            );
        }
        for (name, t) in &stats.tensors {
            if !t.amax.is_finite() || t.amax < 0.0 {
                bail!(
                    "'{}': tensor '{name}' has amax {} (must be finite and >= 0)",
                    path.display(),
                    t.amax
                );
            }
            let bad = t
                .channel_amax
                .iter()
                .flatten()
                .position(|a| !a.is_finite() || *a < 0.0);
            if let Some(i) = bad {
                bail!(
                    "'{}': tensor '{name}' has channel_amax[{i}] = {} (must be finite and >= 0)",
                    path.display(),
                    t.channel_amax.as_ref().expect("found in it")[i]
                );
            }
        }
        Ok(stats)
    }

    /// The smallest set of layers to keep in high precision whose measured fidelity meets the budget.
    pub fn layers_to_keep(&self, psnr: Option<f64>, cosine: Option<f64>) -> Result<Vec<String>> {
        if self.budget.is_empty() {
            bail!("the calibration stats have no budget table: run `ditc calibrate --sensitivity`");
        }
        let meets = |b: &BudgetPoint| {
            psnr.is_none_or(|p| b.psnr_db >= p) && cosine.is_none_or(|c| b.cosine >= c)
        };
        match self.budget.iter().find(|b| meets(b)) {
            Some(b) => Ok(b.keep_float.clone()),
            None => {
                let best = self.budget.last().expect("non-empty");
                bail!(
                    "no measured point meets the budget (PSNR >= {psnr:?} dB, cosine >= {cosine:?}); keeping {} layers gave PSNR {:.2} dB, cosine {:.6}",
                    best.keep_float.len(), best.psnr_db, best.cosine
                )
            }
        }
    }

    pub fn channel_amax(&self, value: &str) -> Option<&[f32]> {
        self.tensors.get(value)?.channel_amax.as_deref()
    }

    pub fn amax(&self, value: &str) -> Option<f32> {
        self.tensors.get(value).map(|t| t.amax)
    }

    pub fn describe(&self, path: &Path) -> Result<CalibrationInfo> {
        Ok(CalibrationInfo {
            file: path.display().to_string(),
            sha256: crate::output::sha256_file(path)?,
            method: self.method.clone(),
            source: self.source.clone(),
            samples: self.samples,
        })
    }
}
