//! Fitting TeaCache's rescaling polynomial (`ditc calibrate --fit-teacache OUT.toml`) from a drift
//! profile, as TeaCache does offline (ali-vilab/TeaCache#2: `np.polyfit(x, y, 4)` over every step of
//! every prompt): `x` the relative L1 change of the indicator between consecutive steps, `y` that of
//! the model's output, each pair one call (both guidance branches, every case, every step after the
//! first). The result is a preset in the format of `schedules/teacache/*.toml`.
//!
//! The least squares is numpy's: the Vandermonde matrix (highest power first) with each column scaled
//! to unit norm, solved by Householder QR in f64, the coefficients unscaled. A fit whose matrix is
//! rank-deficient (fewer distinct `x` than coefficients, or columns equal to rounding) is refused
//! rather than returning numbers that mean nothing.

use anyhow::{bail, Context, Result};

use super::profile::Profile;
use crate::schedule::tea_cache::poly;

/// A fitted polynomial and how well it fits.
#[derive(Clone, Debug)]
pub struct TeaCacheFit {
    /// The profile quantity used as indicator.
    pub indicator: String,
    pub use_ret_steps: bool,
    /// Highest degree first (`np.poly1d`).
    pub coefficients: Vec<f64>,
    pub points: usize,
    pub x_range: (f64, f64),
    /// 1 − residual sum of squares / total sum of squares.
    pub r_squared: f64,
}

/// Least-squares polynomial of `degree` through `(x, y)`, highest degree first.
pub fn polyfit(x: &[f64], y: &[f64], degree: usize) -> Result<Vec<f64>> {
    let n = x.len();
    let m = degree + 1;
    if y.len() != n {
        bail!("{} x values but {} y values", n, y.len());
    }
    if let Some(i) = (0..n).find(|&i| !x[i].is_finite() || !y[i].is_finite()) {
        bail!("point {i} ({}, {}) is not finite", x[i], y[i]);
    }
    let mut distinct: Vec<f64> = x.to_vec();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    if distinct.len() < m {
        bail!(
            "a degree-{degree} polynomial needs at least {m} distinct indicator values; the data has {}",
            distinct.len()
        );
    }
    // Columns x^degree .. x^0, each scaled to unit norm (numpy's polyfit does the same).
    let mut a: Vec<Vec<f64>> = (0..m)
        .map(|j| x.iter().map(|&v| v.powi((degree - j) as i32)).collect())
        .collect();
    let scale: Vec<f64> = a
        .iter()
        .map(|col| col.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    if scale.iter().any(|&s| s == 0.0 || !s.is_finite()) {
        bail!("the Vandermonde matrix has a zero or non-finite column: the indicator values are degenerate");
    }
    for (col, s) in a.iter_mut().zip(&scale) {
        col.iter_mut().for_each(|v| *v /= s);
    }
    let solution = least_squares_qr(a, y.to_vec())?;
    Ok(solution.iter().zip(&scale).map(|(c, s)| c / s).collect())
}

/// min ‖A c − b‖₂ for `a` given by columns (n x m, n ≥ m), by Householder QR.
fn least_squares_qr(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let m = a.len();
    let n = b.len();
    let mut diagonal = vec![0.0; m];
    for k in 0..m {
        let norm = a[k][k..].iter().map(|v| v * v).sum::<f64>().sqrt();
        let alpha = if a[k][k] > 0.0 { -norm } else { norm };
        // v = x - alpha e1; H = I - 2 v v^T / v^T v.
        let mut v: Vec<f64> = a[k][k..].to_vec();
        v[0] -= alpha;
        let vv: f64 = v.iter().map(|x| x * x).sum();
        diagonal[k] = alpha;
        if vv == 0.0 {
            continue;
        }
        for col in a.iter_mut().skip(k) {
            let dot: f64 = v.iter().zip(&col[k..]).map(|(p, q)| p * q).sum();
            let f = 2.0 * dot / vv;
            col[k..].iter_mut().zip(&v).for_each(|(c, p)| *c -= f * p);
        }
        let dot: f64 = v.iter().zip(&b[k..]).map(|(p, q)| p * q).sum();
        let f = 2.0 * dot / vv;
        b[k..].iter_mut().zip(&v).for_each(|(c, p)| *c -= f * p);
    }
    let largest = diagonal.iter().fold(0.0f64, |acc, d| acc.max(d.abs()));
    let tolerance = n as f64 * f64::EPSILON * largest;
    if let Some(k) = diagonal.iter().position(|d| d.abs() <= tolerance) {
        bail!("the least-squares problem is rank-deficient (column {k} depends on the others): the indicator values cannot determine this many coefficients");
    }
    let mut c = vec![0.0; m];
    for k in (0..m).rev() {
        let above: f64 = (k + 1..m).map(|j| a[j][k] * c[j]).sum();
        c[k] = (b[k] - above) / diagonal[k];
    }
    Ok(c)
}

/// The (indicator change, output change) pairs of every call of `profile` where both are known.
pub fn pairs(profile: &Profile, indicator: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    let names: Vec<&str> = profile.quantities.iter().map(|q| q.name.as_str()).collect();
    let ind = profile
        .quantity(indicator)
        .with_context(|| format!("the profile has no quantity '{indicator}' (it has {names:?})"))?;
    let out = profile
        .quantity("output")
        .context("the profile has no quantity 'output' (the model's prediction)")?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (branch, cases) in &ind.values {
        let Some(out_cases) = out.values.get(branch) else {
            continue;
        };
        for (a, b) in cases.iter().zip(out_cases) {
            for (xi, yi) in a.iter().zip(b) {
                if let (Some(xi), Some(yi)) = (xi, yi) {
                    x.push(*xi);
                    y.push(*yi);
                }
            }
        }
    }
    Ok((x, y))
}

/// Fit TeaCache's polynomial of `degree` with `indicator` (`timestep_modulation`: `use_ret_steps`).
pub fn fit_teacache(profile: &Profile, indicator: &str, degree: usize) -> Result<TeaCacheFit> {
    let (x, y) = pairs(profile, indicator)?;
    let coefficients = polyfit(&x, &y, degree).with_context(|| {
        format!(
            "fitting TeaCache's polynomial to {} pairs of ({indicator}, output) changes",
            x.len()
        )
    })?;
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let total: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    let residual: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (b - poly(&coefficients, *a)).powi(2))
        .sum();
    let lo = x.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(TeaCacheFit {
        indicator: indicator.to_string(),
        use_ret_steps: indicator == "timestep_modulation",
        coefficients,
        points: x.len(),
        x_range: (lo, hi),
        r_squared: if total > 0.0 {
            1.0 - residual / total
        } else {
            f64::NAN
        },
    })
}

