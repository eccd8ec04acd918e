//! A tract operator for slices that keep a few values out of each row, used by the runtime only.
//!
//! Wan's rotary embedding views queries and keys as `[B, S, H, D/2, 2]` pairs and slices the last
//! axis into its even and odd halves: 24 slices per call, each picking every other value of a
//! 32K-value tensor. tract copies a slice through a general strided assignment, ~2.4 ns per value
//! for one value out of each pair (1.8 ms of a wan-small call). [`NarrowSlice`] copies such a slice
//! with one plain loop over the rows; a copy, so the values are the input's bits.
//!
//! [`use_narrow_slices`] places it on tract's decluttered model for f32 slices with constant bounds
//! whose kept run of values per row (the slice's extent times the values after its axis) is
//! shorter than [`NARROW`].

use tract_onnx::prelude::{tvec, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// Kept runs at least this long are left to tract (its copy is a `memcpy` per run).
const NARROW: usize = 16;

/// `output[o, ..] = input[o, start * inner .. end * inner]` for each of `rows` rows of `row`
/// values of a contiguous f32 tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NarrowSlice {
    rows: usize,
    row: usize,
    start: usize,
    kept: usize,
    output: Vec<usize>,
}

impl Op for NarrowSlice {
    fn name(&self) -> StaticName {
        "NarrowSlice".into()
    }
    op_as_typed_op!();
}

impl EvalOp for NarrowSlice {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "NarrowSlice takes one input");
        let input = inputs[0].try_as_plain_ram()?;
        let input = input.as_slice::<f32>()?;
        ensure!(
            input.len() == self.rows * self.row,
            "NarrowSlice: input size"
        );
        // SAFETY: every output value is written below (each output's chain, or its copy) before
        // the tensor is read.
        let mut out = unsafe { TractTensor::uninitialized::<f32>(&self.output)? };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            let rows = input
                .chunks_exact(self.row)
                .zip(out.chunks_exact_mut(self.kept));
            if self.kept == 1 {
                for (from, to) in rows {
                    to[0] = from[self.start];
                }
            } else {
                for (from, to) in rows {
                    to.copy_from_slice(&from[self.start..self.start + self.kept]);
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for NarrowSlice {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output)))
    }
    as_op!();
}

/// Put [`NarrowSlice`] in place of tract's narrow f32 slices, in a decluttered model.
pub fn use_narrow_slices(model: &mut TypedModel) -> TractResult<()> {
    let candidates: Vec<usize> = model
        .nodes
        .iter()
        .filter(|n| n.op_is::<Slice>())
        .map(|n| n.id)
        .collect();
    for id in candidates {
        let node = &model.nodes[id];
        let Some(op) = narrow_slice_for(model, node)? else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
    }
    Ok(())
}

fn narrow_slice_for(model: &TypedModel, node: &TypedNode) -> TractResult<Option<NarrowSlice>> {
    let slice = node.op_as::<Slice>().context("slice")?;
    let fact = model.outlet_fact(node.inputs[0])?;
    let (Some(shape), Some(start), Some(end)) = (
        fact.shape.as_concrete(),
        slice.start.as_usize(),
        slice.end.as_usize(),
    ) else {
        return Ok(None);
    };
    if fact.datum_type != f32::datum_type() || start >= end || end > shape[slice.axis] {
        return Ok(None);
    }
    let inner: usize = shape[slice.axis + 1..].iter().product();
    let kept = (end - start) * inner;
    if kept >= NARROW {
        return Ok(None);
    }
    let mut output = shape.to_vec();
    output[slice.axis] = end - start;
    Ok(Some(NarrowSlice {
        rows: shape[..slice.axis].iter().product(),
        row: shape[slice.axis] * inner,
        start: start * inner,
        kept,
        output,
    }))
}
