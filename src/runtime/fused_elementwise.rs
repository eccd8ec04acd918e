//! A tract operator running a connected group of element-wise ops in one pass, used by the runtime
//! only.
//!
//! DiT blocks are strings of small element-wise ops around each product: the tanh GELU of the
//! feed-forward (nine ops and a `tanh` over the 4x wide hidden activation), the adaLN modulation
//! `norm(x) * (1 + scale) + shift` and the gated residual `x + gate * y`, whose operands broadcast
//! over tokens. tract runs each op as its own pass over memory (its chains fuse only runs of binary
//! ops on one accumulator) and splits broadcast operands into copies. [`FusedElementwise`] takes a
//! whole group: per chunk of [`CHUNK`] outputs, each op of the group in order on buffers that stay
//! in L1, every operand read where it lies (broadcast axes have stride 0), the output written once.
//!
//! The values are tract's bits: `+ - * /` round once per op in IEEE single precision whatever the
//! loop, and every unary op (`tanh`, `square`, ...) is evaluated by tract's own implementation
//! (`ElementWiseMiniOp::eval_in_place`, the kernel tract's `ElementWiseOp` runs) on the chunk.
//! Nothing is reassociated or contracted into fused multiply-adds. Chunks are split over the
//! runtime's threads; each output is computed by the same ops whatever the split.
//!
//! [`use_fused_elementwise`] places it on tract's decluttered model, growing each group backwards
//! from its last op through producers whose every consumer is in the group.

use tract_linalg::element_wise::ElementWise;
use tract_linalg::routines::Func;
use tract_onnx::prelude::{tvec, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// Outputs computed together: every intermediate of a chunk stays in L1.
const CHUNK: usize = 512;
/// Outputs below which a group stays as tract's ops (nothing to gain).
const MIN_OUTPUTS: usize = 1024;
/// Outputs from which chunks are split over threads (tract's own threshold for element-wise ops).
const PARALLEL_OUTPUTS: usize = 32768;

/// The binary ops a group takes: exactly one IEEE rounding each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

/// Where an operand of a step comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Value {
    /// The op's `n`-th input, read through its strides.
    Input(usize),
    /// A one-element constant (its bits).
    Scalar(u32),
    /// The result of an earlier step.
    Step(usize),
}

/// tract's unary ops whose f32 implementation is exactly one call of a linalg kernel on the
/// values (`Func::X.ew_f32()?.run(xs)` in tract-core), called here on the chunk directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    Tanh,
    Sigmoid,
    Silu,
    Exp,
    Ln,
}

impl Kernel {
    fn of(op: &dyn ElementWiseMiniOp) -> Option<Kernel> {
        Some(match op.name().as_str() {
            "Tanh" => Kernel::Tanh,
            "Sigmoid" => Kernel::Sigmoid,
            "Silu" => Kernel::Silu,
            "Exp" => Kernel::Exp,
            "Ln" => Kernel::Ln,
            _ => return None,
        })
    }

