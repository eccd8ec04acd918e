//! Samplers a bundle is driven with: DDIM (eta 0) and flow-matching Euler.
//!
//! Both follow diffusers' schedulers (`DDIMScheduler`, `FlowMatchEulerDiscreteScheduler` without dynamic
//! shifting) so a bundle reproduces a diffusers pipeline: the same timesteps, the same update. DDIM's
//! update runs in f64 on the f32 latent; the flow-matching schedule and update repeat diffusers'
//! float32 / float64 arithmetic operation by operation (see [`flow_schedule`]).

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
        sigmas: Vec<f32>,
    },
}

impl Sampler {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The flow-matching sigmas (one per step, then the final 0); `None` for DDIM.
    pub fn sigmas(&self) -> Option<&[f32]> {
        match &self.update {
            Update::Flow { sigmas } => Some(sigmas),
            Update::Ddim { .. } => None,
        }
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
                // diffusers: `sample + (sigma_next - sigma) * model_output` on f32 tensors: the
                // difference, the product and the sum each rounded to f32 (no fused multiply-add).
                let dt = sigmas[i + 1] - sigmas[i];
                for (xv, &v) in x.iter_mut().zip(model_out) {
                    *xv += dt * v;
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
    let FlowSchedule { timesteps, sigmas } = flow_schedule(c)?;
    Ok(Sampler {
        timesteps: timesteps.iter().map(|&t| t as f64).collect(),
        update: Update::Flow { sigmas },
    })
}

/// The flow-matching schedule: the timestep fed at each step and the sigmas (one more, the last 0).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

/// diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(steps)`,
/// rounding where it rounds. The shift is applied twice:
/// 1. construction (torch, float32): the training table `t / n` for `t = n, ..., 1`, shifted; only
///    its ends `sigma_max` (of t = n) and `sigma_min` (of t = 1) are used later;
/// 2. `set_timesteps` (numpy, float64): `linspace(sigma_max * n, sigma_min * n, steps) / n`, shifted
///    again, then cast to float32; the timesteps are those float32 sigmas times `n` in float32.
///
/// With shift 3, 1000 training steps and 50 steps the last timestep is 8.93 (a single shift would end
/// at 2.99).
pub fn flow_schedule(c: &FlowEulerConfig) -> Result<FlowSchedule> {
    let (n, steps, shift) = (c.num_train_timesteps, c.steps, c.shift);
    if steps == 0 {
        bail!("sampler.steps must be at least 1");
    }
    if !(shift.is_finite() && shift > 0.0) {
        bail!("sampler.shift must be positive");
    }
    if n == 0 || n > 1 << 24 {
        bail!("sampler.num_train_timesteps = {n}: must be 1..=16777216");
    }
    // torch: `shift * s / (1 + (shift - 1) * s)` on a float32 tensor; each Python float becomes f32
    // (`shift - 1` is taken in f64 first), every operation rounds to f32.
    let shift_f32 = |s: f32| (shift as f32 * s) / (1.0 + (shift - 1.0) as f32 * s);
    // The training timesteps are the integers n..=1 (exact in f32), divided by n in f32: n / n is 1.
    let sigma_max = shift_f32(1.0);
    let sigma_min = shift_f32(1.0 / n as f32);
    // numpy, f64: `shift * s / (1 + (shift - 1) * s)`.
    let shift_f64 = |s: f64| shift * s / (1.0 + (shift - 1.0) * s);
    let ends = (sigma_max as f64 * n as f64, sigma_min as f64 * n as f64);
    let mut sigmas: Vec<f32> = numpy_linspace(ends.0, ends.1, steps)
        .into_iter()
        .map(|t| shift_f64(t / n as f64) as f32)
        .collect();
    let timesteps = sigmas.iter().map(|&s| s * n as f32).collect();
    sigmas.push(0.0);
    Ok(FlowSchedule { timesteps, sigmas })
}

/// `numpy.linspace(start, stop, num)` in f64 as numpy computes it: `i * step + start` with
/// `step = (stop - start) / (num - 1)`, the last value set to `stop` exactly.
fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
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
        // x_s = (1 - s) x0 + s noise has velocity noise - x0: Euler integrates it exactly, up to the
        // f32 rounding of each update (7 steps, ulp(1.5) = 1.2e-7).
        let c = FlowEulerConfig {
            steps: 7,
            num_train_timesteps: 1000,
            shift: 3.0,
        };
        let s = flow_plan(&c).unwrap();
        assert_eq!(s.timesteps[0], 1000.0, "starts at sigma 1");
        assert!(s.timesteps.windows(2).all(|w| w[0] > w[1]));
        let (x0, noise) = (0.25f32, 1.5f32);
        let mut x = vec![noise];
        for i in 0..s.steps() {
            s.step(i, &mut x, &[noise - x0]);
        }
        assert!((x[0] - x0).abs() < 1e-6, "{}", x[0]);
        // shift 1: sigmas evenly spaced from 1 to 1/1000 (in f32).
        let plain = flow_plan(&FlowEulerConfig {
            steps: 3,
            num_train_timesteps: 1000,
            shift: 1.0,
        })
        .unwrap();
        for (got, want) in plain.timesteps.iter().zip([1000.0, 500.5, 1.0]) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(flow_plan(&FlowEulerConfig {
                shift: bad,
                ..c.clone()
            })
            .is_err());
        }
        assert!(flow_plan(&FlowEulerConfig { steps: 0, ..c }).is_err());
    }

    /// diffusers 0.42.1's values for shift 3, 1000 training steps, 50 steps (f32 bit patterns from a
    /// replication of its torch/numpy code, research spec section 12): the double shift ends at 8.93.
    #[test]
    fn flow_schedule_has_diffusers_bits() {
        let c = FlowEulerConfig {
            steps: 50,
            num_train_timesteps: 1000,
            shift: 3.0,
        };
        let s = flow_schedule(&c).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(s.sigmas.len(), 51);
        assert_eq!(s.timesteps.len(), 50);
        assert_eq!(bits(&s.sigmas[0..3]), [0x3f800000, 0x3f7e3d66, 0x3f7c6e3c]);
        assert_eq!(
            bits(&s.sigmas[47..50]),
            [0x3df6d9da, 0x3d8902f6, 0x3c124925]
        );
        assert_eq!(s.sigmas[50], 0.0);
        assert_eq!(
            bits(&s.timesteps[0..3]),
            [0x447a0000, 0x447847f6, 0x447683a7]
        );
        assert_eq!(
            bits(&s.timesteps[47..50]),
            [0x42f110bf, 0x4285cce4, 0x410edb6e]
        );
    }

    /// The update is torch's f32 `x + dt * v`: the product rounds to f32 before the sum. At step 0
    /// (dt = sigma_1 - 1 = -0.0068756342) with x = 1 and v = 1 + 109 ulp, that gives 0x3f7e3d64; one
    /// rounding of the exact value (f64 arithmetic) would give 0x3f7e3d65.
    #[test]
    fn flow_update_rounds_like_torch_f32() {
        let c = FlowEulerConfig {
            steps: 50,
            num_train_timesteps: 1000,
            shift: 3.0,
        };
        let s = flow_plan(&c).unwrap();
        let mut x = vec![1.0f32];
        s.step(0, &mut x, &[1.0 + 109.0 * f32::EPSILON]);
        assert_eq!(x[0].to_bits(), 0x3f7e3d64);
    }
}
