//! Samplers a bundle is driven with: DDIM (eta 0) and flow-matching Euler.
//!
//! Both follow diffusers' schedulers (`DDIMScheduler`, `FlowMatchEulerDiscreteScheduler` without dynamic
//! shifting) so a bundle reproduces a diffusers pipeline: the same timesteps, the same update. The
//! update runs in f64 on the f32 latent.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SamplerConfig {
    Ddim(DdimConfig),
    FlowEuler(FlowEulerConfig),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdimConfig {
    pub steps: usize,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: Spacing,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    #[serde(default = "default_prediction")]
    pub prediction_type: Prediction,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowEulerConfig {
    pub steps: usize,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// Timestep shift (Wan uses 5.0 at 720p, 3.0 at 480p); 1.0 is none.
    #[serde(default = "default_shift")]
    pub shift: f64,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_spacing() -> Spacing {
    Spacing::Leading
}
fn default_true() -> bool {
    true
}
fn default_prediction() -> Prediction {
    Prediction::Epsilon
}
fn default_shift() -> f64 {
    1.0
}

impl SamplerConfig {
    pub fn steps(&self) -> usize {
        match self {
            SamplerConfig::Ddim(c) => c.steps,
            SamplerConfig::FlowEuler(c) => c.steps,
        }
    }

    /// Check the options and build the per-step plan.
    pub fn plan(&self) -> Result<Sampler> {
        match self {
            SamplerConfig::Ddim(c) => ddim_plan(c),
            SamplerConfig::FlowEuler(c) => flow_plan(c),
        }
    }
}

/// A ready sampler: the timestep fed to the model at each step, and the update.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub timesteps: Vec<f64>,
    update: Update,
}

#[derive(Clone, Debug)]
enum Update {
    Ddim {
        alphas_cumprod: Vec<f64>,
        final_alpha: f64,
        step_ratio: i64,
        prediction: Prediction,
    },
    Flow {
        sigmas: Vec<f64>,
    },
}

impl Sampler {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Advance `x` from step `i` given the model's output at that step.
    pub fn step(&self, i: usize, x: &mut [f32], model_out: &[f32]) {
        match &self.update {
            Update::Ddim {
                alphas_cumprod,
                final_alpha,
                step_ratio,
                prediction,
            } => {
                let t = self.timesteps[i] as i64;
                let prev = t - step_ratio;
                let a = alphas_cumprod[t as usize];
                let a_prev = if prev >= 0 {
                    alphas_cumprod[prev as usize]
                } else {
                    *final_alpha
                };
                let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
                let (sa_prev, sb_prev) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
                for (xv, &m) in x.iter_mut().zip(model_out) {
                    let (s, m) = (*xv as f64, m as f64);
                    let (x0, eps) = match prediction {
                        Prediction::Epsilon => ((s - sb * m) / sa, m),
                        Prediction::VPrediction => (sa * s - sb * m, sa * m + sb * s),
                        Prediction::Sample => (m, (s - sa * m) / sb),
                    };
                    *xv = (sa_prev * x0 + sb_prev * eps) as f32;
                }
            }
            Update::Flow { sigmas } => {
                let dt = sigmas[i + 1] - sigmas[i];
                for (xv, &v) in x.iter_mut().zip(model_out) {
                    *xv = (*xv as f64 + dt * v as f64) as f32;
                }
            }
        }
    }
}

/// `alphas_cumprod` as torch computes it: f32 betas, f32 running product.
pub fn alphas_cumprod(c: &DdimConfig) -> Vec<f64> {
    let n = c.num_train_timesteps;
    let lin = |a: f64, b: f64| -> Vec<f64> {
        (0..n)
            .map(|i| {
                if n == 1 {
                    a
                } else {
                    a + (b - a) * i as f64 / (n - 1) as f64
                }
            })
            .collect()
    };
    let betas: Vec<f32> = match c.beta_schedule {
        BetaSchedule::Linear => lin(c.beta_start, c.beta_end)
            .iter()
            .map(|&b| b as f32)
            .collect(),
        BetaSchedule::ScaledLinear => lin(c.beta_start.sqrt(), c.beta_end.sqrt())
            .iter()
            .map(|&b| (b as f32) * (b as f32))
            .collect(),
    };
    let mut acc = 1f32;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc as f64
        })
        .collect()
}

fn ddim_plan(c: &DdimConfig) -> Result<Sampler> {
    let (n, steps) = (c.num_train_timesteps, c.steps);
    if steps == 0 || steps > n {
        bail!("sampler.steps = {steps}: DDIM needs 1..={n} steps (num_train_timesteps)");
    }
    let ordered = c.beta_start > 0.0 && c.beta_start < c.beta_end && c.beta_end < 1.0;
    if !ordered {
        bail!("sampler betas must satisfy 0 < beta_start < beta_end < 1");
    }
    let timesteps: Vec<f64> = match c.timestep_spacing {
        Spacing::Linspace => (0..steps)
            .rev()
            .map(|i| {
                if steps == 1 {
                    0.0
                } else {
                    (i as f64 * (n - 1) as f64 / (steps - 1) as f64).round()
                }
            })
            .collect(),
        Spacing::Leading => (0..steps)
            .rev()
            .map(|i| (i * (n / steps)) as f64 + c.steps_offset as f64)
            .collect(),
        Spacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            (0..steps)
                .map(|i| (n as f64 - i as f64 * ratio).round() - 1.0)
                .collect()
        }
    };
    if timesteps.iter().any(|&t| t < 0.0 || t >= n as f64) {
        bail!(
            "steps_offset {} puts timesteps outside 0..{n}",
            c.steps_offset
        );
    }
    let alphas = alphas_cumprod(c);
    let final_alpha = if c.set_alpha_to_one { 1.0 } else { alphas[0] };
    Ok(Sampler {
        timesteps,
        update: Update::Ddim {
            alphas_cumprod: alphas,
            final_alpha,
            step_ratio: (n / steps) as i64,
            prediction: c.prediction_type,
        },
    })
}