    fn func(self) -> Func {
        match self {
            Kernel::Tanh => Func::Tanh,
            Kernel::Sigmoid => Func::Sigmoid,
            Kernel::Silu => Func::Silu,
            Kernel::Exp => Func::Exp,
            Kernel::Ln => Func::Ln,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Binary(Binary, Value, Value),
    /// `x * x` (tract's `Square` is `powi(2)`, which is that multiplication).
    Square(Value),
    Kernel(Kernel, Value),
    /// Any other unary op, through tract's own in-place evaluation on a chunk tensor.
    Unary(Box<dyn ElementWiseMiniOp>, Value),
}

/// A group of element-wise ops over one output shape, run chunk by chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedElementwise {
    /// The output's shape as tract sees it.
    output: Vec<usize>,
    /// The output's shape with unit axes dropped and mergeable axes merged.
    axes: Vec<usize>,
    /// Per input, its stride (in elements) along each of `axes` (0: broadcast).
    strides: Vec<Vec<usize>>,
    /// Per input, whether it lies as the output does (its chunks are read in place).
    in_place: Vec<bool>,
    /// The ops, in an order where every operand is computed before it is used; the last is the
    /// output.
    steps: Vec<Step>,
}

impl Op for FusedElementwise {
    fn name(&self) -> StaticName {
        "FusedElementwise".into()
    }
    op_as_typed_op!();
}

impl EvalOp for FusedElementwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        use rayon::prelude::*;
        ensure!(
            inputs.len() == self.strides.len(),
            "FusedElementwise: wrong input count"
        );
        let plains = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let slices = plains
            .iter()
            .map(|p| p.as_slice::<f32>())
            .collect::<TractResult<Vec<&[f32]>>>()?;
        // SAFETY: every chunk of the output is written before the tensor is read.
        let mut out = unsafe { TractTensor::uninitialized::<f32>(&self.output)? };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let c = plain.as_slice_mut::<f32>()?;
            if c.len() >= PARALLEL_OUTPUTS && super::tract::split_over_threads() {
                let threads = rayon::current_num_threads();
                let per_task = c.len().div_ceil(4 * threads).div_ceil(CHUNK) * CHUNK;
                c.par_chunks_mut(per_task)
                    .enumerate()
                    .try_for_each(|(i, part)| self.run(&slices, i * per_task, part))?;
            } else {
                self.run(&slices, 0, c)?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FusedElementwise {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output)))
    }
    as_op!();
}

/// One worker's buffers: one chunk per step, one per input that must be gathered, the linalg
/// kernels of the steps that call one, and a tensor for the other unary ops.
struct Scratch {
    steps: Vec<Vec<f32>>,
    gathered: Vec<Vec<f32>>,
    kernels: Vec<Option<Box<dyn ElementWise<f32>>>>,
    unary: Option<TractTensor>,
}

impl FusedElementwise {
    /// Outputs `first..first + out.len()` into `out`, chunk by chunk.
    fn run(&self, inputs: &[&[f32]], first: usize, out: &mut [f32]) -> TractResult<()> {
        let kernels = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Kernel(k, _) => k.func().ew_f32().map(Some),
                _ => Ok(None),
            })
            .collect::<TractResult<_>>()?;
        let generic = self.steps.iter().any(|s| matches!(s, Step::Unary(..)));
        let mut scratch = Scratch {
            steps: vec![vec![0.0; CHUNK]; self.steps.len()],
            gathered: vec![vec![0.0; CHUNK]; inputs.len()],
            kernels,
            unary: generic
                .then(|| TractTensor::zero::<f32>(&[CHUNK]))
                .transpose()?,
        };
        for (c, chunk) in out.chunks_mut(CHUNK).enumerate() {
            let start = first + c * CHUNK;
            self.gather(inputs, start, chunk.len(), &mut scratch.gathered);
            self.chunk(inputs, start, chunk, &mut scratch)?;
        }
        Ok(())
    }

    /// Copy the chunk's values of every input that is not read in place.
    fn gather(&self, inputs: &[&[f32]], start: usize, len: usize, into: &mut [Vec<f32>]) {
        for (i, (input, strides)) in inputs.iter().zip(&self.strides).enumerate() {
            if !self.in_place[i] {
                gather(input, &self.axes, strides, start, &mut into[i][..len]);
            }
        }
    }

    /// Run every step on the chunk of outputs starting at output `start`, the last one into `out`.
    fn chunk(
        &self,
        inputs: &[&[f32]],
        start: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) -> TractResult<()> {
        let len = out.len();
        for (s, step) in self.steps.iter().enumerate() {
            let (done, rest) = scratch.steps.split_at_mut(s);
            let dst = if s + 1 == self.steps.len() {
                &mut *out
            } else {
                &mut rest[0][..len]
            };
            let operand = |v: Value| -> Operand {
                match v {
                    Value::Scalar(bits) => Operand::Scalar(f32::from_bits(bits)),
                    Value::Step(j) => Operand::Slice(&done[j][..len]),
                    Value::Input(i) if self.in_place[i] => {
                        Operand::Slice(&inputs[i][start..start + len])
                    }
                    Value::Input(i) => Operand::Slice(&scratch.gathered[i][..len]),
                }
            };
            match step {
                Step::Binary(op, a, b) => binary(*op, operand(*a), operand(*b), dst),
                Step::Square(a) => binary(Binary::Mul, operand(*a), operand(*a), dst),
                Step::Kernel(_, a) => {
                    copy_into(operand(*a), dst);
                    let kernel = scratch.kernels[s].as_ref().expect("made with the scratch");
                    kernel.run(dst)?;
                }
                Step::Unary(op, a) => {
                    let unary = scratch.unary.as_mut().expect("made with the scratch");
                    {
                        let mut plain = unary.try_as_plain_ram_mut()?;
                        copy_into(operand(*a), &mut plain.as_slice_mut::<f32>()?[..len]);
                    }
                    // tract's own implementation of the op, on the whole buffer (values past
                    // `len` are stale and ignored: every op here is value by value).
                    op.eval_in_place(unary, None)?;
                    let plain = unary.try_as_plain_ram()?;
                    dst.copy_from_slice(&plain.as_slice::<f32>()?[..len]);
                }
            }
        }
        Ok(())
    }
}

