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

/// Latte's temporal attention shapes (a batch of tokens x 4 heads, 8 frames, 16 dims): the score
/// and value products run as the runtime's small-tile product, bit for bit what tract's own kernels
/// give, and the attention against the same computed in f64.
#[test]
fn short_attention_runs_on_the_small_product_bit_for_bit() {
    let (b, h, s, d) = (16usize, 4usize, 8usize, 16usize);
    let q = values(b * h * s * d, 3);
    let kt = values(b * h * d * s, 9);
    let v = values(b * h * s * d, 21);
    let shape = |x: &[usize]| x.iter().map(|&v| v as i64).collect::<Vec<_>>();
    let model = Model::new(
        Graph {
            inputs: vec![
                ValueInfo::tensor("q", DataType::F32, dims(&shape(&[b, h, s, d]))),
                ValueInfo::tensor("kt", DataType::F32, dims(&shape(&[b, h, d, s]))),
                ValueInfo::tensor("v", DataType::F32, dims(&shape(&[b, h, s, d]))),
            ],
            outputs: vec![ValueInfo::tensor(
                "y",
                DataType::F32,
                dims(&shape(&[b, h, s, d])),
            )],
            nodes: vec![
                Node::new("qk", "MatMul", &["q", "kt"], &["scores"]),
                {
                    let mut n = Node::new("softmax", "Softmax", &["scores"], &["p"]);
                    n.attributes.push(Attribute {
                        name: "axis".into(),
                        value: AttrValue::Int(-1),
                    });
                    n
                },
                Node::new("pv", "MatMul", &["p", "v"], &["y"]),
            ],
            ..Graph::default()
        },
        17,
    );
    let feed = [
        Tensor::from_f32("q", shape(&[b, h, s, d]), &q),
        Tensor::from_f32("kt", shape(&[b, h, d, s]), &kt),
        Tensor::from_f32("v", shape(&[b, h, s, d]), &v),
    ];
    let ops = TractRunner::new(&model, &feed).unwrap().plan_ops();
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    assert_eq!(count("SmallMatMul"), 2, "{ops:?}");
    let got = run_once(&model, &feed).unwrap()[0].to_f32_vec().unwrap();
    // Bit for bit what tract's own kernels give.
    let tract_alone = TractRunner::without_rewrites(&model, &feed).unwrap();
    assert!(!tract_alone.plan_ops().iter().any(|o| o == "SmallMatMul"));
    let reference = tract_alone.run(&feed).unwrap()[0].to_f32_vec().unwrap();
    let differing = got.iter().zip(&reference).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing,
        0,
        "{differing} of {} values differ from tract's",
        got.len()
    );
    let (mut worst, mut largest) = (0f64, 0f64);
    for bh in 0..b * h {
        for i in 0..s {
            let scores: Vec<f64> = (0..s)
                .map(|j| {
                    (0..d)
                        .map(|k| q[(bh * s + i) * d + k] as f64 * kt[(bh * d + k) * s + j] as f64)
                        .sum()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for k in 0..d {
                let want: f64 = (0..s)
                    .map(|j| e[j] / sum * v[(bh * s + j) * d + k] as f64)
                    .sum();
                let have = got[(bh * s + i) * d + k] as f64;
                worst = worst.max((have - want).abs());
                largest = largest.max(want.abs());
            }
        }
    }
    let relative = worst / largest;
    println!("small kernels vs f64: max error / max value {relative:.2e}");
    assert!(relative < 1e-6, "{relative:.2e}");
}

/// Wan's score product after RoPE: queries and keys `[1, S, H, D/2, 2]`, their halves concatenated
/// along the depth, `Einsum(ambck,anbck->bmn)`. tract splits it into two half-depth products and a
/// sum; the runtime computes both halves of each output tile at once, bit for bit what tract's own
/// plan gives, and the scores against f64. S = 258 (the runtime takes products of 256x256 outputs
/// and more) leaves ragged tiles at every edge.
#[test]
fn rope_score_products_run_in_one_pass_bit_for_bit() {
    let (s, h, half) = (258usize, 2usize, 16usize);
    let shape = |x: &[usize]| x.iter().map(|&v| v as i64).collect::<Vec<_>>();
    let part = [1, s, h, half, 1];
    let names = ["q1", "q2", "k1", "k2"];
    let data: Vec<Vec<f32>> = (0..4)
        .map(|i| values(s * h * half, 31 + i as u32))
        .collect();
    let concat = |name: &str, a: &str, b: &str| {
        let mut n = Node::new(name, "Concat", &[a, b], &[name]);
        n.attributes.push(Attribute {
            name: "axis".into(),
            value: AttrValue::Int(3),
        });
        n
    };
    let mut einsum = Node::new("scores", "Einsum", &["q", "k"], &["y"]);
    einsum.attributes.push(Attribute {
        name: "equation".into(),
        value: AttrValue::String("ambck,anbck->bmn".into()),
    });
    let model = graph(
        names
            .iter()
            .map(|n| ValueInfo::tensor(n, DataType::F32, dims(&shape(&part))))
            .collect(),
        &shape(&[h, s, s]),
        vec![concat("q", "q1", "q2"), concat("k", "k1", "k2"), einsum],
        vec![],
    );
    let feed: Vec<Tensor> = names
        .iter()
        .zip(&data)
        .map(|(n, d)| Tensor::from_f32(n, shape(&part), d))
        .collect();
    let runner = TractRunner::new(&model, &feed).unwrap();
    let ops = runner.plan_ops();
    #[cfg(target_arch = "x86_64")]
    let have_fast_cpu = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let have_fast_cpu = false;
    if have_fast_cpu {
        assert!(ops.iter().any(|o| o == "TiledMatMul"), "{ops:?}");
    }
    let got = runner.run(&feed).unwrap()[0].to_f32_vec().unwrap();
    let tract_alone = TractRunner::without_rewrites(&model, &feed).unwrap();
    assert!(!tract_alone.plan_ops().iter().any(|o| o == "TiledMatMul"));
    let reference = tract_alone.run(&feed).unwrap()[0].to_f32_vec().unwrap();
    let differing = got.iter().zip(&reference).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} of {} differ", got.len());
    // q[0, i, head, d] with d over both halves, as the concat lays them out.
    let at = |part: &[Vec<f32>], i: usize, head: usize, d: usize| {
        part[d / half][(i * h + head) * half + d % half] as f64
    };
    let (mut worst, mut largest) = (0f64, 0f64);
    for head in 0..h {
        for i in 0..s {
            for j in 0..s {
                let want: f64 = (0..2 * half)
                    .map(|d| at(&data[..2], i, head, d) * at(&data[2..], j, head, d))
                    .sum();
                worst = worst.max((got[(head * s + i) * s + j] as f64 - want).abs());
                largest = largest.max(want.abs());
            }
        }
    }
    assert!(worst / largest < 1e-6, "{:.2e}", worst / largest);
}

