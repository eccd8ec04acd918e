//! Fidelity metrics between an output and its reference.

use serde::Serialize;

/// How close `a` is to the reference `b` (same length).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Fidelity {
    pub max_abs: f64,
    /// max|a - b| / max|b|: the relative error the acceptance criteria use.
    pub max_rel: f64,
    /// |a - b|_2 / |b|_2
    pub rel_l2: f64,
    pub cosine: f64,
    /// 10 log10(peak^2 / MSE), peak = max|b|; infinite when identical (JSON: null, read back as
    /// infinite).
    #[serde(deserialize_with = "infinite_if_null")]
    pub psnr_db: f64,
}

/// JSON has no infinity: serde_json writes it as null.
fn infinite_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v: Option<f64> = serde::Deserialize::deserialize(d)?;
    Ok(v.unwrap_or(f64::INFINITY))
}

pub fn compare(a: &[f32], b: &[f32]) -> Fidelity {
    assert_eq!(a.len(), b.len(), "compare needs equal lengths");
    let (mut max_abs, mut peak, mut diff2, mut ref2, mut a2, mut dot) =
        (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        let d = x - y;
        // f64::max ignores NaN; a NaN anywhere must read as an infinite error.
        max_abs = if d.is_nan() {
            f64::INFINITY
        } else {
            max_abs.max(d.abs())
        };
        peak = peak.max(y.abs());
        diff2 += d * d;
        ref2 += y * y;
        a2 += x * x;
        dot += x * y;
    }
    let n = a.len().max(1) as f64;
    let mse = diff2 / n;
    let nan_guard = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    Fidelity {
        max_abs: nan_guard(max_abs),
        max_rel: if peak > 0.0 {
            nan_guard(max_abs / peak)
        } else if max_abs == 0.0 {
            0.0
        } else {
            f64::INFINITY
        },
        rel_l2: if ref2 > 0.0 {
            nan_guard((diff2 / ref2).sqrt())
        } else if diff2 == 0.0 {
            0.0
        } else {
            f64::INFINITY
        },
        cosine: if a2 > 0.0 && ref2 > 0.0 {
            dot / (a2.sqrt() * ref2.sqrt())
        } else if a2 == ref2 {
            1.0
        } else {
            0.0
        },
        psnr_db: if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (peak * peak / mse).log10()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_cases() {
        let f = compare(&[1.0, 2.0], &[1.0, 2.0]);
        assert_eq!((f.max_abs, f.rel_l2, f.psnr_db), (0.0, 0.0, f64::INFINITY));
        assert!((f.cosine - 1.0).abs() < 1e-12);
        // b = [3, 4] (|b| = 5, peak 4), a = b + [0, 1]: MSE 0.5, PSNR = 10 log10(16 / 0.5).
        let f = compare(&[3.0, 5.0], &[3.0, 4.0]);
        assert_eq!(f.max_abs, 1.0);
        assert!((f.max_rel - 0.25).abs() < 1e-12);
        assert!((f.rel_l2 - 0.2).abs() < 1e-12);
        assert!((f.psnr_db - 10.0 * 32f64.log10()).abs() < 1e-9);
        assert!((f.cosine - 29.0 / (34f64.sqrt() * 5.0)).abs() < 1e-12);
        assert!(compare(&[f32::NAN], &[1.0]).max_rel.is_infinite());
    }
}
