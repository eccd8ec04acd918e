//! MagCache (diffusers `hooks/mag_cache.py`): skip the whole block stack when the accumulated
//! magnitude-ratio error stays small, reusing the stack's last residual.
//!
//! The decision depends only on the step and the calibrated ratios, so it is a static table. At step
//! `s` (per branch; `R = int(retention_ratio * steps + 0.5)`):
//! `if s >= R: acc_ratio *= ratio[s]; acc_steps += 1; acc_err += |1 - acc_ratio|;` then skip iff a
//! residual exists (every computed call leaves one; step 0 always computes), `acc_err <= threshold`
//! and `acc_steps <= max_skip_steps`, else compute and reset the accumulators. Steps below `R` compute
//! and leave the accumulators alone. `ratio[s]` is an f32 (a 0-d f32 tensor in diffusers), so the
//! accumulators and the comparison are f32. A table of another length than the step count is
//! resampled by diffusers' `nearest_interp`.
//!
//! Ratios come from `ditc calibrate --mag-ratios` (the format [`RatiosFile`]), inline in the recipe
//! or as the path of such a file. diffusers drives both guidance branches with one table (the
//! conditional branch's, as the fixtures do); `mag_ratios_uncond` gives the unconditional branch its
//! own (beyond diffusers).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::guidance::Branch;

/// Options of `broadcast-adaptive` with `policy = "mag-cache"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MagCacheOptions {
    /// Largest accumulated error at which the stack is still skipped.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Most consecutive skipped steps (K).
    #[serde(default = "default_max_skip_steps")]
    pub max_skip_steps: u32,
    /// Fraction of the first steps that always compute.
    #[serde(default = "default_retention_ratio")]
    pub retention_ratio: f64,
    /// One ratio per step (any length: resampled), or the path of a ratios file (its `cond` table).
    pub mag_ratios: Option<Ratios>,
    /// The unconditional branch's own table (or a ratios file's `uncond` table); absent: `mag_ratios`.
    #[serde(default)]
    pub mag_ratios_uncond: Option<Ratios>,
}

fn default_threshold() -> f64 {
    0.06
}
fn default_max_skip_steps() -> u32 {
    3
}
fn default_retention_ratio() -> f64 {
    0.2
}

/// A ratio table given inline or as a file written by `ditc calibrate --mag-ratios`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ratios {
    Values(Vec<f64>),
    File(PathBuf),
}

/// What `ditc calibrate --mag-ratios` writes (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatiosFile {
    pub format: String,
    pub version: u32,
    /// Where the ratios were measured (free text).
    pub source: String,
    /// Sampling steps of the calibration run (each table has one ratio per step).
    pub steps: usize,
    pub cond: Vec<f64>,
    /// Absent for a run without classifier-free guidance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncond: Option<Vec<f64>>,
}

pub const RATIOS_FORMAT: &str = "ditc-mag-ratios";

impl RatiosFile {
    pub fn read(path: &Path) -> Result<RatiosFile> {
        let bytes = std::fs::read(path).with_context(|| {
            format!("cannot read the MagCache ratios file '{}'", path.display())
        })?;
        let file: RatiosFile = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "'{}' is not a MagCache ratios file (written by `ditc calibrate --mag-ratios`)",
                path.display()
            )
        })?;
        if file.format != RATIOS_FORMAT || file.version != 1 {
            bail!(
                "'{}': format '{}' version {} (expected '{RATIOS_FORMAT}' version 1)",
                path.display(),
                file.format,
                file.version
            );
        }
        let tables = std::iter::once(("cond", &file.cond))
            .chain(file.uncond.as_ref().map(|u| ("uncond", u)));
        for (name, t) in tables {
            if t.len() != file.steps {
                bail!(
                    "'{}': the {name} table has {} ratios for {} steps",
                    path.display(),
                    t.len(),
                    file.steps
                );
            }
        }
        Ok(file)
    }
}

impl MagCacheOptions {
    /// Parse and check the options (ratio files are read here, before any model is).
    pub fn from_table(options: &toml::Table) -> Result<MagCacheOptions> {
        let o: MagCacheOptions = options.clone().try_into().context(
            "invalid mag-cache options (valid keys: threshold, max_skip_steps, retention_ratio, mag_ratios, mag_ratios_uncond)",
        )?;
        o.validate()?;
        Ok(o)
    }

