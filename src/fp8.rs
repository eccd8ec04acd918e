//! FLOAT8 E4M3FN: conversion, and the emulation that lets tract verify FP8 graphs.
//!
//! tract cannot run FLOAT8 tensors. To verify an FP8 graph, [`emulate`] rewrites it into an equivalent
//! f32 graph: every `DequantizeLinear` of a FLOAT8 weight becomes the decoded f32 constant (exact), and
//! every `QuantizeLinear -> DequantizeLinear` pair to FLOAT8 becomes `s * round_e4m3(x / s)` written with
//! standard ops (exponent from `Log`, corrected at powers of two; `Round` is half-to-even; saturate at
//! ±448). Results are what an FP8 run computes, in f32.

use anyhow::{bail, Result};
use bytes::Bytes;

use crate::ir::{AttrValue, DataType, Graph, Model, Node, Tensor};

pub const E4M3_MAX: f32 = 448.0;

/// Round `x` to the nearest E4M3FN value (half to even), saturating at ±448; NaN stays NaN.
pub fn round_e4m3(x: f32) -> f32 {
    decode(encode(x))
}

/// f32 -> E4M3FN bits (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities; saturating).
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // Smallest exponent of a normal number is -6; below that the quantum is 2^-9 (subnormals).
    let e = if a >= 2f32.powi(-6) {
        a.log2().floor() as i32
    } else {
        -6
    };
    let e = if 2f32.powi(e + 1) <= a {
        e + 1
    } else if 2f32.powi(e) > a && e > -6 {
        e - 1
    } else {
        e
    };
    let quantum = 2f32.powi(e.max(-6) - 3);
    let m = (a / quantum).round_ties_even() as u32; // 8..=16 for normals, 0..=8 for subnormals
    let (mut exp, mut mant) = if a < 2f32.powi(-6) {
        (0u32, m)
    } else {
        ((e + 7) as u32, m - 8)
    };
    if a < 2f32.powi(-6) && m == 8 {
        (exp, mant) = (1, 0); // rounded up to the smallest normal
    } else if mant == 8 {
        (exp, mant) = (exp + 1, 0);
    }
    if exp > 15 || (exp == 15 && mant == 7) {
        (exp, mant) = (15, 6); // saturate to 448 (0x7E); 0x7F is NaN
    }
    sign | ((exp as u8) << 3) | mant as u8
}

/// E4M3FN bits -> f32.
pub fn decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, mant) = ((b >> 3) & 0x0F, b & 0x07);
    if exp == 15 && mant == 7 {
        return f32::NAN;
    }
    let v = if exp == 0 {
        mant as f32 * 2f32.powi(-9)
    } else {
        (1.0 + mant as f32 / 8.0) * 2f32.powi(exp as i32 - 7)
    };
    sign * v
}

pub fn encode_tensor(name: &str, dims: Vec<i64>, values: &[f32]) -> Result<Tensor> {
    Tensor::from_raw(
        name,
        DataType::F8E4M3FN,
        dims,
        Bytes::from(values.iter().map(|&v| encode(v)).collect::<Vec<u8>>()),
    )
}

/// True if the model holds FLOAT8 Q/DQ that tract cannot run.
pub fn needs_emulation(model: &Model) -> bool {
    model
        .graph
        .initializers
        .iter()
        .any(|t| t.dtype == DataType::F8E4M3FN)
}

/// Rewrite FLOAT8 Q/DQ into the equivalent f32 computation (see the module docs).
pub fn emulate(model: &Model) -> Result<Model> {
    let mut m = model.clone();
    let g = &mut m.graph;
    let mut new_inits = Vec::new();
    let old = std::mem::take(&mut g.nodes);
    g.nodes = emulate_nodes(old, g, &mut new_inits)?;
    g.initializers.extend(new_inits);
    g.initializers.retain(|t| t.dtype != DataType::F8E4M3FN);
    crate::ir::remove_unused_initializers(g);
    crate::ir::check_graph(g)?;
    Ok(m)
}