/// Attention's probabilities times values at a long depth (`[H, S, S]` times `[S, H, D]`, as Wan's
/// `context` einsum `bmk,kbn->mbn`): the runtime's tiled product, bit for bit tract's own plan, and
/// against f64. 510 rows of 130 values leave ragged row and column tiles.
#[test]
fn value_products_run_tiled_bit_for_bit() {
    let (s, h, d) = (510usize, 2usize, 130usize);
    let shape = |x: &[usize]| x.iter().map(|&v| v as i64).collect::<Vec<_>>();
    let p = values(h * s * s, 41);
    let v = values(s * h * d, 43);
    let mut einsum = Node::new("context", "Einsum", &["p", "v"], &["y"]);
    einsum.attributes.push(Attribute {
        name: "equation".into(),
        value: AttrValue::String("bmk,kbn->mbn".into()),
    });
    let model = graph(
        vec![
            ValueInfo::tensor("p", DataType::F32, dims(&shape(&[h, s, s]))),
            ValueInfo::tensor("v", DataType::F32, dims(&shape(&[s, h, d]))),
        ],
        &shape(&[s, h, d]),
        vec![einsum],
        vec![],
    );
    let feed = [
        Tensor::from_f32("p", shape(&[h, s, s]), &p),
        Tensor::from_f32("v", shape(&[s, h, d]), &v),
    ];
    let runner = TractRunner::new(&model, &feed).unwrap();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let ops = runner.plan_ops();
        assert!(ops.iter().any(|o| o == "TiledMatMul"), "{ops:?}");
    }
    let got = runner.run(&feed).unwrap()[0].to_f32_vec().unwrap();
    let reference = TractRunner::without_rewrites(&model, &feed)
        .unwrap()
        .run(&feed)
        .unwrap()[0]
        .to_f32_vec()
        .unwrap();
    let differing = got.iter().zip(&reference).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} of {} differ", got.len());
    let (mut worst, mut largest) = (0f64, 0f64);
    for i in 0..s {
        for head in 0..h {
            for x in 0..d {
                let want: f64 = (0..s)
                    .map(|j| p[(head * s + i) * s + j] as f64 * v[(j * h + head) * d + x] as f64)
                    .sum();
                worst = worst.max((got[(i * h + head) * d + x] as f64 - want).abs());
                largest = largest.max(want.abs());
            }
        }
    }
    assert!(worst / largest < 1e-5, "{:.2e}", worst / largest);
}

