//! TeaCache (TeaCache4Wan2.1, `teacache_generate.py::teacache_forward`; research spec §4): skip the
//! whole block stack while the accumulated, polynomially rescaled change of the timestep embedding
//! stays below a threshold, reusing the stack's last residual.
//!
//! The indicator is the timestep embedding `e = time_embedder(sinusoid(t))` (`use_ret_steps`: the
//! modulation `e0 = time_proj(silu(e))`). It depends on the timestep alone, so the decisions are a
//! static table, computed here at conversion and baked as MagCache's are (the same whole-stack `If`,
//! [`crate::passes::broadcast_adaptive`]), and both guidance branches decide alike. Per branch, with
//! `n` the branch's call index (its step):
//!
//! ```text
//! if n < ret or n >= cutoff:  compute; acc = 0
//! else: rel = mean|m - prev| / mean|prev|;  acc += poly(rel)   (Horner, f64, highest degree first)
//!       if acc < threshold: reuse  else: compute; acc = 0
//! prev = m                                                       (every call)
//! ```
//!
//! TeaCache counts calls over both branches (`cnt` to `2 * steps`, even calls conditional): its
//! `ret_steps = 2` / `cutoff = 2 * steps - 2` are the first and the last step of each branch, and with
//! `use_ret_steps` (`ret_steps = 10`, `cutoff = 2 * steps`) the first five steps; here they are said
//! per branch (`ret` = 1 or 5 steps, `cutoff` = `steps - 1` or `steps`), which is the same thing and
//! also holds without guidance.
//!
//! Deliberate differences: the embedding is computed in f64 from the checkpoint's weights (Wan's
//! `condition_embedder.time_embedder` and `time_proj`), diffusers' sinusoid (`flip_sin_to_cos`,
//! shift 0) included, and the means in f64, where TeaCache runs them in f32 on the GPU; a decision
//! could differ only where the accumulated value lies within float rounding of the threshold.
//! Coefficients must be given (`coefficients`, or a preset of `schedules/teacache/`): the published
//! ones are per model; `ditc calibrate --fit-teacache` fits them for another model
//! ([`crate::calibration::teacache_fit`]).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::mag_cache::Decisions;
use crate::ir::Model;

pub const POLICY: &str = "tea-cache";

/// Options of `broadcast-adaptive` with `policy = "tea-cache"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeaCacheOptions {
    /// The accumulated rescaled change below which the stack is reused (TeaCache's `thresh`).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// The rescaling polynomial, highest degree first (`np.poly1d`), as published per model.
    pub coefficients: Vec<f64>,
    /// TeaCache's `use_ret_steps`: the modulation `e0` as indicator and the first five steps computed
    /// (otherwise the embedding `e`, and the first and last steps computed).
    #[serde(default)]
    pub use_ret_steps: bool,
}

fn default_threshold() -> f64 {
    0.2
}

impl TeaCacheOptions {
    pub fn from_table(options: &toml::Table) -> Result<TeaCacheOptions> {
        let o: TeaCacheOptions = toml::Value::Table(options.clone())
            .try_into()
            .context("broadcast-adaptive (tea-cache) options")?;
        if !o.threshold.is_finite() || o.threshold < 0.0 {
            bail!(
                "broadcast-adaptive.threshold must be finite and >= 0, got {}",
                o.threshold
            );
        }
        if o.coefficients.is_empty() || o.coefficients.iter().any(|c| !c.is_finite()) {
            bail!("broadcast-adaptive.coefficients must be a non-empty list of finite numbers (TeaCache's published polynomial for the model, highest degree first: see schedules/teacache/)");
        }
        Ok(o)
    }

    /// Steps of each branch below this always compute.
    fn ret(&self) -> usize {
        if self.use_ret_steps {
            5
        } else {
            1
        }
    }

    /// Steps of each branch from this on always compute.
    fn cutoff(&self, steps: usize) -> usize {
        if self.use_ret_steps {
            steps
        } else {
            steps.saturating_sub(1)
        }
    }
}

/// `np.poly1d(c)(x)`: Horner's rule, highest degree first, in f64.
pub fn poly(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, &c| acc * x + c)
}

/// `mean|m - prev| / mean|prev|` (f64).
pub fn relative_l1(m: &[f32], prev: &[f32]) -> f64 {
    let diff: f64 = m
        .iter()
        .zip(prev)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum();
    let base: f64 = prev.iter().map(|b| (*b as f64).abs()).sum();
    diff / base
}

