//! Rewrites of the runtime's own copy of a graph, so that tract runs it with its fast kernels.
//!
//! These never touch the ONNX that `convert` emits: they are applied to what [`super::TractRunner`]
//! hands tract, and each one computes the same values (bit for bit: no reassociation, no change of
//! precision). They exist because tract picks a slow generic path for some patterns our graphs have:
//! - [`einsums_to_transposes`] (on the IR): a one-input `Einsum` that only permutes axes (the
//!   unpatchify of torch exports, `nhwpqc->nchpwq`) is a `Transpose`; tract runs one-input einsums
//!   element by element.
//! - [`expand_broadcast_operands`] (on tract's typed model): an element-wise op whose operand
//!   broadcasts over a middle axis (RoPE's `[1, S, 1, D, 1]` tables against `[B, S, H, D, 1]`
//!   queries, Latte's per-frame modulation `[F, 1, C]` against `[F, N, C]`) falls back to tract's
//!   generic broadcasting loop, 20 to 40 times slower than its vectorised kernels. A constant operand
//!   is broadcast once, at planning, to the full shape; a run-time one through a broadcast node
//!   (a plain copy) in front of the op.
//!
//! Every rewrite here gives tract's own bits (tests/runtime_rewrites.rs; the quantized latte
//! trajectories of tests/quantize.rs amplify any rounding difference, and they are unchanged).
//!
//! Tried and left out: keeping tract from splitting a product whose contracted axis comes from a
//! `Concat` into one product per part plus a sum (RoPE's interleaved pairs make every attention
//! score product two half-depth products): 5% faster on wan-small, but a different order of
//! summation, which moved the INT8 + PAB latte trajectory from cosine 0.99607 to 0.99518. And
//! tract's fused attention (`Sdpa`, lowered to its flash kernel) in place of
//! decomposed attention ran wan-small 2.8x slower per call (104 against 37 ms) and latte-tiny no
//! faster; its blocks are sized for long sequences.

use anyhow::{anyhow, Result};
use tract_onnx::prelude::{tvec, SpecialOps, Tensor as TractTensor, TypedModel, TypedModelPatch};
use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::konst::Const;

use crate::ir::{AttrValue, Attribute, Model};

/// Constants larger than this many elements once broadcast stay as they are (planning memory).
const EXPAND_LIMIT: usize = 1 << 22;

/// Replace every one-input `Einsum` whose equation only permutes axes by the equal `Transpose`.
pub fn einsums_to_transposes(model: &mut Model) {
    for node in &mut model.graph.nodes {
        if node.op_type != "Einsum" || !node.domain.is_empty() || node.inputs.len() != 1 {
            continue;
        }
        let Some(perm) = node
            .attr_string("equation")
            .and_then(|e| permutation_of(&e))
        else {
            continue;
        };
        node.op_type = "Transpose".into();
        node.attributes = vec![Attribute {
            name: "perm".into(),
            value: AttrValue::Ints(perm),
        }];
    }
}

/// The permutation an einsum equation such as `nhwpqc->nchpwq` applies, if it is one: one input,
/// distinct labels, the output a reordering of them (no ellipsis, no reduction, no diagonal).
fn permutation_of(equation: &str) -> Option<Vec<i64>> {
    let equation: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (input, output) = equation.split_once("->")?;
    let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphabetic());
    if !ok(input) || !ok(output) || input.len() != output.len() {
        return None;
    }
    let labels: Vec<char> = input.chars().collect();
    let mut seen = std::collections::HashSet::new();
    if !labels.iter().all(|c| seen.insert(*c)) {
        return None;
    }
    output
        .chars()
        .map(|c| labels.iter().position(|&l| l == c).map(|p| p as i64))
        .collect::<Option<Vec<i64>>>()
        .filter(|perm| {
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            sorted.iter().enumerate().all(|(i, &p)| p == i as i64)
        })
}

/// Broadcast, to the op's output shape, every operand of an element-wise binary op that tract's
/// vectorised kernels cannot take as it is, where the other operand has that shape already.
pub fn expand_broadcast_operands(model: &mut TypedModel) -> Result<()> {
    let candidates: Vec<usize> = model
        .nodes
        .iter()
        .filter(|n| n.op_as::<TypedBinOp>().is_some() && n.inputs.len() == 2)
        .map(|n| n.id)
        .collect();
    for id in candidates {
        expand_one(model, id)
            .map_err(|e| anyhow!("preparing node '{}' for tract: {e:#}", model.nodes[id].name))?;
    }
    Ok(())
}

