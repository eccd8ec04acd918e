//! TaylorSeer forecasting (`forecast = "taylor"`, `order` 1 or 2): on a skipped step, the cached
//! residual is extrapolated from the last computed ones instead of reused as it is (cache-dit's
//! TaylorSeer calibrator, research spec §11.5; diffusers' `taylorseer_cache.py` forecasts the same
//! way, spec §6).
//!
//! cache-dit's calibrator, per branch, with its step `c` = the sampler's step − 1:
//!
//! ```text
//! update(Y) on a computed step:  prev = F; w = c - last; F = [Y, ...];
//!     for i < order: if prev[i] exists and c > 1: F[i+1] = (F[i] - prev[i]) / w  else stop
//!     last = c
//! forecast on a skipped step:     e = c - last;  Y ≈ Σ_i F[i] e^i / i!   (up to the first missing F)
//! ```
//!
//! With a static table the steps of every update are known at conversion, so each forecast is a
//! fixed linear combination of the last `order + 1` computed residuals: [`coefficients`] gives, per
//! step, the weights of the newest, the previous, ... residual (the graph keeps those residuals as
//! state and applies the weights it gathers at the step). A residual that is exactly linear in the
//! step is forecast exactly by order 1 (once two updates exist). A quadratic one is not forecast
//! exactly by order 2: cache-dit's differences are backward differences used as Taylor derivatives
//! (`e^i / i!`), which hold only in the limit of small spacing; order 2 is closer than order 1 (the
//! tests work one case out by hand).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// `forecast` and `order`, options of every `broadcast-adaptive` policy that bakes a table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Taylor {
    pub order: usize,
}

impl Taylor {
    /// Take `forecast` and `order` out of a policy's options: None without `forecast`.
    pub fn take_from(options: &mut toml::Table) -> Result<Option<Taylor>> {
        let order = options.remove("order");
        let Some(forecast) = options.remove("forecast") else {
            if order.is_some() {
                bail!("broadcast-adaptive.order is the order of a forecast: give forecast = \"taylor\" with it");
            }
            return Ok(None);
        };
        match forecast.as_str() {
            Some("taylor") => {}
            _ => bail!("broadcast-adaptive.forecast must be \"taylor\" (the only forecast there is), got {forecast}"),
        }
        let order = match order {
            None => 1,
            Some(toml::Value::Integer(n @ 1..=2)) => n as usize,
            Some(other) => bail!("broadcast-adaptive.order must be 1 or 2, got {other}"),
        };
        Ok(Some(Taylor { order }))
    }
}