/// The preset `broadcast-adaptive` (`policy = "tea-cache"`) reads, with TeaCache's default threshold.
pub fn preset_toml(fit: &TeaCacheFit, source: &str) -> String {
    let coefficients: Vec<String> = fit.coefficients.iter().map(|c| format!("{c:e}")).collect();
    format!(
        "# TeaCache preset fitted by ditc calibrate --fit-teacache (least squares of the output's relative L1\n\
         # change against the indicator's, as TeaCache fits its published coefficients), from: {source}\n\
         # indicator: {} ({} pairs, changes {:.4e} .. {:.4e}), R^2 {:.4}; highest degree first.\n\
         # The polynomial is fitted only over that range of changes: a model run outside it extrapolates.\n\
         policy = \"tea-cache\"\nthreshold = 0.2\nuse_ret_steps = {}\ncoefficients = [{}]\n",
        fit.indicator,
        fit.points,
        fit.x_range.0,
        fit.x_range.1,
        fit.r_squared,
        fit.use_ret_steps,
        coefficients.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
    }

    #[test]
    fn exact_data_recovers_the_polynomial() {
        // y = 2x^4 - 3x^3 + 0.5x^2 + 7x - 1.25 at 9 points: the fit is exact.
        let p = [2.0, -3.0, 0.5, 7.0, -1.25];
        let x: Vec<f64> = (0..9).map(|i| 0.05 + 0.1 * i as f64).collect();
        let y: Vec<f64> = x.iter().map(|&v| poly(&p, v)).collect();
        let c = polyfit(&x, &y, 4).unwrap();
        assert!(close(&c, &p, 1e-8), "{c:?}");
        // TeaCache's published Wan2.1-T2V-1.3B polynomial, over its indicator's range of changes.
        let p = [
            2.39676752e+03,
            -1.31110545e+03,
            2.01331979e+02,
            -8.29855975e+00,
            1.37887774e-01,
        ];
        let x: Vec<f64> = (0..49).map(|i| 0.002 + 0.004 * i as f64).collect();
        let y: Vec<f64> = x.iter().map(|&v| poly(&p, v)).collect();
        let c = polyfit(&x, &y, 4).unwrap();
        assert!(close(&c, &p, 1e-6), "{c:?}");
    }

    #[test]
    fn a_line_through_noisy_points_is_the_closed_form_regression() {
        // x = 0..3, y = 1, 3, 2, 5: slope = Sxy / Sxx = 5.5 / 5 = 1.1, intercept 2.75 - 1.1 * 1.5 = 1.1.
        let c = polyfit(&[0.0, 1.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 5.0], 1).unwrap();
        assert!(close(&c, &[1.1, 1.1], 1e-12), "{c:?}");
    }

    #[test]
    fn degenerate_data_is_refused() {
        let e = polyfit(&[0.1, 0.1, 0.1, 0.1, 0.1, 0.1], &[1.0; 6], 4).unwrap_err();
        assert!(e.to_string().contains("distinct"), "{e}");
        let e = polyfit(&[0.1, 0.2, 0.3], &[1.0, 2.0, 3.0], 4).unwrap_err();
        assert!(e.to_string().contains("5 distinct"), "{e}");
        assert!(polyfit(&[0.1, f64::NAN, 0.3], &[1.0, 2.0, 3.0], 1).is_err());
        assert!(polyfit(&[0.1, 0.2], &[1.0], 1).is_err());
        // Distinct only to rounding: 1 and 1 + 1e-15 give two equal columns.
        let e = polyfit(&[1.0, 1.0 + 1e-15, 1.0 + 2e-15], &[1.0, 2.0, 3.0], 2).unwrap_err();
        assert!(e.to_string().contains("rank-deficient"), "{e}");
    }

    #[test]
    fn the_preset_is_one_tea_cache_accepts() {
        let fit = TeaCacheFit {
            indicator: "timestep_embedding".into(),
            use_ret_steps: false,
            coefficients: vec![2396.76752, -1e-5, 0.137887774],
            points: 98,
            x_range: (0.01, 0.2),
            r_squared: 0.9,
        };
        let table: toml::Table = toml::from_str(&preset_toml(&fit, "test")).unwrap();
        assert_eq!(table["policy"].as_str(), Some("tea-cache"));
        let mut options = table.clone();
        options.remove("policy");
        let o = crate::schedule::tea_cache::TeaCacheOptions::from_table(&options).unwrap();
        assert_eq!(o.coefficients, fit.coefficients);
        assert!(!o.use_ret_steps);
    }
}
