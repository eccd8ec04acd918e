//! Two tract operators for shapes its general kernels handle poorly, used by the runtime only.
//!
//! Small video DiTs attend over short axes: Latte's temporal attention is 8 frames long per token
//! (256 batches of 8x16 by 16x8 products, softmax rows of 8), its cross-attention 4 caption tokens
//! long (softmax rows of 4). tract's matrix-product kernels pack both operands of every batch into
//! 16x12 tiles (mostly padding at 8x8), and its softmax kernel costs a fixed ~0.1 µs per row, so
//! these tiny ops took a third of a latte-tiny call. Here:
//! - [`ShortRowSoftmax`]: softmax over a last axis of at most [`SHORT_ROW`] values, row by row,
//!   with the standard library's `exp` (tract's own kernel uses a polynomial: the two agree to a
//!   few ulps).
//! - [`SmallMatMul`]: a batched product of small tiles (at most [`SMALL_TILE`] outputs and a depth
//!   of [`SMALL_DEPTH`] per batch), written as dot products or row updates over the inputs as they
//!   lie in memory (only where one of the two is contiguous), no packing. Sums run in another order than tract's kernels: results agree
//!   to rounding.
//!
//! Both are placed by [`use_small_kernels`] on tract's typed model; the emitted ONNX is untouched.

use tract_onnx::prelude::{tvec, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// Longest softmax row [`ShortRowSoftmax`] takes.
pub const SHORT_ROW: usize = 32;
/// Largest output tile (rows x columns per batch) [`SmallMatMul`] takes.
const SMALL_TILE: usize = 256;
/// Longest contracted axis [`SmallMatMul`] takes.
const SMALL_DEPTH: usize = 32;

/// Softmax over the last axis, for short rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShortRowSoftmax;

impl Op for ShortRowSoftmax {
    fn name(&self) -> StaticName {
        "ShortRowSoftmax".into()
    }
    op_as_typed_op!();
}

impl EvalOp for ShortRowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs
            .into_iter()
            .next()
            .context("softmax needs an input")?;
        let mut output = input.into_tensor();
        let row = *output.shape().last().context("softmax of a scalar")?;
        {
            use rayon::prelude::*;
            let mut plain = output.try_as_plain_ram_mut()?;
            let data = plain.as_slice_mut::<f32>()?;
            // Whole rows per task; on the runtime's pool when there is one (see `--threads`).
            let rows_per_task = (data.len() / row.max(1) / rayon::current_num_threads()).max(64);
            data.par_chunks_mut(row.max(1) * rows_per_task)
                .for_each(|chunk| chunk.chunks_mut(row.max(1)).for_each(softmax_row));
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for ShortRowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }
    as_op!();
}

fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let scale = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= scale);
}

/// One axis of a product: its extent and its stride (in elements) in `a`, `b` and the output
/// (0 where the tensor does not have it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Stride {
    extent: usize,
    a: usize,
    b: usize,
    c: usize,
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
        let mut out = TractTensor::zero::<f32>(&self.output)?;
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let c = plain.as_slice_mut::<f32>()?;
            self.run(a, b, c);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl SmallMatMul {
    /// Every batch; split over the runtime's threads along the output's outermost axis when that
    /// is a batch axis (its slices of the output are then contiguous and disjoint).
    fn run(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        use rayon::prelude::*;
        let outer = self
            .batch
            .iter()
            .position(|s| s.c * s.extent == c.len() && s.extent > 1);
        match outer {
            Some(axis) if rayon::current_num_threads() > 1 => {
                let s = self.batch[axis];
                let rest: Vec<Stride> = [&self.batch[..axis], &self.batch[axis + 1..]].concat();
                c.par_chunks_mut(s.c).enumerate().for_each(|(i, c)| {
                    self.batches(&rest, &a[i * s.a..], &b[i * s.b..], c);
                });
            }
            _ => self.batches(&self.batch, a, b, c),
        }
    }

    fn batches(&self, batch: &[Stride], a: &[f32], b: &[f32], c: &mut [f32]) {
        let count: usize = batch.iter().map(|s| s.extent).product();
        for index in 0..count {
            let (mut oa, mut ob, mut oc, mut rest) = (0, 0, 0, index);
            for s in batch.iter().rev() {
                let i = rest % s.extent;
                rest /= s.extent;
                (oa, ob, oc) = (oa + i * s.a, ob + i * s.b, oc + i * s.c);
            }
            self.one_batch(&a[oa..], &b[ob..], &mut c[oc..]);
        }
    }

    fn one_batch(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (self.m, self.n, self.k);
        if n.b == 1 && n.c == 1 {
            // Rows of b and c are contiguous: c[i, :] += a[i, l] * b[l, :].
            for i in 0..m.extent {
                let row = &mut c[i * m.c..i * m.c + n.extent];
                for l in 0..k.extent {
                    let x = a[i * m.a + l * k.a];
                    let from = &b[l * k.b..l * k.b + n.extent];
                    row.iter_mut().zip(from).for_each(|(r, y)| *r += x * y);
                }
            }
        } else {
            // Both operands contiguous along k (the only other layout taken): dot products.
            for i in 0..m.extent {
                let x = &a[i * m.a..i * m.a + k.extent];
                for j in 0..n.extent {
                    c[i * m.c + j * n.c] = dot(x, &b[j * n.b..j * n.b + k.extent]);
                }
            }
        }
    }
}

/// A dot product in eight lanes (vectorisable), then the lanes summed.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            lanes[l] += a[l] * b[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl TypedOp for SmallMatMul {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output)))
    }
    as_op!();
}

/// Put [`ShortRowSoftmax`] and [`SmallMatMul`] where they apply: softmaxes in an optimised model,
/// products (einsums) in a decluttered one, before tract lowers them to its own kernels.
pub fn use_small_matmuls(model: &mut TypedModel) -> TractResult<()> {
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

/// See [`use_small_matmuls`].
pub fn use_short_row_softmaxes(model: &mut TypedModel) -> TractResult<()> {
    let candidates: Vec<usize> = model
        .nodes
        .iter()
        .filter(|n| n.op_is::<Softmax>())
        .map(|n| n.id)
        .collect();
    for id in candidates {
        let node = &model.nodes[id];
        let op = node.op_as::<Softmax>().context("softmax")?;
        let fact = model.outlet_fact(node.inputs[0])?;
        let rank = fact.rank();
        let short = fact
            .shape
            .last()
            .and_then(|d| d.to_usize().ok())
            .is_some_and(|n| (1..=SHORT_ROW).contains(&n));
        if op.kind != SoftmaxKind::Softmax
            || op.quant_output_dt.is_some()
            || fact.datum_type != f32::datum_type()
            || op.axes.as_slice() != [rank - 1]
            || !short
        {
            continue;
        }
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, ShortRowSoftmax)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The [`SmallMatMul`] computing `node` (an einsum), if it is a plain batched product of two
/// run-time f32 tensors with a short tile side.
fn small_matmul_for(model: &TypedModel, node: &TypedNode) -> TractResult<Option<SmallMatMul>> {
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
        let mut s = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
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
    let contiguous = (n.b == 1 && n.c == 1) || (k.a == 1 && k.b == 1);
    if m.extent * n.extent > SMALL_TILE || k.extent > SMALL_DEPTH || !contiguous {
        return Ok(None);
    }
    Ok(Some(SmallMatMul {
        batch,
        m,
        n,
        k,
        output,
    }))
}
