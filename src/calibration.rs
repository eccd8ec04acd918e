//! Calibration statistics: the activation ranges static INT8 scales are made from.
//!
//! Format (`ditc calibrate` writes it; anything else may, e.g. a PyTorch forward hook):
//!
//! ```json
//! { "format": "ditc-calibration", "version": 1, "method": "max",
//!   "source": "where the numbers came from (free text)",
//!   "samples": 100,
//!   "tensors": { "<graph value name>": { "amax": 3.25 } } }
//! ```
//!
//! `amax` is the largest |x| seen for that value (the input of a quantized layer) over all samples.
//! Keys are value names of the graph being converted (`ditc calibrate MODEL` uses the same ones).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "ditc-calibration";

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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorStats {
    pub amax: f32,
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
        }
        Ok(stats)
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
