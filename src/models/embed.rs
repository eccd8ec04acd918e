//! Fixed position tables computed at build time, bit for bit the way diffusers computes them (float64
//! frequencies, float32 positions where torch uses float32), stored as float32 constants.

/// diffusers' `get_1d_sincos_pos_embed_from_grid(dim, pos)`: per position `[sin(pos w), cos(pos w)]`
/// with `w_i = 1 / 10000^(i / (dim/2))` in float64. Row-major `[positions, dim]`.
pub fn sincos_1d(dim: usize, positions: &[f64]) -> Vec<f64> {
    let half = dim / 2;
    let omega: Vec<f64> = (0..half)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (dim as f64 / 2.0)))
        .collect();
    let mut out = Vec::with_capacity(positions.len() * dim);
    for &p in positions {
        out.extend(omega.iter().map(|w| (p * w).sin()));
        out.extend(omega.iter().map(|w| (p * w).cos()));
    }
    out
}

/// diffusers' `get_2d_sincos_pos_embed(dim, (h, w), base_size, interpolation_scale)` for a `h x w`
/// patch grid, `[h*w, dim]`. Positions are float32 like torch's `arange(...) / (n / base) / scale`;
/// the first half of each row encodes the column, the second half the row (diffusers' meshgrid order).
pub fn sincos_2d(
    dim: usize,
    h: usize,
    w: usize,
    base_size: f64,
    interpolation_scale: f64,
) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let step = (n as f64 / base_size) as f32;
        (0..n)
            .map(|i| (i as f32 / step / interpolation_scale as f32) as f64)
            .collect()
    };
    sincos_2d_grid(dim, &axis(h), &axis(w))
}

/// 2-D sincos table `[rows*cols, dim]` for given row and column positions, row-major over the grid:
/// per token, `dim/2` column sinusoids then `dim/2` row sinusoids (diffusers' meshgrid order).
pub fn sincos_2d_grid(dim: usize, rows: &[f64], cols: &[f64]) -> Vec<f32> {
    let (h, w) = (rows.len(), cols.len());
    let mut col_pos = Vec::with_capacity(h * w);
    let mut row_pos = Vec::with_capacity(h * w);
    for r in rows {
        for c in cols {
            col_pos.push(*c);
            row_pos.push(*r);
        }
    }
    let first = sincos_1d(dim / 2, &col_pos);
    let second = sincos_1d(dim / 2, &row_pos);
    let half = dim / 2;
    let mut out = Vec::with_capacity(h * w * dim);
    for t in 0..h * w {
        out.extend(first[t * half..(t + 1) * half].iter().map(|&v| v as f32));
        out.extend(second[t * half..(t + 1) * half].iter().map(|&v| v as f32));
    }
    out
}

/// diffusers' `get_1d_rotary_pos_embed(dim, n, theta, use_real=True, repeat_interleave_real=True)` in
/// float64: `(cos, sin)`, each `[n, dim]` with every frequency repeated twice.
pub fn rope_1d(dim: usize, n: usize, theta: f64) -> (Vec<f64>, Vec<f64>) {
    let freqs: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(n * dim);
    let mut sin = Vec::with_capacity(n * dim);
    for p in 0..n {
        for f in &freqs {
            let a = p as f64 * f;
            cos.extend([a.cos(), a.cos()]);
            sin.extend([a.sin(), a.sin()]);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_1d_closed_form() {
        // dim 4: w = [1, 1/100]; position 2 -> [sin 2, sin 0.02, cos 2, cos 0.02].
        let e = sincos_1d(4, &[2.0]);
        let want = [2f64.sin(), 0.02f64.sin(), 2f64.cos(), 0.02f64.cos()];
        for (a, b) in e.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{e:?}");
        }
    }

    #[test]
    fn sincos_2d_puts_columns_first() {
        // 1 x 2 grid, base 2: token 1 sits in column 1 (position 1) and row 0.
        let e = sincos_2d(8, 1, 2, 2.0, 1.0);
        let col = sincos_1d(4, &[1.0]);
        let row = sincos_1d(4, &[0.0]);
        let want: Vec<f32> = col.iter().chain(&row).map(|&v| v as f32).collect();
        assert_eq!(&e[8..16], &want[..]);
    }

    #[test]
    fn rope_repeats_each_frequency() {
        let (cos, sin) = rope_1d(4, 2, 10000.0);
        // position 1: freqs [1, 1/100], each twice.
        let want_cos = [1f64.cos(), 1f64.cos(), 0.01f64.cos(), 0.01f64.cos()];
        assert_eq!(&cos[4..8], &want_cos);
        assert_eq!(sin[0], 0.0);
    }
}
