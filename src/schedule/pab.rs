//! Pyramid Attention Broadcast: the static per-kind compute/reuse decision (reference.md §1).
//!
//! For a module called once per step, at step `i` with scheduler timestep `t`:
//! `compute = i == 0 || period == 1 || !(lo < t < hi) || i % period == 0`. The phase follows the global
//! step index, not the first step inside the window, exactly as diffusers' `PyramidAttentionBroadcastHook`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::analysis::AttentionKind;

/// Broadcast settings of one attention kind.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSchedule {
    /// Compute every `period` steps inside the window (1 = never reuse).
    pub period: u32,
    /// Timestep window `(lo, hi)`, exclusive on both sides.
    pub window: [f64; 2],
}

/// MLP broadcast as PAB's Open-Sora/Latte configs describe it (parsed, not yet baked).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSchedule {
    pub timesteps: Vec<f64>,
    pub blocks: Vec<usize>,
    pub reuse: u32,
}

/// Options of the `broadcast-static` pass.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PabOptions {
    pub spatial: Option<KindSchedule>,
    pub temporal: Option<KindSchedule>,
    pub cross: Option<KindSchedule>,
    /// Full (joint) attention; uses the spatial settings when absent.
    pub full: Option<KindSchedule>,
    pub mlp: Option<MlpSchedule>,
}

impl PabOptions {
    /// Settings for a kind; `None` means the kind is never broadcast.
    pub fn for_kind(&self, kind: AttentionKind) -> Option<KindSchedule> {
        match kind {
            AttentionKind::Spatial => self.spatial,
            AttentionKind::Temporal => self.temporal,
            AttentionKind::Cross => self.cross,
            AttentionKind::Full => self.full.or(self.spatial),
        }
    }

    pub fn validate(&self) -> Result<()> {
        for kind in AttentionKind::ALL {
            let Some(s) = self.for_kind(kind) else {
                continue;
            };
            if s.period < 1 {
                bail!(
                    "broadcast-static.{}.period must be at least 1 (got {})",
                    kind.as_str(),
                    s.period
                );
            }
            let [lo, hi] = s.window;
            if !(lo < hi) {
                bail!(
                    "broadcast-static.{}.window [{lo}, {hi}] is inverted or empty",
                    kind.as_str()
                );
            }
        }
        if self.mlp.is_some() {
            bail!("broadcast-static.mlp (MLP broadcast) is not implemented yet; remove it from the recipe");
        }
        Ok(())
    }
}

/// The compute decision of every step for one kind.
pub fn decisions(s: &KindSchedule, timesteps: &[f64]) -> Vec<bool> {
    let [lo, hi] = s.window;
    timesteps
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let in_window = lo < t && t < hi;
            i == 0 || s.period == 1 || !in_window || i % s.period as usize == 0
        })
        .collect()
}

/// Decision tables for every kind that is broadcast (period > 1).
pub fn tables(options: &PabOptions, timesteps: &[f64]) -> BTreeMap<AttentionKind, Vec<bool>> {
    AttentionKind::ALL
        .iter()
        .filter_map(|&k| {
            let s = options.for_kind(k)?;
            (s.period > 1).then(|| (k, decisions(&s, timesteps)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(period: u32, window: [f64; 2]) -> String {
        let timesteps: Vec<f64> = (0..50).map(|i| 999.0 - 20.0 * i as f64).collect();
        decisions(&KindSchedule { period, window }, &timesteps)
            .iter()
            .map(|&c| if c { 'C' } else { 'R' })
            .collect()
    }

    #[test]
    fn worked_examples_from_the_reference() {
        assert_eq!(
            pattern(2, [100.0, 800.0]),
            "CCCCCCCCCCCRCRCRCRCRCRCRCRCRCRCRCRCRCRCRCRCRCCCCCC"
        );
        assert_eq!(
            pattern(3, [100.0, 800.0]),
            "CCCCCCCCCCRRCRRCRRCRRCRRCRRCRRCRRCRRCRRCRRCRRCCCCC"
        );
        assert_eq!(pattern(1, [100.0, 800.0]).matches('R').count(), 0);
    }

    #[test]
    fn bad_options_are_rejected() {
        let bad = PabOptions {
            spatial: Some(KindSchedule {
                period: 0,
                window: [1.0, 2.0],
            }),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("period"));
        let inverted = PabOptions {
            cross: Some(KindSchedule {
                period: 2,
                window: [800.0, 100.0],
            }),
            ..Default::default()
        };
        assert!(inverted
            .validate()
            .unwrap_err()
            .to_string()
            .contains("inverted"));
        let full = PabOptions {
            spatial: Some(KindSchedule {
                period: 2,
                window: [1.0, 2.0],
            }),
            ..Default::default()
        };
        assert_eq!(full.for_kind(AttentionKind::Full).unwrap().period, 2);
    }
}
