//! A tract operator for the large products of attention, used by the runtime only.
//!
//! Two patterns cost tract more in packing and memory traffic than in arithmetic:
//! - **RoPE score products.** Wan's rotary embedding rotates interleaved pairs, so queries and keys
//!   reach the score product as a `Concat` of two halves along the head dimension, and tract splits
//!   the product into one half-depth product per part and a sum (`scores.concat-einsum-k.*`):
//!   `S = A1·B1ᵀ + A2·B2ᵀ`. At Wan's shapes (4 heads, 512 tokens, 16 + 16 dims) each half writes a
//!   4 MB output over a depth of 16, then the sum reads both back.
//! - **Probabilities times values.** `P·V` with P `[heads, 512, 512]`: tract packs all of P (4 MB)
//!   into its kernel's panels before multiplying, a third of the product's time.
//!
//! [`TiledMatMul`] computes a tile of the output in registers for every part of the sum straight
//! from the operands as they lie (the right operand transposed once per batch when it is contiguous
//! along the depth, as keys are), and writes it once. It sums exactly as tract does, so the bits are
//! tract's: each part from 0, one fused multiply-add per step of the depth, in order, then the parts
//! added (tests/runtime_rewrites.rs compares with tract's own plan bit for bit).
//!
//! [`use_tiled_matmuls`] places it on tract's decluttered model, for run-time operands only (tract
//! packs constant weights once, at planning), where the CPU has AVX2 and FMA.

use tract_onnx::prelude::{tvec, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

use super::small_kernels::{for_each_batch, plain_product, Product, Stride};

/// Rows and columns of the output tile the vector kernel keeps in registers.
const TILE_ROWS: usize = 4;
const TILE_COLS: usize = 16;

/// Fewest outputs per batch a product must have to run here.
const LARGE_TILE: usize = 256 * 256;

/// `c[batch, m, n] = Σ_parts Σ_k a[batch, m, k] · b[batch, k, n]`, every part's operands of one
/// shape and layout: `a` contiguous along k, `c` along n, `b` along n or along k.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TiledMatMul {
    batch: Vec<Stride>,
    m: Stride,
    n: Stride,
    k: Stride,
    /// How many products are summed (1, or 2 for a split score product); inputs `a1, b1, a2, b2`.
    parts: usize,
    output: Vec<usize>,
}

impl Op for TiledMatMul {
    fn name(&self) -> StaticName {
        "TiledMatMul".into()
    }
    op_as_typed_op!();
}

impl EvalOp for TiledMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 2 * self.parts,
            "TiledMatMul takes two inputs per part"
        );
        let plain: Vec<_> = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<_>>()?;
        let slices: Vec<&[f32]> = plain
            .iter()
            .map(|t| t.as_slice::<f32>())
            .collect::<TractResult<_>>()?;
        // SAFETY: every output value is written below (each output's chain, or its copy) before
        // the tensor is read.
        let mut out = unsafe { TractTensor::uninitialized::<f32>(&self.output)? };
        {
            let mut c = out.try_as_plain_ram_mut()?;
            self.run(&slices, c.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for TiledMatMul {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output)))
    }
    as_op!();
}

/// One batch's operands: per part, `a` and `b` from the batch's first element.
type Operands<'a> = Vec<(&'a [f32], &'a [f32])>;

impl TiledMatMul {
    /// Every batch (see [`for_each_batch`]).
    fn run(&self, inputs: &[&[f32]], c: &mut [f32]) {
        let parts: Operands = inputs.chunks(2).map(|p| (p[0], p[1])).collect();
        for_each_batch(&self.batch, c, &|oa, ob, c| {
            let mut transposed: Vec<Vec<f32>> = vec![Vec::new(); parts.len()];
            let mut operands = Vec::with_capacity(parts.len());
            for ((a, b), bt) in parts.iter().zip(&mut transposed) {
                let b = &b[ob..];
                let (b, ldb) = if self.n.b == 1 {
                    (b, self.k.b)
                } else {
                    self.transpose_b(b, bt);
                    (&bt[..], self.n.extent)
                };
                operands.push(Part {
                    a: &a[oa..],
                    b,
                    ldb,
                });
            }
            // SAFETY: a `TiledMatMul` is only placed where the CPU has AVX2 and FMA.
            unsafe { one_batch(self, &operands, c) }
        });
    }

    /// `b[n, k]` (rows `n.b` apart, contiguous along k) as `bt[k, n]`, contiguous along n: the
    /// kernel reads one row of outputs' worth of `b` per step of k.
    fn transpose_b(&self, b: &[f32], bt: &mut Vec<f32>) {
        let (n, k) = (self.n.extent, self.k.extent);
        bt.clear();
        bt.resize(n * k, 0.0);
        for j in 0..n {
            let row = &b[j * self.n.b..j * self.n.b + k];
            for (l, &v) in row.iter().enumerate() {
                bt[l * n + j] = v;
            }
        }
    }
}

