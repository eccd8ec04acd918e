//! A tract operator for products tract's general kernels handle poorly, used by the runtime only.
//!
//! Small video DiTs attend over short axes: Latte's temporal attention is 8 frames long per token
//! (256 batches of 8x16 by 16x8 products), its cross-attention 4 caption tokens long. tract's
//! matrix-product kernels pack both operands of every batch into 16x12 tiles (mostly padding at
//! 8x8), so these tiny products and their packing took a fifth of a latte-tiny call.
//! [`SmallMatMul`] computes a batched product of small tiles (at most [`SMALL_TILE`] outputs and a
//! depth of [`SMALL_DEPTH`] per batch) straight from the inputs as they lie in memory (where one of
//! two layouts applies), no packing, and sums every output exactly as tract's kernels do (from 0,
//! one fused multiply-add per step of k, in order), so the results are bit for bit tract's.
//!
//! [`use_small_matmuls`] places it on tract's typed model; the emitted ONNX is untouched.
//!
//! Tried and left out: a softmax for short rows (tract's costs ~0.1 µs per row: rows of 4 and 8
//! run at 10-25 ns per value) with the standard library's `exp` was 5x faster there, but its
//! results differ from tract's polynomial `exp` by a few ulps, and that moved the INT8 + PAB latte
//! trajectory of tests/quantize.rs from cosine 0.99607 to 0.99573 (its bound is 0.995): the
//! quantized trajectories amplify rounding, so the runtime keeps tract's bits.

use tract_onnx::prelude::{tvec, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// Largest output tile (rows x columns per batch) [`SmallMatMul`] takes.
const SMALL_TILE: usize = 256;
/// Longest contracted axis [`SmallMatMul`] takes.
const SMALL_DEPTH: usize = 32;

/// One axis of a product: its extent and its stride (in elements) in `a`, `b` and the output
/// (0 where the tensor does not have it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Stride {
    pub extent: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

/// `c[batch, m, n] = Σ_k a[batch, m, k] · b[batch, k, n]` for any layout of the axes, one `m`, `n`
/// and `k` axis and any number of batch axes (no broadcasting).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SmallMatMul {
    batch: Vec<Stride>,
    m: Stride,
    n: Stride,
    k: Stride,
    output: Vec<usize>,
    /// Whether [`vector::one_batch_avx2`] computes it (decided once, at placement).
    vector: bool,
}

impl Op for SmallMatMul {
    fn name(&self) -> StaticName {
        "SmallMatMul".into()
    }
    op_as_typed_op!();
}

