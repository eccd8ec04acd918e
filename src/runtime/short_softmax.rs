//! A tract operator for softmaxes over short rows, used by the runtime only.
//!
//! Small video DiTs take softmaxes over short axes: Latte's temporal attention over 8 frames, its
//! and Wan's cross-attention over 4 caption tokens. tract runs three kernels per row (max, exp-sum,
//! scale), each through a framework that copies a row shorter than the kernel's width into a
//! padded scratch buffer: ~25 ns per value on rows of 4 and 8, against ~0.4 ns on long rows.
//! [`ShortSoftmax`] computes the same row with one call of tract's own exp-sum kernel on an aligned
//! padded buffer (two where tract's framework splits the row at an alignment boundary, as it does),
//! the max and the scale by the reciprocal of the sum as tract's kernels compute them. So the
//! values are tract's bits (tests/runtime_rewrites.rs compares with tract's own plan), not a
//! different `exp`: a libm `exp` was 5x faster still but moved the INT8 + PAB latte trajectory of
//! tests/quantize.rs (cosine 0.99607 to 0.99573).
//!
//! [`use_short_softmaxes`] places it on tract's decluttered model for f32 softmaxes over the last
//! axis whose rows are shorter than the exp-sum kernel's width, where that kernel is one whose
//! width and alignment this file knows.

use tract_linalg::reduce::MapReduce;
use tract_linalg::routines::Func;
use tract_onnx::prelude::{tvec, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// tract's exp-sum (`Softmax2`) kernels this file knows: name, width (values per call) and
/// alignment in bytes. Their framework processes a row shorter than the width as an unaligned
/// head (up to the first aligned address) and the rest, each padded to the width with -inf.
const KERNELS: &[(&str, usize, usize)] = &[
    ("x86_64_fma_softmax2_f32_32n", 32, 32),
    ("x86_64_avx512_softmax2_f32_64n", 64, 64),
];

/// Rows per task when the rows are split over threads.
const ROWS_PER_TASK: usize = 512;

/// Softmax over the last axis of an f32 tensor whose rows have `row` values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShortSoftmax {
    row: usize,
    /// The exp-sum kernel's width and alignment (bytes).
    width: usize,
    align: usize,
}

impl Op for ShortSoftmax {
    fn name(&self) -> StaticName {
        "ShortSoftmax".into()
    }
    op_as_typed_op!();
}

impl EvalOp for ShortSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        use rayon::prelude::*;
        ensure!(inputs.len() == 1, "ShortSoftmax takes one input");
        let mut output = inputs.remove(0).into_tensor();
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            let data = plain.as_slice_mut::<f32>()?;
            if super::tract::split_over_threads() {
                data.par_chunks_mut(self.row * ROWS_PER_TASK)
                    .try_for_each(|rows| self.rows(rows))?;
            } else {
                data.chunks_mut(self.row * ROWS_PER_TASK)
                    .try_for_each(|rows| self.rows(rows))?;
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for ShortSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }
    as_op!();
}

impl ShortSoftmax {
    fn rows(&self, rows: &mut [f32]) -> TractResult<()> {
        let exp_sum = Func::Softmax2.map_reduce_f32()?;
        // An aligned scratch buffer of the kernel's width, as tract's framework uses.
        let mut scratch = TractTensor::zero_aligned::<f32>(&[self.width], self.align)?;
        let mut scratch = scratch.try_as_plain_ram_mut()?;
        let scratch = scratch.as_slice_mut::<f32>()?;
        for row in rows.chunks_mut(self.row) {
            self.one_row(row, &*exp_sum, scratch)?;
        }
        Ok(())
    }

    /// One row, as tract's `softmax_inner_slice_f32` computes it through its framework.
    fn one_row(
        &self,
        row: &mut [f32],
        exp_sum: &dyn MapReduce<f32, f32>,
        scratch: &mut [f32],
    ) -> TractResult<()> {
        // The max of the values is the same whatever the order (tract's kernel reduces lanes).
        let max = row.iter().fold(f32::MIN, |m, &x| if x > m { x } else { m });
        let head = (row.as_ptr().align_offset(self.align)).min(row.len());
        let (first, second) = row.split_at_mut(head);
        let mut sum = 0.0f32;
        for piece in [first, second] {
            if piece.is_empty() {
                continue;
            }
            scratch[..piece.len()].copy_from_slice(piece);
            scratch[piece.len()..].fill(f32::NEG_INFINITY);
            sum += exp_sum.run_with_params(scratch, max)?;
            piece.copy_from_slice(&scratch[..piece.len()]);
        }
        let scale = sum.recip();
        row.iter_mut().for_each(|x| *x *= scale);
        Ok(())
    }
}

/// The exp-sum kernel tract runs here, if this file knows its width and alignment.
fn known_kernel() -> Option<(usize, usize)> {
    let name = Func::Softmax2.map_reduce_f32().ok()?.name();
    KERNELS
        .iter()
        .find(|(known, _, _)| *known == name)
        .map(|&(_, width, align)| (width, align))
}

/// Put [`ShortSoftmax`] in place of tract's softmax over short last-axis f32 rows, in a
/// decluttered model.
pub fn use_short_softmaxes(model: &mut TypedModel) -> TractResult<()> {
    let Some((width, align)) = known_kernel() else {
        return Ok(());
    };
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
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        let last = shape.len().wrapping_sub(1);
        let row = shape.last().copied().unwrap_or(0);
        let plain = op.kind == SoftmaxKind::Softmax
            && op.quant_output_dt.is_none()
            && fact.datum_type == f32::datum_type()
            && op.axes.as_slice() == [last];
        if !plain || row == 0 || row >= width {
            continue;
        }
        let short = ShortSoftmax { row, width, align };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, short)?;
        patch.apply(model)?;
    }
    Ok(())
}