/// One part of one batch: `a` (rows `m.a` apart, contiguous along k) and `b` as `[k, n]`, rows
/// `ldb` apart, contiguous along n.
struct Part<'a> {
    a: &'a [f32],
    b: &'a [f32],
    ldb: usize,
}

/// One batch: full `TILE_ROWS x TILE_COLS` tiles in AVX registers, the ragged edges one output at
/// a time; every output the same chains of multiply-adds, one per part, then their sum.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn one_batch(op: &TiledMatMul, parts: &[Part], c: &mut [f32]) {
    let (m, n) = (op.m.extent, op.n.extent);
    let row_c = op.m.c;
    let full_rows = m / TILE_ROWS * TILE_ROWS;
    let full_cols = n / TILE_COLS * TILE_COLS;
    for i in (0..full_rows).step_by(TILE_ROWS) {
        for j in (0..full_cols).step_by(TILE_COLS) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA (the caller's contract); bounds are checked inside.
            unsafe {
                tile_avx2(op, parts, c, i, j)
            };
            #[cfg(not(target_arch = "x86_64"))]
            for r in i..i + TILE_ROWS {
                for col in j..j + TILE_COLS {
                    c[r * row_c + col] = one_output(op, parts, r, col);
                }
            }
        }
        for r in i..i + TILE_ROWS {
            for col in full_cols..n {
                c[r * row_c + col] = one_output(op, parts, r, col);
            }
        }
    }
    for r in full_rows..m {
        for col in 0..n {
            c[r * row_c + col] = one_output(op, parts, r, col);
        }
    }
}

/// One output, as the vector kernel sums it.
#[inline(always)]
fn one_output(op: &TiledMatMul, parts: &[Part], r: usize, col: usize) -> f32 {
    let chain = |p: &Part| {
        (0..op.k.extent).fold(0.0f32, |acc, l| {
            p.a[r * op.m.a + l].mul_add(p.b[l * p.ldb + col], acc)
        })
    };
    let mut sum = chain(&parts[0]);
    for p in &parts[1..] {
        sum += chain(p);
    }
    sum
}

/// One `TILE_ROWS x TILE_COLS` tile: each part's chains in eight registers, summed in part order
/// and stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(op: &TiledMatMul, parts: &[Part], c: &mut [f32], i: usize, j: usize) {
    use std::arch::x86_64::*;
    let (k, row_a, row_c) = (op.k.extent, op.m.a, op.m.c);
    // The tile's last reads and write, so that the unchecked ones below stay inside.
    assert!((i + TILE_ROWS - 1) * row_c + j + TILE_COLS <= c.len());
    let mut sum = [[_mm256_setzero_ps(); 2]; TILE_ROWS];
    for (index, p) in parts.iter().enumerate() {
        assert!((i + TILE_ROWS - 1) * row_a + k <= p.a.len());
        assert!((k - 1) * p.ldb + j + TILE_COLS <= p.b.len());
        // SAFETY: the tile's rows of `a` and columns of `b` are inside them (asserted above).
        let acc = unsafe {
            tile_chains(
                p.a.as_ptr().add(i * row_a),
                row_a,
                p.b.as_ptr().add(j),
                p.ldb,
                k,
            )
        };
        for r in 0..TILE_ROWS {
            for half in 0..2 {
                sum[r][half] = if index == 0 {
                    acc[r][half]
                } else {
                    _mm256_add_ps(sum[r][half], acc[r][half])
                };
            }
        }
    }
    // SAFETY: the tile is inside `c` (asserted above).
    unsafe {
        let out = c.as_mut_ptr().add(i * row_c + j);
        for (r, sum) in sum.iter().enumerate() {
            let row = out.add(r * row_c);
            _mm256_storeu_ps(row, sum[0]);
            _mm256_storeu_ps(row.add(8), sum[1]);
        }
    }
}

/// `acc[r] = Σ_l a[r * row_a + l] · b[l * ldb .. + 16]` for the tile's rows, one multiply-add per l.
///
/// # Safety
/// `a` must hold `TILE_ROWS` rows of `k` values `row_a` apart, `b` `k` rows of 16 values `ldb`
/// apart, and the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_chains(
    a: *const f32,
    row_a: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
) -> [[std::arch::x86_64::__m256; 2]; TILE_ROWS] {
    use std::arch::x86_64::*;
    // Eight named accumulators (not an array) so that they stay in registers. Pointers advance by
    // `wrapping_add` and are read through intrinsics, so that no check sits in the loop.
    let z = _mm256_setzero_ps();
    let (mut c00, mut c01, mut c10, mut c11) = (z, z, z, z);
    let (mut c20, mut c21, mut c30, mut c31) = (z, z, z, z);
    let (mut a0, mut pb) = (a, b);
    let (mut a1, mut a2, mut a3) = (
        a.wrapping_add(row_a),
        a.wrapping_add(2 * row_a),
        a.wrapping_add(3 * row_a),
    );
    for _ in 0..k {
        // SAFETY: inside the operands (the caller's contract).
        unsafe {
            let b0 = _mm256_loadu_ps(pb);
            let b1 = _mm256_loadu_ps(pb.wrapping_add(8));
            let x0 = _mm256_broadcastss_ps(_mm_load_ss(a0));
            let x1 = _mm256_broadcastss_ps(_mm_load_ss(a1));
            let x2 = _mm256_broadcastss_ps(_mm_load_ss(a2));
            let x3 = _mm256_broadcastss_ps(_mm_load_ss(a3));
            c00 = _mm256_fmadd_ps(x0, b0, c00);
            c01 = _mm256_fmadd_ps(x0, b1, c01);
            c10 = _mm256_fmadd_ps(x1, b0, c10);
            c11 = _mm256_fmadd_ps(x1, b1, c11);
            c20 = _mm256_fmadd_ps(x2, b0, c20);
            c21 = _mm256_fmadd_ps(x2, b1, c21);
            c30 = _mm256_fmadd_ps(x3, b0, c30);
            c31 = _mm256_fmadd_ps(x3, b1, c31);
        }
        (a0, a1, a2, a3) = (
            a0.wrapping_add(1),
            a1.wrapping_add(1),
            a2.wrapping_add(1),
            a3.wrapping_add(1),
        );
        pb = pb.wrapping_add(ldb);
    }
    [[c00, c01], [c10, c11], [c20, c21], [c30, c31]]
}