/// How one operand of a binary op reaches tract: as it is, as a constant broadcast at planning, or
/// through a broadcast node (a run-time value).
enum Operand {
    AsIs,
    Constant(TractTensor),
    Broadcast,
}

fn expand_one(model: &mut TypedModel, id: usize) -> Result<()> {
    let node = &model.nodes[id];
    let Some(output) = node.outputs[0].fact.shape.as_concrete().map(|s| s.to_vec()) else {
        return Ok(());
    };
    if output.iter().product::<usize>() > EXPAND_LIMIT {
        return Ok(());
    }
    let mut operands = vec![Operand::AsIs, Operand::AsIs];
    for (slot, operand) in operands.iter_mut().enumerate() {
        let fact = model.outlet_fact(node.inputs[slot])?;
        let other = model.outlet_fact(node.inputs[1 - slot])?;
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if shape.len() != output.len()
            || fast_broadcast(shape, &output)
            || other.shape.as_concrete() != Some(&output[..])
        {
            continue;
        }
        *operand = match model.node(node.inputs[slot].node).op_as::<Const>() {
            Some(konst) => Operand::Constant(konst.val().broadcast_to_shape(&output)?),
            None => Operand::Broadcast,
        };
    }
    if operands.iter().all(|o| matches!(o, Operand::AsIs)) {
        return Ok(());
    }
    let (name, op, inputs) = (node.name.clone(), node.op.clone(), node.inputs.clone());
    let mut patch = TypedModelPatch::default();
    let mut wires = tvec![];
    for (slot, operand) in operands.into_iter().enumerate() {
        let wire = match operand {
            Operand::AsIs => patch.tap_model(model, inputs[slot])?,
            Operand::Constant(t) => patch.add_const(format!("{name}.expanded.{slot}"), t)?,
            Operand::Broadcast => {
                let tap = patch.tap_model(model, inputs[slot])?;
                let to = MultiBroadcastTo {
                    shape: output.iter().copied().collect(),
                };
                patch.wire_node(format!("{name}.broadcast.{slot}"), to, &[tap])?[0]
            }
        };
        wires.push(wire);
    }
    let out = patch.wire_node(&name, op, &wires)?;
    patch.shunt_outside(model, id.into(), out[0])?;
    patch.apply(model)?;
    Ok(())
}

/// Whether tract's vectorised kernels take `operand` against `output` as it is: equal shapes, a
/// row repeated over leading axes (unicast), or one value per leading index (by scalar).
fn fast_broadcast(operand: &[usize], output: &[usize]) -> bool {
    let leading_ones = operand.iter().take_while(|&&d| d == 1).count();
    let unicast = operand[leading_ones..] == output[leading_ones..];
    let equal_prefix = operand
        .iter()
        .zip(output)
        .take_while(|(a, b)| a == b)
        .count();
    let by_scalar = operand[equal_prefix..].iter().all(|&d| d == 1);
    unicast || by_scalar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn einsum_permutations_are_recognised() {
        assert_eq!(
            permutation_of("nhwpqc->nchpwq"),
            Some(vec![0, 5, 1, 3, 2, 4])
        );
        assert_eq!(permutation_of("ij->ji"), Some(vec![1, 0]));
        // Not permutations: a reduction, a diagonal, a product, an ellipsis.
        assert_eq!(permutation_of("ij->i"), None);
        assert_eq!(permutation_of("ii->i"), None);
        assert_eq!(permutation_of("ij,jk->ik"), None);
        assert_eq!(permutation_of("...ij->...ji"), None);
    }

    #[test]
    fn fast_broadcast_shapes() {
        assert!(fast_broadcast(&[1, 1, 8], &[2, 4, 8]));
        assert!(fast_broadcast(&[2, 4, 1], &[2, 4, 8]));
        assert!(fast_broadcast(&[2, 4, 8], &[2, 4, 8]));
        // RoPE's tables: broadcast over the heads axis in the middle.
        assert!(!fast_broadcast(&[1, 512, 1, 16, 1], &[1, 512, 4, 16, 1]));
    }
}