/// Softmaxes over short last axes (rows of 1 to 40 values, some entries -inf as masks leave them,
/// an odd number of rows so that rows start at every alignment): the runtime's short-row softmax,
/// bit for bit tract's own plan, and against f64.
#[test]
fn short_row_softmaxes_give_tract_bits() {
    for row in 1..=40usize {
        let rows = 37usize;
        let shape = [rows as i64, row as i64];
        let mut x: Vec<f32> = values(rows * row, 50 + row as u32)
            .iter()
            .map(|v| v * 12.0)
            .collect();
        for (i, v) in x.iter_mut().enumerate() {
            if i % 7 == 3 && row > 1 {
                *v = f32::NEG_INFINITY;
            }
        }
        let mut softmax = Node::new("softmax", "Softmax", &["x"], &["y"]);
        softmax.attributes.push(Attribute {
            name: "axis".into(),
            value: AttrValue::Int(-1),
        });
        let model = graph(
            vec![ValueInfo::tensor("x", DataType::F32, dims(&shape))],
            &shape,
            vec![softmax],
            vec![],
        );
        let feed = [Tensor::from_f32("x", shape.to_vec(), &x)];
        let runner = TractRunner::new(&model, &feed).unwrap();
        #[cfg(target_arch = "x86_64")]
        if row < 32 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let ops = runner.plan_ops();
            assert!(ops.iter().any(|o| o == "ShortSoftmax"), "{row}: {ops:?}");
        }
        let got = runner.run(&feed).unwrap()[0].to_f32_vec().unwrap();
        let reference = TractRunner::without_rewrites(&model, &feed)
            .unwrap()
            .run(&feed)
            .unwrap()[0]
            .to_f32_vec()
            .unwrap();
        let differing = got
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "rows of {row}: {differing} values differ");
        for (r, chunk) in x.chunks(row).enumerate() {
            let max = chunk.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let e: Vec<f64> = chunk.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (c, e) in e.iter().enumerate() {
                let have = got[r * row + c] as f64;
                assert!(
                    (have - e / sum).abs() < 1e-6,
                    "row {r}, {c}: {have} vs {}",
                    e / sum
                );
            }
        }
    }
}

/// RoPE's split of `[1, S, H, D/2, 2]` pairs into even and odd halves (`Split` on the last axis):
/// the runtime's narrow-slice copy puts every value where the slices say.
#[test]
fn narrow_slices_copy_every_value_where_the_slice_says() {
    let shape = [1usize, 7, 3, 5, 2];
    let x = values(shape.iter().product(), 61);
    let as_i64 = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let mut split = Node::new("split", "Split", &["x"], &["even", "odd"]);
    split.attributes.push(Attribute {
        name: "axis".into(),
        value: AttrValue::Int(4),
    });
    split.attributes.push(Attribute {
        name: "num_outputs".into(),
        value: AttrValue::Int(2),
    });
    let half = [1i64, 7, 3, 5, 1];
    let model = Model::new(
        Graph {
            inputs: vec![ValueInfo::tensor("x", DataType::F32, dims(&as_i64(&shape)))],
            outputs: vec![
                ValueInfo::tensor("even", DataType::F32, dims(&half)),
                ValueInfo::tensor("odd", DataType::F32, dims(&half)),
            ],
            nodes: vec![split],
            ..Graph::default()
        },
        18,
    );
    let feed = [Tensor::from_f32("x", as_i64(&shape), &x)];
    let runner = TractRunner::new(&model, &feed).unwrap();
    let ops = runner.plan_ops();
    assert_eq!(
        ops.iter().filter(|o| *o == "NarrowSlice").count(),
        2,
        "{ops:?}"
    );
    let out = runner.run(&feed).unwrap();
    for (which, tensor) in out.iter().enumerate() {
        let got = tensor.to_f32_vec().unwrap();
        for (i, v) in got.iter().enumerate() {
            assert_eq!(*v, x[2 * i + which], "output {which}, value {i}");
        }
    }
}