    fn validate(&self) -> Result<()> {
        if !(self.threshold.is_finite() && self.threshold >= 0.0) {
            bail!(
                "mag-cache threshold = {}: must be a finite number >= 0",
                self.threshold
            );
        }
        let r = self.retention_ratio;
        if !(r.is_finite() && (0.0..=1.0).contains(&r)) {
            bail!("mag-cache retention_ratio = {r}: must be in [0, 1]");
        }
        if self.mag_ratios.is_none() {
            bail!("mag-cache needs mag_ratios (one per step, or the file `ditc calibrate --mag-ratios` writes)");
        }
        self.ratios(Branch::Cond)?;
        self.ratios(Branch::Uncond)?;
        Ok(())
    }

    /// Whether the unconditional branch has its own table.
    pub fn per_branch(&self) -> bool {
        self.mag_ratios_uncond.is_some()
    }

    /// The ratio table of `branch`, as given (before resampling).
    pub fn ratios(&self, branch: Branch) -> Result<Vec<f64>> {
        let (key, given) = match (branch, &self.mag_ratios_uncond) {
            (Branch::Uncond, Some(r)) => ("mag_ratios_uncond", r),
            _ => (
                "mag_ratios",
                self.mag_ratios
                    .as_ref()
                    .context("mag-cache needs mag_ratios")?,
            ),
        };
        let values = match given {
            Ratios::Values(v) => v.clone(),
            Ratios::File(path) => {
                let file = RatiosFile::read(path)?;
                match branch {
                    Branch::Cond => file.cond,
                    Branch::Uncond if key == "mag_ratios" => file.cond,
                    Branch::Uncond => file.uncond.with_context(|| {
                        format!(
                            "{key}: '{}' has no uncond table (calibrated without guidance)",
                            path.display()
                        )
                    })?,
                }
            }
        };
        if values.is_empty() {
            bail!("mag-cache {key} is empty");
        }
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v > 0.0))
        {
            bail!("mag-cache {key}[{i}] = {v}: every ratio must be a finite number > 0");
        }
        Ok(values)
    }
}

/// Per step of one branch: compute (true) or reuse the stack, and the accumulated error the decision
/// compared (none below the retention steps).
#[derive(Clone, Debug, PartialEq)]
pub struct Decisions {
    pub compute: Vec<bool>,
    pub metric: Vec<Option<f64>>,
}

/// diffusers' `nearest_interp(src, target)`: `src[-1:]` for one step, else
/// `src[round(arange(target, f32) * ((L - 1) / (T - 1)))]`, rounding half to even.
pub fn nearest_interp(src: &[f64], target: usize) -> Vec<f64> {
    if target == 1 {
        return src.last().copied().into_iter().collect();
    }
    let scale = ((src.len() - 1) as f64 / (target - 1) as f64) as f32;
    (0..target)
        .map(|i| {
            let at = (i as f32 * scale).round_ties_even() as usize;
            src[at.min(src.len() - 1)]
        })
        .collect()
}

