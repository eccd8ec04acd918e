//! The runtime's rewrites of tract's copy of a graph (src/runtime/rewrite.rs) compute what the ONNX
//! says: each rewritten pattern against the same computation written out in plain Rust.

use ditc::ir::{AttrValue, Attribute, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use ditc::runtime::{run_once, TractRunner};

fn dims(d: &[i64]) -> Vec<Dim> {
    d.iter().map(|&v| Dim::Value(v)).collect()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn graph(inputs: Vec<ValueInfo>, out: &[i64], nodes: Vec<Node>, inits: Vec<Tensor>) -> Model {
    Model::new(
        Graph {
            inputs,
            outputs: vec![ValueInfo::tensor("y", DataType::F32, dims(out))],
            initializers: inits,
            nodes,
            ..Graph::default()
        },
        17,
    )
}

/// Row-major index of `ix` in `shape`, with broadcast (size-1) axes pinned to 0.
fn at(shape: &[usize], ix: &[usize]) -> usize {
    shape
        .iter()
        .zip(ix)
        .fold(0, |acc, (&d, &i)| acc * d + if d == 1 { 0 } else { i })
}

fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    for &d in shape {
        all = all
            .into_iter()
            .flat_map(|p| {
                (0..d).map(move |i| {
                    let mut q = p.clone();
                    q.push(i);
                    q
                })
            })
            .collect();
    }
    all
}

/// RoPE's pattern: x [1, S, H, D, 1] times a constant [1, S, 1, D, 1] and plus a run-time
/// [1, S, 1, D, 1] operand (both broadcast over the heads axis in the middle), as tract computes
/// them after the runtime expands the operands, against the broadcast written out.
#[test]
fn middle_axis_broadcasts_compute_the_broadcast() {
    let full = [1usize, 6, 3, 4, 1];
    let small = [1usize, 6, 1, 4, 1];
    let x = values(full.iter().product(), 7);
    let table = values(small.iter().product(), 11);
    let shift = values(small.iter().product(), 13);
    let as_i64 = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let model = graph(
        vec![
            ValueInfo::tensor("x", DataType::F32, dims(&as_i64(&full))),
            ValueInfo::tensor("shift", DataType::F32, dims(&as_i64(&small))),
        ],
        &as_i64(&full),
        vec![
            Node::new("mul", "Mul", &["x", "table"], &["xt"]),
            Node::new("add", "Add", &["shift", "xt"], &["y"]),
        ],
        vec![Tensor::from_f32("table", as_i64(&small), &table)],
    );
    let feed = [
        Tensor::from_f32("x", as_i64(&full), &x),
        Tensor::from_f32("shift", as_i64(&small), &shift),
    ];
    // tract's generic broadcasting `Mul`/`Add` are gone: both run on vectorised kernels.
    let ops = TractRunner::new(&model, &feed).unwrap().plan_ops();
    assert!(
        !ops.iter().any(|o| o == "Mul" || o == "Add"),
        "generic broadcasting ops left in {ops:?}"
    );
    let out = run_once(&model, &feed).unwrap();
    let got = out[0].to_f32_vec().unwrap();
    for (flat, ix) in indices(&full).iter().enumerate() {
        let want = shift[at(&small, ix)] + x[flat] * table[at(&small, ix)];
        assert_eq!(got[flat], want, "element {ix:?}");
    }
}

/// torch's unpatchify einsum (`nhwpqc->nchpwq`) becomes a transpose: every element where the
/// equation puts it.
#[test]
fn a_permuting_einsum_moves_every_element_where_its_equation_says() {
    let shape = [1usize, 2, 3, 2, 2, 4];
    let x = values(shape.iter().product(), 5);
    let as_i64 = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    // n h w p q c -> n c h p w q
    let out_shape = [1usize, 4, 2, 2, 3, 2];
    let mut einsum = Node::new("e", "Einsum", &["x"], &["y"]);
    einsum.attributes.push(Attribute {
        name: "equation".into(),
        value: AttrValue::String("nhwpqc->nchpwq".into()),
    });
    let model = graph(
        vec![ValueInfo::tensor("x", DataType::F32, dims(&as_i64(&shape)))],
        &as_i64(&out_shape),
        vec![einsum],
        vec![],
    );
    let feed = [Tensor::from_f32("x", as_i64(&shape), &x)];
    let ops = TractRunner::new(&model, &feed).unwrap().plan_ops();
    assert!(!ops.iter().any(|o| o == "EinSum"), "einsum left in {ops:?}");
    let out = run_once(&model, &feed).unwrap();
    assert_eq!(out[0].dims, as_i64(&out_shape));
    let got = out[0].to_f32_vec().unwrap();
    for (flat, o) in indices(&out_shape).iter().enumerate() {
        let (n, c, h, p, w, q) = (o[0], o[1], o[2], o[3], o[4], o[5]);
        assert_eq!(
            got[flat],
            x[at(&shape, &[n, h, w, p, q, c])],
            "element {o:?}"
        );
    }
}