/// The emulation of `nodes` (the top-level graph's or a subgraph's: the FP8 initializers and
/// scales are the top-level graph's `top`, where the new f32 initializers go too, visible to every
/// subgraph).
fn emulate_nodes(old: Vec<Node>, top: &Graph, new_inits: &mut Vec<Tensor>) -> Result<Vec<Node>> {
    let is_f8 = |name: &str| {
        top.initializer(name)
            .is_some_and(|t| t.dtype == DataType::F8E4M3FN)
    };
    let mut nodes = Vec::with_capacity(old.len());
    for mut node in old {
        match node.op_type.as_str() {
            "DequantizeLinear" if is_f8(&node.inputs[0]) => {
                let w = top.initializer(&node.inputs[0]).expect("checked").clone();
                let s = top
                    .initializer(&node.inputs[1])
                    .and_then(|t| t.to_f32_vec());
                let Some(s) = s.filter(|s| s.len() == 1) else {
                    bail!(
                        "FP8 emulation: node {} needs a constant per-tensor scale",
                        node.label()
                    );
                };
                let raw = w.raw().expect("raw");
                let values: Vec<f32> = raw.iter().map(|&b| decode(b) * s[0]).collect();
                new_inits.push(Tensor::from_f32(&node.outputs[0], w.dims.clone(), &values));
            }
            "QuantizeLinear" if node.inputs.get(2).is_some_and(|z| is_f8(z)) => {
                // Emitted as the whole fake-quant; the DequantizeLinear reading it becomes an Identity.
                nodes.extend(fake_quant_nodes(&node, new_inits));
            }
            "DequantizeLinear" if node.inputs.get(2).is_some_and(|z| is_f8(z)) => {
                nodes.push(Node::new(
                    &node.name,
                    "Identity",
                    &[&node.inputs[0]],
                    &[&node.outputs[0]],
                ));
            }
            _ => {
                // If branches (a schedule's) hold quantized layers too.
                for a in &mut node.attributes {
                    if let AttrValue::Graph(sub) = &mut a.value {
                        let inner = std::mem::take(&mut sub.nodes);
                        sub.nodes = emulate_nodes(inner, top, new_inits)?;
                    }
                }
                nodes.push(node)
            }
        }
    }
    Ok(nodes)
}

/// `y = s * clip(round(v / q) * q, ±448)` with `v = x / s`, `q = 2^(max(e, -6) - 3)`, `e = floor(log2|v|)`
/// corrected at powers of two.
fn fake_quant_nodes(q: &Node, inits: &mut Vec<Tensor>) -> Vec<Node> {
    let p = format!("{}.e4m3", q.name);
    let n = |suffix: &str| format!("{p}.{suffix}");
    let c = |inits: &mut Vec<Tensor>, suffix: &str, v: f32| {
        let name = n(suffix);
        inits.push(Tensor::from_f32(&name, vec![], &[v]));
        name
    };
    let (ln2, two, one, minus6, three, lo, hi) = (
        c(inits, "ln2", std::f32::consts::LN_2),
        c(inits, "two", 2.0),
        c(inits, "one", 1.0),
        c(inits, "minus6", -6.0),
        c(inits, "three", 3.0),
        c(inits, "lo", -E4M3_MAX),
        c(inits, "hi", E4M3_MAX),
    );
    let (x, s, out) = (
        q.inputs[0].as_str(),
        q.inputs[1].as_str(),
        q.outputs[0].as_str(),
    );
    let op = |name: &str, op: &str, ins: &[&str]| Node::new(&n(name), op, ins, &[&n(name)]);
    vec![
        op("v", "Div", &[x, s]),
        op("a", "Abs", &[&n("v")]),
        op("ln", "Log", &[&n("a")]),
        op("log2", "Div", &[&n("ln"), &ln2]),
        op("e0", "Floor", &[&n("log2")]),
        op("p0", "Pow", &[&two, &n("e0")]),
        op("e0p1", "Add", &[&n("e0"), &one]),
        op("p1", "Pow", &[&two, &n("e0p1")]),
        op("up", "LessOrEqual", &[&n("p1"), &n("a")]),
        op("upf", "Cast", &[&n("up")]).with_attr("to", AttrValue::Int(1)),
        op("down", "Greater", &[&n("p0"), &n("a")]),
        op("downf", "Cast", &[&n("down")]).with_attr("to", AttrValue::Int(1)),
        op("e1", "Add", &[&n("e0"), &n("upf")]),
        op("e2", "Sub", &[&n("e1"), &n("downf")]),
        op("e", "Max", &[&n("e2"), &minus6]),
        op("eq", "Sub", &[&n("e"), &three]),
        op("quantum", "Pow", &[&two, &n("eq")]),
        op("steps", "Div", &[&n("v"), &n("quantum")]),
        op("rounded", "Round", &[&n("steps")]),
        op("r", "Mul", &[&n("rounded"), &n("quantum")]),
        op("sat", "Clip", &[&n("r"), &lo, &hi]),
        Node::new(&n("y"), "Mul", &[&n("sat"), s], &[out]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        for (x, bits) in [
            (0.0f32, 0x00u8),
            (1.0, 0x38),
            (-2.0, 0xC0),
            (448.0, 0x7E),
            (1000.0, 0x7E),
            (2f32.powi(-9), 0x01),
            (2f32.powi(-6), 0x08),
            (0.875 * 2f32.powi(-6), 0x07),
        ] {
            assert_eq!(encode(x), bits, "{x}");
        }
        assert!(decode(0x7F).is_nan());
        for b in 0..=0x7Eu8 {
            assert_eq!(encode(decode(b)), b, "every value round-trips ({b:#x})");
        }
        // Ties go to even mantissas: 1.0625 is between 1.0 (0x38) and 1.125 (0x39).
        assert_eq!(encode(1.0625), 0x38);
        assert_eq!(encode(1.1875), 0x3A);
    }
}