enum Operand<'a> {
    Slice(&'a [f32]),
    Scalar(f32),
}

fn copy_into(from: Operand, dst: &mut [f32]) {
    match from {
        Operand::Slice(x) => dst.copy_from_slice(x),
        Operand::Scalar(x) => dst.fill(x),
    }
}

/// `dst = a op b`, value by value, with the widest vectors this CPU has (the loops are the same;
/// only the width the compiler may use differs, so the values do not).
fn binary(op: Binary, a: Operand, b: Operand, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { vector::binary_avx512(op, a, b, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { vector::binary_avx2(op, a, b, dst) };
        }
    }
    binary_loops(op, a, b, dst)
}

#[cfg(target_arch = "x86_64")]
mod vector {
    use super::{binary_loops, Binary, Operand};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn binary_avx2(op: Binary, a: Operand, b: Operand, dst: &mut [f32]) {
        binary_loops(op, a, b, dst)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn binary_avx512(op: Binary, a: Operand, b: Operand, dst: &mut [f32]) {
        binary_loops(op, a, b, dst)
    }
}

#[inline(always)]
fn binary_loops(op: Binary, a: Operand, b: Operand, dst: &mut [f32]) {
    match op {
        Binary::Add => apply(a, b, dst, |x, y| x + y),
        Binary::Sub => apply(a, b, dst, |x, y| x - y),
        Binary::Mul => apply(a, b, dst, |x, y| x * y),
        Binary::Div => apply(a, b, dst, |x, y| x / y),
    }
}

#[inline(always)]
fn apply(a: Operand, b: Operand, dst: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    match (a, b) {
        (Operand::Slice(a), Operand::Slice(b)) => {
            for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
                *d = f(x, y);
            }
        }
        (Operand::Slice(a), Operand::Scalar(y)) => {
            for (d, &x) in dst.iter_mut().zip(a) {
                *d = f(x, y);
            }
        }
        (Operand::Scalar(x), Operand::Slice(b)) => {
            for (d, &y) in dst.iter_mut().zip(b) {
                *d = f(x, y);
            }
        }
        (Operand::Scalar(x), Operand::Scalar(y)) => dst.fill(f(x, y)),
    }
}