/// Whether this CPU has what [`TiledMatMul`]'s kernel needs.
fn avx2_fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Put [`TiledMatMul`] in a decluttered model (before tract lowers its einsums to its own
/// kernels): first where an `Add` sums two einsums it computes (one op with two parts), then on
/// the remaining einsums it computes.
pub fn use_tiled_matmuls(model: &mut TypedModel) -> TractResult<()> {
    if !avx2_fma_available() {
        return Ok(());
    }
    let adds: Vec<usize> = model
        .nodes
        .iter()
        .filter(|n| n.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()))
        .map(|n| n.id)
        .collect();
    for id in adds {
        let node = &model.nodes[id];
        let Some((op, inputs)) = two_parts_for(model, node)? else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &inputs)?;
        let wire = patch.wire_node(&node.name, op, &taps)?;
        patch.shunt_outside(model, node.id.into(), wire[0])?;
        patch.apply(model)?;
    }
    model.compact()?;
    let einsums: Vec<usize> = model
        .nodes
        .iter()
        .filter(|n| n.op_is::<EinSum>())
        .map(|n| n.id)
        .collect();
    for id in einsums {
        let node = &model.nodes[id];
        let Some(op) = plain_product(model, node)?.and_then(|p| tiled(p, 1)) else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The [`TiledMatMul`] computing `product` (with `parts` such products summed), if its layout and
/// size are what the kernel is for: `a` contiguous along k, `c` along n, `b` along either; at
/// least [`LARGE_TILE`] outputs per batch and a depth of at least 16.
fn tiled(product: Product, parts: usize) -> Option<TiledMatMul> {
    let Product {
        batch,
        m,
        n,
        k,
        output,
    } = product;
    let layout = k.a == 1 && n.c == 1 && (n.b == 1 || k.b == 1);
    // Below ~256x256 outputs per batch tract's packed kernels are as fast or faster (Latte's
    // 64x64 spatial attention: measured 1.5x slower here); above, packing dominates them.
    let size = m.extent * n.extent >= LARGE_TILE && k.extent >= 16;
    (layout && size).then_some(TiledMatMul {
        batch,
        m,
        n,
        k,
        parts,
        output,
    })
}

/// The two-part [`TiledMatMul`] computing `add` and its four operands, if both of the sum's inputs
/// are einsums of one shape and layout it takes, used only by the sum.
fn two_parts_for(
    model: &TypedModel,
    add: &TypedNode,
) -> TractResult<Option<(TiledMatMul, [OutletId; 4])>> {
    let parts: Vec<&TypedNode> = add.inputs.iter().map(|i| model.node(i.node)).collect();
    let [p1, p2] = parts.as_slice() else {
        return Ok(None);
    };
    let only_summed = |p: &TypedNode| {
        p.op_is::<EinSum>() && p.outputs.len() == 1 && p.outputs[0].successors.len() == 1
    };
    if !only_summed(p1) || !only_summed(p2) || p1.id == p2.id {
        return Ok(None);
    }
    if p1.op_as::<EinSum>() != p2.op_as::<EinSum>() {
        return Ok(None);
    }
    let shapes = |p: &TypedNode| -> TractResult<Vec<TVec<TDim>>> {
        p.inputs
            .iter()
            .map(|i| Ok(model.outlet_fact(*i)?.shape.to_tvec()))
            .collect()
    };
    if shapes(p1)? != shapes(p2)? || plain_product(model, p2)?.is_none() {
        return Ok(None);
    }
    let Some(op) = plain_product(model, p1)?.and_then(|p| tiled(p, 2)) else {
        return Ok(None);
    };
    if add.outputs[0].fact.shape.as_concrete() != Some(&op.output) {
        return Ok(None);
    }
    Ok(Some((
        op,
        [p1.inputs[0], p1.inputs[1], p2.inputs[0], p2.inputs[1]],
    )))
}