/// A DiT block's element-wise strings: the tanh GELU of the feed-forward (`h` used four times),
/// then adaLN's `y * (1 + scale) + shift` with per-frame `[F, 1, C]` operands broadcast over the
/// tokens, an `Abs` (a unary op run through tract's generic in-place evaluation) and a division.
/// The runtime runs each string as one `FusedElementwise` (two groups:
/// the GELU output also leaves the graph), bit for bit what tract's own ops give, and against f64.
#[test]
fn element_wise_strings_run_fused_bit_for_bit() {
    let (f, n, c) = (3usize, 37usize, 24usize);
    let full = [f as i64, n as i64, c as i64];
    let per_frame = [f as i64, 1, c as i64];
    let h: Vec<f32> = values(f * n * c, 5).iter().map(|v| v * 4.0).collect();
    let scale = values(f * c, 17);
    let shift = values(f * c, 19);
    let scalar = |name: &str, v: f32| Tensor::from_f32(name, vec![], &[v]);
    let mut model = graph(
        vec![
            ValueInfo::tensor("h", DataType::F32, dims(&full)),
            ValueInfo::tensor("scale", DataType::F32, dims(&per_frame)),
            ValueInfo::tensor("shift", DataType::F32, dims(&per_frame)),
        ],
        &full,
        vec![
            Node::new("sq", "Mul", &["h", "h"], &["h2"]),
            Node::new("cube", "Mul", &["h", "h2"], &["h3"]),
            Node::new("k", "Mul", &["c0", "h3"], &["t"]),
            Node::new("inner", "Add", &["h", "t"], &["a"]),
            Node::new("s", "Mul", &["c1", "a"], &["b"]),
            Node::new("tanh", "Tanh", &["b"], &["th"]),
            Node::new("one", "Add", &["c2", "th"], &["u"]),
            Node::new("hu", "Mul", &["h", "u"], &["w"]),
            Node::new("half", "Mul", &["c3", "w"], &["gelu"]),
            Node::new("onep", "Add", &["scale", "c2"], &["sc1"]),
            Node::new("mod", "Mul", &["gelu", "sc1"], &["m"]),
            Node::new("add_shift", "Add", &["m", "shift"], &["ms"]),
            Node::new("abs", "Abs", &["ms"], &["ams"]),
            Node::new("div", "Div", &["ams", "c4"], &["y"]),
        ],
        vec![
            scalar("c0", 0.044715),
            scalar("c1", 0.797_884_6),
            scalar("c2", 1.0),
            scalar("c3", 0.5),
            scalar("c4", 3.0),
        ],
    );
    model
        .graph
        .outputs
        .push(ValueInfo::tensor("gelu", DataType::F32, dims(&full)));
    let feed = [
        Tensor::from_f32("h", full.to_vec(), &h),
        Tensor::from_f32("scale", per_frame.to_vec(), &scale),
        Tensor::from_f32("shift", per_frame.to_vec(), &shift),
    ];
    let runner = TractRunner::new(&model, &feed).unwrap();
    let ops = runner.plan_ops();
    let fused = ops.iter().filter(|o| *o == "FusedElementwise").count();
    assert_eq!(fused, 2, "{ops:?}");
    assert!(!ops.iter().any(|o| o == "Tanh"), "{ops:?}");
    let got = runner.run(&feed).unwrap();
    let reference = TractRunner::without_rewrites(&model, &feed)
        .unwrap()
        .run(&feed)
        .unwrap();
    for (g, r) in got.iter().zip(&reference) {
        let (g, r) = (g.to_f32_vec().unwrap(), r.to_f32_vec().unwrap());
        let differing = g
            .iter()
            .zip(&r)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{differing} of {} values differ", g.len());
    }
    let (y, gelu) = (got[0].to_f32_vec().unwrap(), got[1].to_f32_vec().unwrap());
    for (flat, ix) in indices(&[f, n, c]).iter().enumerate() {
        let x = h[flat] as f64;
        let want_gelu = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        let pf = at(&[f, 1, c], ix);
        let want = (want_gelu * (1.0 + scale[pf] as f64) + shift[pf] as f64).abs() / 3.0;
        assert!((gelu[flat] as f64 - want_gelu).abs() < 1e-5, "gelu {ix:?}");
        assert!(
            (y[flat] as f64 - want).abs() < 1e-5,
            "y {ix:?}: {} vs {want}",
            y[flat]
        );
    }
}