/// Per step, the weights of the last `order + 1` computed residuals (newest first) whose sum
/// forecasts the residual at that step, for a branch that computes where `compute` is true. Computed
/// steps get no weights (all zero): the graph computes there. A skipped step before any second
/// update has only the newest residual: weight 1 on it, plain reuse.
pub fn coefficients(compute: &[bool], taylor: Taylor) -> Vec<Vec<f64>> {
    let width = taylor.order + 1;
    // Factors as weights over the stored residuals, newest first.
    let mut factors: Vec<Option<Vec<f64>>> = vec![None; width];
    let mut last: Option<i64> = None;
    let mut out = Vec::with_capacity(compute.len());
    for (s, &computes) in compute.iter().enumerate() {
        let c = s as i64 - 1;
        if computes {
            // The stored residuals shift by one: an old factor's weights move one place older.
            let prev: Vec<Option<Vec<f64>>> = factors
                .iter()
                .map(|f| {
                    f.as_ref().map(|w| {
                        let mut shifted = vec![0.0; width];
                        shifted[1..].copy_from_slice(&w[..width - 1]);
                        shifted
                    })
                })
                .collect();
            let mut fresh: Vec<Option<Vec<f64>>> = vec![None; width];
            let mut newest = vec![0.0; width];
            newest[0] = 1.0;
            fresh[0] = Some(newest);
            let spacing = last.map(|l| (c - l) as f64);
            for i in 0..taylor.order {
                match (&prev[i], &fresh[i], spacing) {
                    (Some(p), Some(f), Some(w)) if c > 1 => {
                        fresh[i + 1] = Some(f.iter().zip(p).map(|(a, b)| (a - b) / w).collect());
                    }
                    _ => break,
                }
            }
            factors = fresh;
            last = Some(c);
            out.push(vec![0.0; width]);
        } else {
            let e = last.map_or(0, |l| c - l) as f64;
            let mut weights = vec![0.0; width];
            let mut term = 1.0; // e^i / i!
            for (i, f) in factors.iter().enumerate() {
                let Some(f) = f else { break };
                if i > 0 {
                    term *= e / i as f64;
                }
                for (w, x) in weights.iter_mut().zip(f) {
                    *w += term * x;
                }
            }
            out.push(weights);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forecast of `r(s)` at every skipped step from the residuals of the computed ones.
    fn forecasts(compute: &[bool], order: usize, r: impl Fn(f64) -> f64) -> Vec<(usize, f64, f64)> {
        let coef = coefficients(compute, Taylor { order });
        let mut history: Vec<f64> = Vec::new(); // newest first
        let mut out = Vec::new();
        for (s, &computes) in compute.iter().enumerate() {
            if computes {
                history.insert(0, r(s as f64));
                history.truncate(order + 1);
            } else {
                let got: f64 = coef[s].iter().zip(&history).map(|(w, x)| w * x).sum();
                out.push((s, got, r(s as f64)));
            }
        }
        out
    }

    #[test]
    fn order_one_forecasts_a_linear_residual_exactly() {
        // Computes at 0, 1, 2, 4, 6, 9 (uneven spacing): from the second update at step >= 3 on,
        // every skipped step is forecast exactly.
        // Step 3 comes before the second update with a derivative (cache-dit's `c > 1`): reuse.
        let compute = [
            true, true, true, false, true, false, true, false, false, true, false,
        ];
        for (s, got, want) in forecasts(&compute, 1, |s| 3.0 - 0.5 * s) {
            if s > 4 {
                assert!((got - want).abs() < 1e-12, "step {s}: {got} vs {want}");
            } else {
                assert_eq!(
                    got,
                    3.0 - 0.5 * 2.0,
                    "step {s}: the step-2 residual, reused"
                );
            }
        }
    }

    #[test]
    fn order_two_on_a_quadratic_is_cache_dits_formula() {
        // r = a + b s + c s^2, computed at 0, 1, 2, 4, 6, 8 (spacing 2 from step 2 on). At step 7:
        // F1 = (r6 - r4) / 2 = b + 10c, F1_prev = (r4 - r2) / 2 = b + 6c, F2 = (F1 - F1_prev) / 2 = 2c,
        // e = 1: order 2 gives r6 + F1 + F2 / 2 = a + 7b + 47c, order 1 r6 + F1 = a + 7b + 46c; the
        // truth is a + 7b + 49c.
        let (a, b, c) = (1.0, 0.25, -0.125);
        let compute = [true, true, true, false, true, false, true, false, true];
        let r = |s: f64| a + b * s + c * s * s;
        let at7 = |order| {
            forecasts(&compute, order, r)
                .into_iter()
                .find(|(s, _, _)| *s == 7)
                .unwrap()
                .1
        };
        assert!(
            (at7(2) - (a + 7.0 * b + 47.0 * c)).abs() < 1e-12,
            "{}",
            at7(2)
        );
        assert!(
            (at7(1) - (a + 7.0 * b + 46.0 * c)).abs() < 1e-12,
            "{}",
            at7(1)
        );
        assert!((at7(2) - r(7.0)).abs() < (at7(1) - r(7.0)).abs());
    }

    #[test]
    fn before_two_updates_it_is_plain_reuse() {
        let coef = coefficients(&[true, false, false], Taylor { order: 1 });
        assert_eq!(coef[1], vec![1.0, 0.0]);
        assert_eq!(coef[2], vec![1.0, 0.0]);
    }

    #[test]
    fn options_are_checked() {
        let take = |s: &str| Taylor::take_from(&mut toml::from_str(s).unwrap());
        assert_eq!(take("").unwrap(), None);
        assert_eq!(
            take("forecast = \"taylor\"").unwrap(),
            Some(Taylor { order: 1 })
        );
        assert_eq!(
            take("forecast = \"taylor\"\norder = 2").unwrap(),
            Some(Taylor { order: 2 })
        );
        assert!(take("forecast = \"taylor\"\norder = 3").is_err());
        assert!(take("order = 2").is_err());
        assert!(take("forecast = \"linear\"").is_err());
    }
}