/// The decisions of one branch over `steps` steps with ratio table `ratios` (resampled when its
/// length differs).
pub fn decisions(o: &MagCacheOptions, ratios: &[f64], steps: usize) -> Decisions {
    let ratios: Vec<f32> = if ratios.len() == steps {
        ratios.iter().map(|&r| r as f32).collect()
    } else {
        nearest_interp(ratios, steps)
            .iter()
            .map(|&r| r as f32)
            .collect()
    };
    // Python `int(retention_ratio * steps + 0.5)`: 0.2 * 50 -> 10.
    let retention = (o.retention_ratio * steps as f64 + 0.5) as usize;
    let threshold = o.threshold as f32;
    let (mut acc_ratio, mut acc_err, mut acc_steps) = (1.0f32, 0.0f32, 0u32);
    let mut has_residual = false;
    let (mut compute, mut metric) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for (s, &ratio) in ratios.iter().enumerate() {
        let mut computes = true;
        let mut seen = None;
        if s >= retention {
            acc_ratio *= ratio;
            acc_steps += 1;
            acc_err += (1.0 - acc_ratio).abs();
            seen = Some(acc_err as f64);
            if has_residual && acc_err <= threshold && acc_steps <= o.max_skip_steps {
                computes = false;
            } else {
                (acc_ratio, acc_err, acc_steps) = (1.0, 0.0, 0);
            }
        }
        has_residual |= computes;
        compute.push(computes);
        metric.push(seen);
    }
    Decisions { compute, metric }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(threshold: f64, ratios: Vec<f64>) -> MagCacheOptions {
        MagCacheOptions {
            threshold,
            max_skip_steps: 3,
            retention_ratio: 0.2,
            mag_ratios: Some(Ratios::Values(ratios)),
            mag_ratios_uncond: None,
        }
    }

    /// The rule worked by hand on 10 steps (R = int(0.2 * 10 + 0.5) = 2) with ratios that drift by
    /// 1% per step: errors accumulate as 0.01, 0.01 + 0.0199, ... and reset on each computed step.
    #[test]
    fn decisions_follow_the_accumulated_error() {
        let o = options(0.035, vec![0.99; 10]);
        let d = decisions(&o, &[0.99; 10], 10);
        let pattern: String = d
            .compute
            .iter()
            .map(|&c| if c { 'C' } else { 'R' })
            .collect();
        // s=2: err 0.01 skip; s=3: 0.0299 skip; s=4: 0.0596 > 0.035 compute (reset); s=5: 0.01 ...
        assert_eq!(pattern, "CCRRCRRCRR");
        assert_eq!(d.metric[0], None);
        assert!((d.metric[3].unwrap() - 0.0299).abs() < 1e-6);
        // max_skip_steps caps a run of skips even at zero error.
        let flat = MagCacheOptions {
            max_skip_steps: 2,
            ..options(0.5, vec![1.0; 10])
        };
        let p: String = decisions(&flat, &[1.0; 10], 10)
            .compute
            .iter()
            .map(|&c| if c { 'C' } else { 'R' })
            .collect();
        assert_eq!(p, "CCRRCRRCRR");
        // Retention 0 still computes step 0 (no residual yet).
        let early = MagCacheOptions {
            retention_ratio: 0.0,
            ..options(0.5, vec![1.0; 4])
        };
        assert_eq!(
            decisions(&early, &[1.0; 4], 4).compute,
            [true, false, false, false]
        );
    }

    #[test]
    fn nearest_interp_matches_numpy() {
        let src: Vec<f64> = (0..5).map(|i| i as f64).collect();
        // scale 4/8 = 0.5: round(0, .5, 1, 1.5, 2, 2.5, 3, 3.5, 4) half to even.
        assert_eq!(
            nearest_interp(&src, 9),
            [0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0]
        );
        assert_eq!(nearest_interp(&src, 1), [4.0]);
        assert_eq!(nearest_interp(&src, 3), [0.0, 2.0, 4.0]);
    }

    #[test]
    fn bad_options_are_refused() {
        let t = |s: &str| -> String {
            let table: toml::Table = toml::from_str(s).unwrap();
            format!("{:#}", MagCacheOptions::from_table(&table).unwrap_err())
        };
        assert!(t("threshold = -0.1\nmag_ratios = [1.0]").contains("threshold"));
        assert!(t("threshold = nan\nmag_ratios = [1.0]").contains("threshold"));
        assert!(t("retention_ratio = 1.5\nmag_ratios = [1.0]").contains("retention_ratio"));
        assert!(t("threshold = 0.1").contains("needs mag_ratios"));
        assert!(t("mag_ratios = []").contains("empty"));
        assert!(t("mag_ratios = [1.0, nan]").contains("mag_ratios[1]"));
        assert!(t("mag_ratios = [1.0, -2.0]").contains("mag_ratios[1]"));
        assert!(t("mag_ratios = [1.0]\nmag_ratios_uncond = [0.0]").contains("mag_ratios_uncond[0]"));
        assert!(t("mag_ratios = \"/nonexistent/r.json\"").contains("cannot read"));
        assert!(t("mag_ratios = [1.0]\nmax_skip_steps = -1").contains("max_skip_steps"));
        assert!(t("mag_ratios = [1.0]\nthreshhold = 0.1").contains("unknown field"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(
            &path,
            r#"{"format": "ditc-mag-ratios", "version": 1, "source": "", "steps": 3, "cond": [1.0, 0.9]}"#,
        )
        .unwrap();
        let e = t(&format!("mag_ratios = {:?}", path.to_str().unwrap()));
        assert!(e.contains("2 ratios for 3 steps"), "{e}");
    }

    #[test]
    fn ratio_files_give_each_branch_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(
            &path,
            r#"{"format": "ditc-mag-ratios", "version": 1, "source": "", "steps": 2, "cond": [1.0, 0.9], "uncond": [1.0, 0.8]}"#,
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let table: toml::Table = toml::from_str(&format!("mag_ratios = {p:?}")).unwrap();
        let o = MagCacheOptions::from_table(&table).unwrap();
        assert!(!o.per_branch());
        assert_eq!(
            o.ratios(Branch::Uncond).unwrap(),
            [1.0, 0.9],
            "cond drives both"
        );
        let table: toml::Table =
            toml::from_str(&format!("mag_ratios = {p:?}\nmag_ratios_uncond = {p:?}")).unwrap();
        let o = MagCacheOptions::from_table(&table).unwrap();
        assert!(o.per_branch());
        assert_eq!(o.ratios(Branch::Uncond).unwrap(), [1.0, 0.8]);
    }
}