fn flow_plan(c: &FlowEulerConfig) -> Result<Sampler> {
    let (n, steps) = (c.num_train_timesteps as f64, c.steps);
    if steps == 0 {
        bail!("sampler.steps must be at least 1");
    }
    if c.shift.is_nan() || c.shift <= 0.0 {
        bail!("sampler.shift must be positive");
    }
    let shift = |s: f64| c.shift * s / (1.0 + (c.shift - 1.0) * s);
    // As diffusers: the training sigmas are shifted once, then the inference sigmas spaced between their
    // ends (in timestep units) are shifted again.
    let (sigma_max, sigma_min) = (shift(1.0), shift(1.0 / n));
    let mut sigmas: Vec<f64> = (0..steps)
        .map(|i| {
            let t = if steps == 1 {
                sigma_max * n
            } else {
                sigma_max * n + (sigma_min * n - sigma_max * n) * i as f64 / (steps - 1) as f64
            };
            shift(t / n)
        })
        .collect();
    let timesteps = sigmas.iter().map(|s| s * n).collect();
    sigmas.push(0.0);
    Ok(Sampler {
        timesteps,
        update: Update::Flow { sigmas },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ddim(steps: usize, spacing: Spacing) -> DdimConfig {
        toml::from_str::<DdimConfig>(&format!("steps = {steps}"))
            .map(|mut c| {
                c.timestep_spacing = spacing;
                c
            })
            .unwrap()
    }

    #[test]
    fn ddim_timestep_spacings_match_diffusers() {
        let t = |s| ddim_plan(&ddim(10, s)).unwrap().timesteps;
        assert_eq!(
            t(Spacing::Leading),
            vec![900., 800., 700., 600., 500., 400., 300., 200., 100., 0.]
        );
        assert_eq!(
            t(Spacing::Trailing),
            vec![999., 899., 799., 699., 599., 499., 399., 299., 199., 99.]
        );
        assert_eq!(
            t(Spacing::Linspace),
            vec![999., 888., 777., 666., 555., 444., 333., 222., 111., 0.]
        );
        assert!(ddim_plan(&ddim(0, Spacing::Leading)).is_err());
        assert!(ddim_plan(&ddim(1001, Spacing::Leading)).is_err());
    }

    #[test]
    fn ddim_with_the_true_noise_recovers_the_clean_sample() {
        // x_t = sqrt(a) x0 + sqrt(1-a) eps; a model that predicts eps exactly lands on x0 at the end
        // (set_alpha_to_one makes the last alpha 1).
        let c = ddim(25, Spacing::Trailing);
        let s = ddim_plan(&c).unwrap();
        let alphas = alphas_cumprod(&c);
        let (x0, eps) = (0.7f64, -1.3f64);
        let a = alphas[s.timesteps[0] as usize];
        let mut x = vec![(a.sqrt() * x0 + (1.0 - a).sqrt() * eps) as f32];
        for i in 0..s.steps() {
            s.step(i, &mut x, &[eps as f32]);
        }
        // The latent is f32 and the first step divides by sqrt(alpha_999) ~ 0.0064: ~2e-5 of rounding.
        assert!((x[0] as f64 - x0).abs() < 1e-4, "{}", x[0]);
    }

    #[test]
    fn flow_euler_is_exact_on_straight_paths() {
        // x_s = (1 - s) x0 + s noise has velocity noise - x0: Euler integrates it exactly.
        let c = FlowEulerConfig {
            steps: 7,
            num_train_timesteps: 1000,
            shift: 3.0,
        };
        let s = flow_plan(&c).unwrap();
        assert!((s.timesteps[0] - 1000.0).abs() < 1e-9, "starts at sigma 1");
        assert!(s.timesteps.windows(2).all(|w| w[0] > w[1]));
        let (x0, noise) = (0.25f32, 1.5f32);
        let mut x = vec![noise];
        for i in 0..s.steps() {
            s.step(i, &mut x, &[noise - x0]);
        }
        assert!((x[0] - x0).abs() < 1e-6);
        // shift 1: sigmas evenly spaced from 1 to 1/1000.
        let plain = flow_plan(&FlowEulerConfig {
            steps: 3,
            num_train_timesteps: 1000,
            shift: 1.0,
        })
        .unwrap();
        for (got, want) in plain.timesteps.iter().zip([1000.0, 500.5, 1.0]) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }
}