/// Copy outputs `start..start + dst.len()` of `src` broadcast over `axes` (strides per axis, 0
/// where broadcast) into `dst`, a run of the innermost axis at a time.
fn gather(src: &[f32], axes: &[usize], strides: &[usize], start: usize, dst: &mut [f32]) {
    let Some((&inner, outer)) = axes.split_last() else {
        dst.fill(src[0]);
        return;
    };
    let inner_stride = strides[axes.len() - 1];
    let (mut position, mut written) = (start, 0);
    while written < dst.len() {
        let (mut row, column) = (position / inner, position % inner);
        let mut offset = 0;
        for (&extent, &stride) in outer.iter().zip(strides).rev() {
            offset += (row % extent) * stride;
            row /= extent;
        }
        let n = (inner - column).min(dst.len() - written);
        let run = &mut dst[written..written + n];
        match inner_stride {
            0 => run.fill(src[offset]),
            1 => run.copy_from_slice(&src[offset + column..offset + column + n]),
            s => run
                .iter_mut()
                .enumerate()
                .for_each(|(t, d)| *d = src[offset + (column + t) * s]),
        }
        position += n;
        written += n;
    }
}

/// Replace every group of two or more element-wise f32 ops over one output shape (at least
/// [`MIN_OUTPUTS`] values) by one [`FusedElementwise`], in a decluttered model.
pub fn use_fused_elementwise(model: &mut TypedModel) -> TractResult<()> {
    let order = model.eval_order()?;
    let mut taken = vec![false; model.nodes.len()];
    for &root in order.iter().rev() {
        if taken[root] {
            continue;
        }
        let Some(shape) = member_shape(model, root) else {
            continue;
        };
        let group = group_from(model, root, &shape);
        if group.len() < 2 {
            continue;
        }
        let Some(patch) = fused_patch(model, root, shape, &group, &order)? else {
            continue;
        };
        for &id in &group {
            taken[id] = true;
        }
        patch.apply(model)?;
    }
    Ok(())
}

/// The output shape of `id` if it is an op a group can take: a binary `+ - * /` or a unary
/// element-wise op, on f32, with a concrete output of at least [`MIN_OUTPUTS`] values.
fn member_shape(model: &TypedModel, id: usize) -> Option<Vec<usize>> {
    let node = &model.nodes[id];
    if node.outputs.len() != 1 || node.outputs[0].fact.datum_type != f32::datum_type() {
        return None;
    }
    let shape = node.outputs[0].fact.shape.as_concrete()?.to_vec();
    if shape.iter().product::<usize>() < MIN_OUTPUTS {
        return None;
    }
    let inputs_f32 = node.inputs.iter().all(|i| {
        model
            .outlet_fact(*i)
            .is_ok_and(|f| f.datum_type == f32::datum_type() && f.shape.as_concrete().is_some())
    });
    if !inputs_f32 {
        return None;
    }
    let takes = if let Some(bin) = node.op_as::<TypedBinOp>() {
        bin.1.is_none() && binary_of(&*bin.0).is_some() && node.inputs.len() == 2
    } else if let Some(ew) = node.op_as::<ElementWiseOp>() {
        let same = model
            .outlet_fact(node.inputs[0])
            .ok()?
            .shape
            .as_concrete()?
            == &shape[..];
        ew.1.is_none() && node.inputs.len() == 1 && same && runs_in_place(&*ew.0)
    } else {
        false
    };
    takes.then_some(shape)
}

/// Whether tract evaluates `op` on an f32 tensor in place (what [`FusedElementwise`] calls).
fn runs_in_place(op: &dyn ElementWiseMiniOp) -> bool {
    let Ok(mut probe) = TractTensor::zero::<f32>(&[CHUNK]) else {
        return false;
    };
    op.eval_in_place(&mut probe, None).is_ok() && probe.datum_type() == f32::datum_type()
}

fn binary_of(op: &dyn tract_onnx::tract_core::ops::binary::BinMiniOp) -> Option<Binary> {
    if op.is::<math::Add>() {
        Some(Binary::Add)
    } else if op.is::<math::Sub>() {
        Some(Binary::Sub)
    } else if op.is::<math::Mul>() {
        Some(Binary::Mul)
    } else if op.is::<math::Div>() {
        Some(Binary::Div)
    } else {
        None
    }
}

