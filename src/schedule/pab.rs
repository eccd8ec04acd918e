//! Pyramid Attention Broadcast: the static per-kind compute/reuse decision (reference.md §1).
//!
//! For a module called once per step, at step `i` with scheduler timestep `t`:
//! `compute = i == 0 || period == 1 || !(lo < t < hi) || i % period == 0`. The phase follows the global
//! step index, not the first step inside the window, exactly as diffusers' `PyramidAttentionBroadcastHook`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::Group;
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

/// MLP broadcast as PAB's Open-Sora/Latte configs describe it (VideoSys `mlp_*_skip_config`): at each
/// key timestep the MLPs of the listed blocks compute and are cached, then reused for the next `reuse`
/// steps. Block numbers count blocks of the same family (spatial blocks 0.., temporal blocks 0..).
/// Key timesteps that the sampler never visits are ignored, as in VideoSys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSchedule {
    pub timesteps: Vec<f64>,
    pub blocks: Vec<usize>,
    pub reuse: u32,
}

/// Compute (true) or reuse at each step for the MLPs of the listed blocks.
pub fn mlp_decisions(m: &MlpSchedule, timesteps: &[f64]) -> Vec<bool> {
    let mut compute = vec![true; timesteps.len()];
    for key in &m.timesteps {
        if let Some(j) = timesteps.iter().position(|t| (t - key).abs() < 1e-6) {
            for c in compute.iter_mut().skip(j + 1).take(m.reuse as usize) {
                *c = false;
            }
        }
    }
    compute
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
            if lo.is_nan() || hi.is_nan() || lo >= hi {
                bail!(
                    "broadcast-static.{}.window [{lo}, {hi}] is inverted or empty",
                    kind.as_str()
                );
            }
        }
        if let Some(m) = &self.mlp {
            if m.blocks.is_empty() || m.timesteps.is_empty() {
                bail!("broadcast-static.mlp needs at least one block and one timestep");
            }
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

/// Decision tables for every attention kind that is broadcast (period > 1), and for the MLPs.
pub fn tables(options: &PabOptions, timesteps: &[f64]) -> BTreeMap<Group, Vec<bool>> {
    let mut out: BTreeMap<Group, Vec<bool>> = AttentionKind::ALL
        .iter()
        .filter_map(|&k| {
            let s = options.for_kind(k)?;
            (s.period > 1).then(|| (Group::from(k), decisions(&s, timesteps)))
        })
        .collect();
    if let Some(m) = &options.mlp {
        let table = mlp_decisions(m, timesteps);
        if table.contains(&false) {
            out.insert(Group::Mlp, table);
        }
    }
    out
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
    fn mlp_reuse_follows_key_timesteps() {
        // Latte's config over 50 leading DDIM steps (980, 960, ..., 0): 720 is step 13.
        let timesteps: Vec<f64> = (0..50).map(|i| 980.0 - 20.0 * i as f64).collect();
        let m = MlpSchedule {
            timesteps: vec![720.0, 640.0, 555.0],
            blocks: vec![0],
            reuse: 2,
        };
        let d = mlp_decisions(&m, &timesteps);
        let reused: Vec<usize> = (0..50).filter(|&i| !d[i]).collect();
        assert_eq!(
            reused,
            vec![14, 15, 18, 19],
            "555 is never visited and is ignored"
        );
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