impl EvalOp for SmallMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "SmallMatMul takes two inputs");
        let a = inputs[0].try_as_plain_ram()?;
        let b = inputs[1].try_as_plain_ram()?;
        let (a, b) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
        // The vector kernel writes every output; the scalar one accumulates into zeros.
        let mut out = if self.vector {
            // SAFETY: `one_batch_avx2` writes every output value before the tensor is read.
            unsafe { TractTensor::uninitialized::<f32>(&self.output)? }
        } else {
            TractTensor::zero::<f32>(&self.output)?
        };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let c = plain.as_slice_mut::<f32>()?;
            self.run(a, b, c);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl SmallMatMul {
    fn run(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        for_each_batch(&self.batch, c, &|oa, ob, c| {
            self.one_batch(&a[oa..], &b[ob..], c)
        });
    }

    fn one_batch(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.vector {
            // SAFETY: `vector_rows` checked the CPU and the layout `one_batch_avx2` needs (at placement).
            unsafe { vector::one_batch_avx2(self, a, b, c) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `SmallMatMul` is only placed where the CPU has FMA (`fma_available`).
        unsafe {
            one_batch_fma(self, a, b, c)
        }
        #[cfg(not(target_arch = "x86_64"))]
        one_batch_fma(self, a, b, c)
    }
}

/// Whether [`vector::one_batch_avx2`] computes a product of these axes: rows of 4, 8 or 16 outputs
/// contiguous in `c`, `b` contiguous along n or along k, on a CPU with AVX2 and FMA.
fn vector_rows(n: &Stride, k: &Stride) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let layout = n.c == 1 && (n.b == 1 || k.b == 1);
        layout
            && matches!(n.extent, 4 | 8 | 16)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Call `one(a_offset, b_offset, c)` for every batch of a product over `batch` axes, `c` starting at
/// the batch's first output; split over the runtime's threads along the output's outermost axis
/// when that is a batch axis (its slices of the output are then contiguous and disjoint). Each
/// output is computed by one call whatever the split, so the thread count changes no bits.
pub(super) fn for_each_batch(
    batch: &[Stride],
    c: &mut [f32],
    one: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    use rayon::prelude::*;
    let outer = batch
        .iter()
        .position(|s| s.c * s.extent == c.len() && s.extent > 1);
    match outer {
        Some(axis) if super::tract::split_over_threads() => {
            let s = batch[axis];
            let rest: Vec<Stride> = [&batch[..axis], &batch[axis + 1..]].concat();
            c.par_chunks_mut(s.c).enumerate().for_each(|(i, c)| {
                each_batch(&rest, c, &|oa, ob, c| one(i * s.a + oa, i * s.b + ob, c));
            });
        }
        _ => each_batch(batch, c, one),
    }
}

/// [`for_each_batch`] on the calling thread.
fn each_batch(batch: &[Stride], c: &mut [f32], one: &dyn Fn(usize, usize, &mut [f32])) {
    let count: usize = batch.iter().map(|s| s.extent).product();
    for index in 0..count {
        let (mut oa, mut ob, mut oc, mut rest) = (0, 0, 0, index);
        for s in batch.iter().rev() {
            let i = rest % s.extent;
            rest /= s.extent;
            (oa, ob, oc) = (oa + i * s.a, ob + i * s.b, oc + i * s.c);
        }
        one(oa, ob, &mut c[oc..]);
    }
}

/// Whether this CPU has fused multiply-add, which tract's kernels use and these must too to give
/// the same bits.
pub(super) fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("fma");
    #[cfg(target_arch = "aarch64")]
    return true;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return false;
}

/// One batch's tile, every output summed as tract's kernels sum it: from 0, one fused
/// multiply-add per step of k, in k's order. So the bits are tract's; only the loops around differ.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
fn one_batch_fma(op: &SmallMatMul, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (m, n, k) = (op.m, op.n, op.k);
    if n.b == 1 && n.c == 1 {
        // Rows of b and c are contiguous: c[i, :] += a[i, l] * b[l, :], vectorised over the row.
        for i in 0..m.extent {
            let row = &mut c[i * m.c..i * m.c + n.extent];
            for l in 0..k.extent {
                let x = a[i * m.a + l * k.a];
                let from = &b[l * k.b..l * k.b + n.extent];
                row.iter_mut()
                    .zip(from)
                    .for_each(|(r, &y)| *r = x.mul_add(y, *r));
            }
        }
    } else {
        // Both operands contiguous along k (the only other layout taken): eight outputs of a row
        // at a time, each its own chain of multiply-adds.
        const LANES: usize = 8;
        for i in 0..m.extent {
            let x = &a[i * m.a..i * m.a + k.extent];
            let mut j = 0;
            while j < n.extent {
                let width = LANES.min(n.extent - j);
                let mut acc = [0.0f32; LANES];
                for (l, &xl) in x.iter().enumerate() {
                    for (lane, slot) in acc.iter_mut().enumerate().take(width) {
                        *slot = xl.mul_add(b[(j + lane) * n.b + l], *slot);
                    }
                }
                for (lane, value) in acc.iter().enumerate().take(width) {
                    c[i * m.c + (j + lane) * n.c] = *value;
                }
                j += width;
            }
        }
    }
}

/// The AVX2 rows kernel: every output's chain of multiply-adds in a vector lane (the same chain, so
/// the same bits as [`one_batch_fma`]), four rows at a time so that the chains of several rows are
/// in flight together.
#[cfg(target_arch = "x86_64")]
mod vector {
    use super::{SmallMatMul, SMALL_DEPTH};
    use std::arch::x86_64::*;

    /// The widest row [`one_batch_avx2`] takes.
    const MAX_ROW: usize = 16;

    /// # Safety
    /// The CPU must have AVX2 and FMA, and `op` the layout [`vector_rows`] checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn one_batch_avx2(op: &SmallMatMul, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (op.m, op.n, op.k);
        // `b` as [k, n], contiguous along n: as it lies, or transposed into `bt`.
        let mut bt;
        let (b, ldb) = if n.b == 1 {
            (b, k.b)
        } else {
            bt = [0f32; SMALL_DEPTH * MAX_ROW];
            for j in 0..n.extent {
                for l in 0..k.extent {
                    bt[l * n.extent + j] = b[j * n.b + l * k.b];
                }
            }
            (&bt[..], n.extent)
        };
        // The last element each operand is read at, so that the unchecked reads stay inside.
        let last_a = (m.extent - 1) * m.a + (k.extent - 1) * k.a;
        let last_b = (k.extent - 1) * ldb + n.extent - 1;
        let last_c = (m.extent - 1) * m.c + n.extent - 1;
        assert!(last_a < a.len() && last_b < b.len() && last_c < c.len());
        let rows = Rows {
            a: a.as_ptr(),
            row_a: m.a,
            step_a: k.a,
            b: b.as_ptr(),
            ldb,
            k: k.extent,
            c: c.as_mut_ptr(),
            row_c: m.c,
        };
        // SAFETY: every read and write is inside the operands (asserted above).
        unsafe {
            match n.extent {
                4 => rows.run_xmm(m.extent),
                8 => rows.run_ymm::<1>(m.extent),
                _ => rows.run_ymm::<2>(m.extent),
            }
        }
    }

    /// One batch's operands as pointers: `a[i * row_a + l * step_a]`, `b[l * ldb + j]`,
    /// `c[i * row_c + j]`.
    struct Rows {
        a: *const f32,
        row_a: usize,
        step_a: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        c: *mut f32,
        row_c: usize,
    }

    impl Rows {
        /// Rows of `8 * V` outputs, four (then one) at a time.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run_ymm<const V: usize>(&self, m: usize) {
            let mut i = 0;
            while i < m {
                let group = if i + 4 <= m { 4 } else { 1 };
                let mut acc = [[_mm256_setzero_ps(); V]; 4];
                let mut pa = self.a.wrapping_add(i * self.row_a);
                let mut pb = self.b;
                for _ in 0..self.k {
                    // SAFETY: inside the operands (checked by the caller).
                    unsafe {
                        let bv: [__m256; V] =
                            std::array::from_fn(|v| _mm256_loadu_ps(pb.wrapping_add(8 * v)));
                        for (r, acc) in acc.iter_mut().enumerate().take(group) {
                            let x =
                                _mm256_broadcastss_ps(_mm_load_ss(pa.wrapping_add(r * self.row_a)));
                            for v in 0..V {
                                acc[v] = _mm256_fmadd_ps(x, bv[v], acc[v]);
                            }
                        }
                    }
                    pa = pa.wrapping_add(self.step_a);
                    pb = pb.wrapping_add(self.ldb);
                }
                for (r, acc) in acc.iter().enumerate().take(group) {
                    let out = self.c.wrapping_add((i + r) * self.row_c);
                    for (v, acc) in acc.iter().enumerate() {
                        // SAFETY: inside `c` (checked by the caller).
                        unsafe { _mm256_storeu_ps(out.wrapping_add(8 * v), *acc) };
                    }
                }
                i += group;
            }
        }

        /// Rows of 4 outputs, four (then one) at a time.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run_xmm(&self, m: usize) {
            let mut i = 0;
            while i < m {
                let group = if i + 4 <= m { 4 } else { 1 };
                let mut acc = [_mm_setzero_ps(); 4];
                let mut pa = self.a.wrapping_add(i * self.row_a);
                let mut pb = self.b;
                for _ in 0..self.k {
                    // SAFETY: inside the operands (checked by the caller).
                    unsafe {
                        let bv = _mm_loadu_ps(pb);
                        for (r, acc) in acc.iter_mut().enumerate().take(group) {
                            let x = _mm_broadcast_ss(&*pa.wrapping_add(r * self.row_a));
                            *acc = _mm_fmadd_ps(x, bv, *acc);
                        }
                    }
                    pa = pa.wrapping_add(self.step_a);
                    pb = pb.wrapping_add(self.ldb);
                }
                for (r, acc) in acc.iter().enumerate().take(group) {
                    // SAFETY: inside `c` (checked by the caller).
                    unsafe { _mm_storeu_ps(self.c.wrapping_add((i + r) * self.row_c), *acc) };
                }
                i += group;
            }
        }
    }
}