/// The group ending at `root`: `root` and, repeatedly, every producer of a member's operand that
/// is an op a group can take over the same shape, is no model output, and feeds only members.
fn group_from(model: &TypedModel, root: usize, shape: &[usize]) -> Vec<usize> {
    let outputs = model
        .output_outlets()
        .map(|o| o.to_vec())
        .unwrap_or_default();
    let mut group = vec![root];
    let mut grown = true;
    while grown {
        grown = false;
        for member in group.clone() {
            for input in &model.nodes[member].inputs {
                let p = input.node;
                if group.contains(&p) || member_shape(model, p).as_deref() != Some(shape) {
                    continue;
                }
                let feeds_only_members = model.nodes[p].outputs[0]
                    .successors
                    .iter()
                    .all(|s| group.contains(&s.node));
                if feeds_only_members && !outputs.contains(&OutletId::new(p, 0)) {
                    group.push(p);
                    grown = true;
                }
            }
        }
    }
    group
}

/// The patch putting one [`FusedElementwise`] in place of `group` (ending at `root`, whose output
/// has shape `output`), or `None` when an operand does not broadcast to the output as ONNX
/// broadcasting says.
fn fused_patch(
    model: &TypedModel,
    root: usize,
    output: Vec<usize>,
    group: &[usize],
    order: &[usize],
) -> TractResult<Option<TypedModelPatch>> {
    let mut members = group.to_vec();
    members.sort_by_key(|id| order.iter().position(|o| o == id));
    let mut externals: Vec<OutletId> = vec![];
    let mut steps = vec![];
    for &id in &members {
        let node = &model.nodes[id];
        let mut values = vec![];
        for input in &node.inputs {
            let value = if let Some(j) = members.iter().position(|&m| m == input.node) {
                Value::Step(j)
            } else if let Some(bits) = scalar_constant(model, *input) {
                Value::Scalar(bits)
            } else {
                let i = externals
                    .iter()
                    .position(|e| e == input)
                    .unwrap_or_else(|| {
                        externals.push(*input);
                        externals.len() - 1
                    });
                Value::Input(i)
            };
            values.push(value);
        }
        steps.push(if let Some(bin) = node.op_as::<TypedBinOp>() {
            let op = binary_of(&*bin.0).expect("member_shape checked the op");
            Step::Binary(op, values[0], values[1])
        } else {
            let ew = node
                .op_as::<ElementWiseOp>()
                .expect("member_shape checked the op");
            if ew.0.name() == "Square" {
                Step::Square(values[0])
            } else if let Some(kernel) = Kernel::of(&*ew.0) {
                Step::Kernel(kernel, values[0])
            } else {
                Step::Unary(ew.0.clone(), values[0])
            }
        });
    }
    let mut shapes = vec![];
    for e in &externals {
        let shape = model
            .outlet_fact(*e)?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        match shape {
            Some(s) if broadcasts_to(&s, &output) => shapes.push(s),
            _ => return Ok(None),
        }
    }
    let (axes, strides) = simplified_axes(&output, &shapes);
    let in_place = strides.iter().map(|s| lies_as(&axes, s)).collect();
    let op = FusedElementwise {
        output,
        axes,
        strides,
        in_place,
        steps,
    };
    let mut patch = TypedModelPatch::default();
    let taps = externals
        .iter()
        .map(|e| patch.tap_model(model, *e))
        .collect::<TractResult<TVec<_>>>()?;
    let name = format!("{}.fused", model.nodes[root].name);
    let out = patch.wire_node(name, op, &taps)?;
    patch.shunt_outside(model, OutletId::new(root, 0), out[0])?;
    Ok(Some(patch))
}

/// Whether strides along `axes` are those of the output itself (row-major, nothing broadcast).
fn lies_as(axes: &[usize], strides: &[usize]) -> bool {
    let mut expect = 1;
    for (&extent, &stride) in axes.iter().zip(strides).rev() {
        if stride != expect {
            return false;
        }
        expect *= extent;
    }
    true
}