/// One branch's decisions from its indicator at every step; `metric` is the accumulated value each
/// decision compared (none on the steps that always compute).
pub fn decisions(o: &TeaCacheOptions, indicators: &[Vec<f32>]) -> Decisions {
    let steps = indicators.len();
    let (mut compute, mut metric) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    let mut acc = 0.0f64;
    for (n, m) in indicators.iter().enumerate() {
        if n < o.ret() || n >= o.cutoff(steps) {
            compute.push(true);
            metric.push(None);
            acc = 0.0;
        } else {
            acc += poly(&o.coefficients, relative_l1(m, &indicators[n - 1]));
            metric.push(Some(acc));
            let computes = acc >= o.threshold || acc.is_nan();
            if computes {
                acc = 0.0;
            }
            compute.push(computes);
        }
    }
    Decisions { compute, metric }
}

/// Wan's timestep embedding at each of `timesteps`, computed in f64 from the checkpoint weights in
/// `model` (`condition_embedder.time_embedder.linear_{1,2}`, and `condition_embedder.time_proj` for
/// `use_ret_steps`): diffusers' `Timesteps(freq_dim, flip_sin_to_cos=True, shift=0)`, Linear, SiLU,
/// Linear (then SiLU, Linear).
pub fn wan_indicators(
    model: &Model,
    timesteps: &[f64],
    use_ret_steps: bool,
) -> Result<Vec<Vec<f32>>> {
    let linear = |name: &str| -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        let w = model.graph.initializer(&format!("{name}.weight")).with_context(|| {
            format!("tea-cache reads Wan's timestep embedder ('{name}.weight'), which this graph does not have: it needs a WanTransformer3DModel graph built by ditc from its diffusers checkpoint")
        })?;
        let b = model
            .graph
            .initializer(&format!("{name}.bias"))
            .with_context(|| format!("tea-cache: no '{name}.bias' in the graph"))?;
        let (w_values, b_values) = (
            w.to_f32_vec()
                .with_context(|| format!("'{name}.weight' is not a float tensor"))?,
            b.to_f32_vec()
                .with_context(|| format!("'{name}.bias' is not a float tensor"))?,
        );
        let [out, inp] = w.dims[..] else {
            bail!("'{name}.weight' is not a matrix: {:?}", w.dims);
        };
        if b_values.len() != out as usize {
            bail!(
                "'{name}.bias' has {} values for {out} outputs",
                b_values.len()
            );
        }
        Ok((w_values, b_values, out as usize, inp as usize))
    };
    let l1 = linear("condition_embedder.time_embedder.linear_1")?;
    let l2 = linear("condition_embedder.time_embedder.linear_2")?;
    let proj = if use_ret_steps {
        Some(linear("condition_embedder.time_proj")?)
    } else {
        None
    };
    let apply =
        |(w, b, out, inp): &(Vec<f32>, Vec<f32>, usize, usize), x: &[f64]| -> Result<Vec<f64>> {
            if x.len() != *inp {
                bail!(
                    "tea-cache: a linear layer of the timestep embedder takes {inp} values, got {}",
                    x.len()
                );
            }
            Ok((0..*out)
                .map(|o| {
                    let row = &w[o * inp..(o + 1) * inp];
                    row.iter().zip(x).map(|(w, x)| *w as f64 * x).sum::<f64>() + b[o] as f64
                })
                .collect())
        };
    let silu =
        |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x / (1.0 + (-x).exp())).collect() };
    timesteps
        .iter()
        .map(|&t| {
            let e = apply(&l2, &silu(apply(&l1, &sinusoid(t, l1.3))?))?;
            let m = match &proj {
                Some(p) => apply(p, &silu(e))?,
                None => e,
            };
            Ok(m.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// `[cos(t w_i), sin(t w_i)]` with `w_i = exp(-ln(10000) i / (dim / 2))`.
fn sinusoid(t: f64, dim: usize) -> Vec<f64> {
    let half = dim / 2;
    let w = |i: usize| (-(10000f64.ln()) * i as f64 / half as f64).exp();
    let mut out: Vec<f64> = (0..half).map(|i| (t * w(i)).cos()).collect();
    out.extend((0..half).map(|i| (t * w(i)).sin()));
    out.resize(dim, 0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_is_numpy_poly1d() {
        // 2x^2 - 3x + 1 at 0.5 = 0.
        assert_eq!(poly(&[2.0, -3.0, 1.0], 0.5), 0.0);
        assert_eq!(poly(&[1.0, 0.0], 0.25), 0.25);
    }

    #[test]
    fn bad_options_are_refused() {
        let t = |s: &str| TeaCacheOptions::from_table(&toml::from_str(s).unwrap());
        assert!(t("threshold = 0.2").is_err(), "coefficients are required");
        assert!(t("coefficients = []").is_err());
        assert!(t("coefficients = [1.0]\nthreshold = -1.0").is_err());
        assert!(
            t("coefficients = [1.0]\nthresh = 0.2").is_err(),
            "unknown key"
        );
        assert!(t("coefficients = [1.0, 0.0]").is_ok());
    }
}