impl TypedOp for SmallMatMul {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output)))
    }
    as_op!();
}

/// Put [`SmallMatMul`] where it applies, in a decluttered model (before tract lowers its einsums to
/// its own kernels).
pub fn use_small_matmuls(model: &mut TypedModel) -> TractResult<()> {
    if !fma_available() {
        return Ok(());
    }
    let candidates: Vec<usize> = model
        .nodes
        .iter()
        .filter(|n| n.op_is::<EinSum>())
        .map(|n| n.id)
        .collect();
    for id in candidates {
        let node = &model.nodes[id];
        let Some(op) = small_matmul_for(model, node)? else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The [`SmallMatMul`] computing `node` (an einsum), if it is a plain batched product of two
/// run-time f32 tensors with a short tile side.
fn small_matmul_for(model: &TypedModel, node: &TypedNode) -> TractResult<Option<SmallMatMul>> {
    let Some(Product {
        batch,
        m,
        n,
        k,
        output,
    }) = plain_product(model, node)?
    else {
        return Ok(None);
    };
    let contiguous = (n.b == 1 && n.c == 1) || (k.a == 1 && k.b == 1);
    if k.extent > SMALL_DEPTH || !contiguous {
        return Ok(None);
    }
    let vector = vector_rows(&n, &k);
    // The vector rows kernel takes any number of rows (Latte's cross-attention values: 64 rows
    // of 16 over 4 tokens); the scalar one only small tiles.
    if m.extent * n.extent > SMALL_TILE && !vector {
        return Ok(None);
    }
    Ok(Some(SmallMatMul {
        batch,
        m,
        n,
        k,
        output,
        vector,
    }))
}

/// A batched matrix product's axes as they lie in memory: `c[batch, m, n] = Σ_k a[batch, m, k] ·
/// b[batch, k, n]`.
pub(super) struct Product {
    pub batch: Vec<Stride>,
    pub m: Stride,
    pub n: Stride,
    pub k: Stride,
    pub output: Vec<usize>,
}

/// `node` (an einsum) as a [`Product`], if it is a plain batched product of two run-time f32
/// tensors: one `m`, `n` and `k` axis (contracted axes of extent 1 aside), any number of batch
/// axes, no broadcasting.
pub(super) fn plain_product(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Product>> {
    let op = node.op_as::<EinSum>().context("einsum")?;
    if node.inputs.len() != 2 || op.q_params.is_some() || op.operating_dt != f32::datum_type() {
        return Ok(None);
    }
    let facts: Vec<&TypedFact> = node
        .inputs
        .iter()
        .map(|i| model.outlet_fact(*i))
        .collect::<TractResult<_>>()?;
    let constant = node
        .inputs
        .iter()
        .any(|i| model.node(i.node).op_is::<Const>());
    let shapes: Vec<Vec<usize>> = facts
        .iter()
        .map(|f| f.shape.as_concrete().map(|s| s.to_vec()))
        .collect::<Option<_>>()
        .unwrap_or_default();
    let output = node.outputs[0].fact.shape.as_concrete().map(|s| s.to_vec());
    let (Some(output), [a_shape, b_shape]) = (output, shapes.as_slice()) else {
        return Ok(None);
    };
    if constant || facts.iter().any(|f| f.datum_type != f32::datum_type()) {
        return Ok(None);
    }
    let strides = |shape: &[usize]| -> Vec<usize> {
        TractTensor::natural_strides(shape)
            .iter()
            .map(|&s| s as usize)
            .collect()
    };
    let (sa, sb, sc) = (strides(a_shape), strides(b_shape), strides(&output));
    let (mut batch, mut m, mut n, mut k) = (Vec::new(), None, None, None);
    for axis in op.axes.iter_all_axes() {
        let pos = |v: &TVec<usize>| -> Option<Option<usize>> {
            match v.as_slice() {
                [] => Some(None),
                [p] => Some(Some(*p)),
                _ => None,
            }
        };
        let (Some(pa), Some(pb), Some(pc)) = (
            pos(&axis.inputs[0]),
            pos(&axis.inputs[1]),
            pos(&axis.outputs[0]),
        ) else {
            return Ok(None);
        };
        let extent = |p: Option<usize>, shape: &[usize]| p.map(|p| shape[p]);
        let (ea, eb, ec) = (
            extent(pa, a_shape),
            extent(pb, b_shape),
            extent(pc, &output),
        );
        let extents: Vec<usize> = [ea, eb, ec].into_iter().flatten().collect();
        if extents.windows(2).any(|w| w[0] != w[1]) {
            return Ok(None); // broadcasting: leave it to tract
        }
        let stride = Stride {
            extent: extents[0],
            a: pa.map_or(0, |p| sa[p]),
            b: pb.map_or(0, |p| sb[p]),
            c: pc.map_or(0, |p| sc[p]),
        };
        let slot = match (pa.is_some(), pb.is_some(), pc.is_some()) {
            (true, true, true) => {
                batch.push(stride);
                continue;
            }
            (true, false, true) => &mut m,
            (false, true, true) => &mut n,
            // A contracted axis of extent 1 (torch exports' trailing singleton dims) sums nothing.
            (true, true, false) if stride.extent == 1 => continue,
            (true, true, false) => &mut k,
            _ => return Ok(None),
        };
        if slot.replace(stride).is_some() {
            return Ok(None);
        }
    }
    let (Some(m), Some(n), Some(k)) = (m, n, k) else {
        return Ok(None);
    };
    Ok(Some(Product {
        batch,
        m,
        n,
        k,
        output,
    }))
}