/// The bits of `outlet`'s value if it is a one-element f32 constant.
fn scalar_constant(model: &TypedModel, outlet: OutletId) -> Option<u32> {
    let konst = model.nodes[outlet.node].op_as::<Const>()?;
    let value = konst.val();
    (value.len() == 1 && value.datum_type() == f32::datum_type())
        .then(|| value.cast_to_scalar::<f32>().ok().map(f32::to_bits))
        .flatten()
}

/// Whether `shape` broadcasts to `output` with the same rank (every axis equal or 1).
fn broadcasts_to(shape: &[usize], output: &[usize]) -> bool {
    shape.len() == output.len() && shape.iter().zip(output).all(|(&s, &o)| s == o || s == 1)
}

/// The output's axes without unit axes, adjacent axes merged where every input's strides allow,
/// and each input's strides along them (row-major, 0 along broadcast axes).
fn simplified_axes(output: &[usize], inputs: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let natural = |shape: &[usize]| -> Vec<usize> {
        let mut strides = vec![0; shape.len()];
        let mut s = 1;
        for (axis, &d) in shape.iter().enumerate().rev() {
            strides[axis] = if d == 1 { 0 } else { s };
            s *= d;
        }
        strides
    };
    let input_strides: Vec<Vec<usize>> = inputs.iter().map(|s| natural(s)).collect();
    let mut axes: Vec<usize> = vec![];
    let mut strides: Vec<Vec<usize>> = vec![vec![]; inputs.len()];
    for (axis, &extent) in output.iter().enumerate() {
        if extent == 1 {
            continue;
        }
        // Merge into the previous kept axis when, for every input, stepping the previous axis is
        // stepping this one `extent` times.
        let mergeable = !axes.is_empty()
            && input_strides
                .iter()
                .zip(&strides)
                .all(|(s, kept)| kept[kept.len() - 1] == s[axis] * extent);
        if mergeable {
            *axes.last_mut().expect("not empty") *= extent;
            for (kept, s) in strides.iter_mut().zip(&input_strides) {
                *kept.last_mut().expect("not empty") = s[axis];
            }
        } else {
            axes.push(extent);
            for (kept, s) in strides.iter_mut().zip(&input_strides) {
                kept.push(s[axis]);
            }
        }
    }
    (axes, strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_merge_where_every_input_allows() {
        // Latte's modulation: [F, 1, C] against [F, N, C]; the full operand merges everything.
        let (axes, strides) = simplified_axes(&[8, 64, 64], &[vec![8, 64, 64], vec![8, 1, 64]]);
        assert_eq!(axes, vec![8, 64, 64]);
        assert_eq!(strides, vec![vec![4096, 64, 1], vec![64, 0, 1]]);
        // Unit axes drop out; two full operands merge into one axis.
        let (axes, strides) = simplified_axes(&[1, 6, 1, 4], &[vec![1, 6, 1, 4], vec![1, 6, 1, 4]]);
        assert_eq!(axes, vec![24]);
        assert_eq!(strides, vec![vec![1], vec![1]]);
        // A row repeated over leading axes.
        let (axes, strides) = simplified_axes(&[4, 5, 6], &[vec![1, 1, 6]]);
        assert_eq!(axes, vec![20, 6]);
        assert_eq!(strides, vec![vec![0, 1]]);
    }

    #[test]
    fn gather_walks_broadcast_runs() {
        // [2, 3] from a [2, 1] column, starting mid-row.
        let mut dst = [0.0; 4];
        gather(&[10.0, 20.0], &[2, 3], &[1, 0], 1, &mut dst);
        assert_eq!(dst, [10.0, 10.0, 20.0, 20.0]);
        // [2, 3] from a [1, 3] row.
        let mut dst = [0.0; 6];
        gather(&[1.0, 2.0, 3.0], &[2, 3], &[0, 1], 0, &mut dst);
        assert_eq!(dst, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }
}
