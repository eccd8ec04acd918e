//! `sparse-linear-attention`: the op's local function run by tract against an independent f64
//! implementation of block-sparse attention written here (SLA's top-k, SpargeAttn's cumulative mass
//! with its self-similarity guard, SLA's linear branch), hand-built cases with known answers, the pass
//! on latte-tiny (structure, lint, plugins, schema, top-k 1.0 = the dense graph), refusals, and the
//! fidelity of wan-small with the whole sampling loop.

mod common;

use common::{
    assert_refused, convert_wan_small, demo, ditc_ok, pseudo_random, repo_path, run_bundle,
};
use ditc::ir::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use ditc::passes::sparse_linear_attention::{function, DOMAIN, OP};

/// Geometry and options of one op call.
#[derive(Clone)]
struct Case {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    scale: f32,
    block_q: usize,
    block_k: usize,
    topk: f64,
    mass: Option<f64>,
    sim_threshold: f64,
    dense_steps: i64,
    step: i64,
    linear: bool,
}

impl Case {
    fn new(lq: usize, lk: usize, block_q: usize, block_k: usize, topk: f64) -> Case {
        Case {
            b: 1,
            h: 2,
            lq,
            lk,
            d: 8,
            scale: 1.0 / 8f32.sqrt(),
            block_q,
            block_k,
            topk,
            mass: None,
            sim_threshold: 0.6,
            dense_steps: 0,
            step: 0,
            linear: false,
        }
    }

    fn nk(&self) -> usize {
        self.lk.div_ceil(self.block_k)
    }

    fn nq(&self) -> usize {
        self.lq.div_ceil(self.block_q)
    }

    /// `max(1, floor(topk * Nk))`, in f64 as the pass computes it.
    fn keep(&self) -> usize {
        ((self.topk * self.nk() as f64).floor() as usize).clamp(1, self.nk())
    }
}

/// The tensors of one call: Q [B,H,Lq,D], K and V [B,H,Lk,D], proj_l W [D,D] and b [D].
struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
}

fn random_data(c: &Case, seed: &str) -> Data {
    let n = |l: usize| c.b * c.h * l * c.d;
    Data {
        q: pseudo_random(&format!("{seed}.q"), n(c.lq))
            .iter()
            .map(|x| 4.0 * x)
            .collect(),
        k: pseudo_random(&format!("{seed}.k"), n(c.lk))
            .iter()
            .map(|x| 4.0 * x)
            .collect(),
        v: pseudo_random(&format!("{seed}.v"), n(c.lk)),
        w: pseudo_random(&format!("{seed}.w"), c.d * c.d),
        bias: pseudo_random(&format!("{seed}.bias"), c.d),
    }
}

/// A model of one `SparseLinearAttention` node (with the pass's local function) over graph inputs.
fn op_model(c: &Case) -> Model {
    let (b, h, d) = (c.b as i64, c.h as i64, c.d as i64);
    let t = |name: &str, l: usize| {
        ValueInfo::tensor(
            name,
            DataType::F32,
            vec![
                Dim::Value(b),
                Dim::Value(h),
                Dim::Value(l as i64),
                Dim::Value(d),
            ],
        )
    };
    let mut node = Node::new(
        "sla",
        OP,
        &["Q", "K", "V", "step", "W", "bias"],
        &["O", "kept"],
    );
    node.domain = DOMAIN.into();
    let attrs = [
        ("scale", AttrValue::Float(c.scale)),
        ("block_q", AttrValue::Int(c.block_q as i64)),
        ("block_k", AttrValue::Int(c.block_k as i64)),
        ("topk", AttrValue::Float(c.topk as f32)),
        ("keep_blocks", AttrValue::Int(c.keep() as i64)),
        ("query_blocks", AttrValue::Int(c.nq() as i64)),
        ("key_blocks", AttrValue::Int(c.nk() as i64)),
        ("mass", AttrValue::Float(c.mass.unwrap_or(0.0) as f32)),
        ("sim_threshold", AttrValue::Float(c.sim_threshold as f32)),
        ("linear", AttrValue::Int(c.linear as i64)),
        ("dense_steps", AttrValue::Int(c.dense_steps)),
    ];
    for (name, value) in attrs {
        node = node.with_attr(name, value);
    }
    let graph = Graph {
        name: "sla".into(),
        inputs: vec![
            t("Q", c.lq),
            t("K", c.lk),
            t("V", c.lk),
            ValueInfo::tensor("step", DataType::I64, vec![]),
            ValueInfo::tensor("W", DataType::F32, vec![Dim::Value(d), Dim::Value(d)]),
            ValueInfo::tensor("bias", DataType::F32, vec![Dim::Value(d)]),
        ],
        outputs: vec![
            t("O", c.lq),
            ValueInfo::tensor("kept", DataType::I64, vec![]),
        ],
        nodes: vec![node],
        ..Graph::default()
    };
    let mut model = Model::new(graph, 17);
    model.opsets.push((DOMAIN.into(), 1));
    model.functions.push(function(17));
    model
}

/// Run the op's local function with tract: (O, kept).
fn run_op(c: &Case, x: &Data) -> (Vec<f32>, i64) {
    let dims = |l: usize| vec![c.b as i64, c.h as i64, l as i64, c.d as i64];
    let inputs = [
        Tensor::from_f32("Q", dims(c.lq), &x.q),
        Tensor::from_f32("K", dims(c.lk), &x.k),
        Tensor::from_f32("V", dims(c.lk), &x.v),
        Tensor::from_i64("step", vec![], &[c.step]),
        Tensor::from_f32("W", vec![c.d as i64, c.d as i64], &x.w),
        Tensor::from_f32("bias", vec![c.d as i64], &x.bias),
    ];
    let out = ditc::runtime::run_once(&op_model(c), &inputs).unwrap();
    let o = out.iter().find(|t| t.name == "O").unwrap();
    let kept = out.iter().find(|t| t.name == "kept").unwrap();
    (o.to_f32_vec().unwrap(), kept.to_i64_vec().unwrap()[0])
}

// ---- the independent f64 reference -------------------------------------------------------------

fn rows(x: &[f32], l: usize, d: usize, bh: usize) -> Vec<Vec<f64>> {
    (0..l)
        .map(|t| (0..d).map(|j| x[(bh * l + t) * d + j] as f64).collect())
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn block_means(x: &[Vec<f64>], block: usize) -> Vec<Vec<f64>> {
    x.chunks(block)
        .map(|rows| {
            let mut m = vec![0.0; rows[0].len()];
            for r in rows {
                for (a, v) in m.iter_mut().zip(r) {
                    *a += v;
                }
            }
            m.iter().map(|s| s / rows.len() as f64).collect()
        })
        .collect()
}

/// SpargeAttn's self-similarity: mean pairwise cosine of a block's rows (diagonal included).
fn similar(x: &[Vec<f64>], block: usize, threshold: f64) -> Vec<bool> {
    let unit: Vec<Vec<f64>> = x
        .iter()
        .map(|r| {
            let n = dot(r, r).sqrt().max(1e-30);
            r.iter().map(|v| v / n).collect()
        })
        .collect();
    block_means(&unit, block)
        .iter()
        .map(|m| dot(m, m) > threshold)
        .collect()
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Indices sorted by decreasing value, ties by the lower index (ONNX TopK's order).
fn order_desc(x: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap().then(a.cmp(&b)));
    idx
}

/// The block mask [B*H][Nq][Nk] the options select, in f64.
fn reference_mask(c: &Case, x: &Data) -> Vec<Vec<Vec<bool>>> {
    let (nq, nk) = (c.nq(), c.nk());
    (0..c.b * c.h)
        .map(|bh| {
            let q = rows(&x.q, c.lq, c.d, bh);
            let k = rows(&x.k, c.lk, c.d, bh);
            let mean: Vec<f64> = (0..c.d)
                .map(|j| k.iter().map(|r| r[j]).sum::<f64>() / c.lk as f64)
                .collect();
            let ks: Vec<Vec<f64>> = k
                .iter()
                .map(|r| r.iter().zip(&mean).map(|(a, m)| a - m).collect())
                .collect();
            let (pq, pk) = (block_means(&q, c.block_q), block_means(&ks, c.block_k));
            let (sim_q, sim_k) = (
                similar(&q, c.block_q, c.sim_threshold),
                similar(&ks, c.block_k, c.sim_threshold),
            );
            (0..nq)
                .map(|i| {
                    let scores: Vec<f64> = pk.iter().map(|p| dot(&pq[i], p)).collect();
                    let mut keep = vec![false; nk];
                    if c.step < c.dense_steps {
                        return vec![true; nk];
                    }
                    match c.mass {
                        None => {
                            for &j in order_desc(&scores).iter().take(c.keep()) {
                                keep[j] = true;
                            }
                        }
                        Some(mass) => {
                            let logits: Vec<f64> = (0..nk)
                                .map(|j| {
                                    if sim_k[j] {
                                        scores[j] * c.scale as f64
                                    } else {
                                        -1e30
                                    }
                                })
                                .collect();
                            let p = softmax(&logits);
                            let order = order_desc(&p);
                            let mut cdf = 0.0;
                            let mut count = 0;
                            for &j in &order {
                                cdf += p[j];
                                if cdf <= mass {
                                    count += 1;
                                }
                            }
                            for &j in order.iter().take(count.max(1)) {
                                keep[j] = true;
                            }
                            for j in 0..nk {
                                keep[j] |= !sim_k[j] || !sim_q[i];
                            }
                        }
                    }
                    keep
                })
                .collect()
        })
        .collect()
}

/// Block-sparse attention (plus the linear branch when on) under `mask`, in f64: (O, scores kept).
fn reference_attention(c: &Case, x: &Data, mask: &[Vec<Vec<bool>>]) -> (Vec<f64>, i64) {
    let mut out = vec![0.0; c.b * c.h * c.lq * c.d];
    let mut kept = 0i64;
    for (bh, blocks) in mask.iter().enumerate() {
        let (q, k, v) = (
            rows(&x.q, c.lq, c.d, bh),
            rows(&x.k, c.lk, c.d, bh),
            rows(&x.v, c.lk, c.d, bh),
        );
        let phi_k: Vec<Vec<f64>> = k.iter().map(|r| softmax(r)).collect();
        for (t, qt) in q.iter().enumerate() {
            let row = &blocks[t / c.block_q];
            let keys: Vec<usize> = (0..c.lk).filter(|&s| row[s / c.block_k]).collect();
            kept += keys.len() as i64;
            let logits: Vec<f64> = keys
                .iter()
                .map(|&s| dot(qt, &k[s]) * c.scale as f64)
                .collect();
            let p = softmax(&logits);
            let mut o = vec![0.0; c.d];
            for (w, &s) in p.iter().zip(&keys) {
                for (oj, vj) in o.iter_mut().zip(&v[s]) {
                    *oj += w * vj;
                }
            }
            if c.linear {
                let phi_q = softmax(qt);
                let weights: Vec<f64> = phi_k.iter().map(|pk| dot(&phi_q, pk)).collect();
                let denominator = 1e-5 + weights.iter().sum::<f64>();
                let mut ol = vec![0.0; c.d];
                for (w, vs) in weights.iter().zip(&v) {
                    for (l, vj) in ol.iter_mut().zip(vs) {
                        *l += w * vj / denominator;
                    }
                }
                for (j, oj) in o.iter_mut().enumerate() {
                    let row: Vec<f64> = (0..c.d).map(|m| x.w[j * c.d + m] as f64).collect();
                    *oj += dot(&ol, &row) + x.bias[j] as f64;
                }
            }
            let base = (bh * c.lq + t) * c.d;
            out[base..base + c.d].copy_from_slice(&o);
        }
    }
    (out, kept)
}

/// max |a - b| / max |b|.
fn relative_error(a: &[f32], b: &[f64]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f64::max)
}

fn all_blocks(c: &Case) -> Vec<Vec<Vec<bool>>> {
    vec![vec![vec![true; c.nk()]; c.nq()]; c.b * c.h]
}

// ---- the op against the reference ----------------------------------------------------------------

#[test]
fn topk_one_equals_dense_attention() {
    // 50 queries in blocks of 16 and 50 keys in blocks of 12: both last blocks are partial.
    let c = Case::new(50, 50, 16, 12, 1.0);
    let x = random_data(&c, "dense");
    let (o, kept) = run_op(&c, &x);
    let (dense, scores) = reference_attention(&c, &x, &all_blocks(&c));
    let err = relative_error(&o, &dense);
    println!("top-k 1.0 vs dense attention (f64): max error / max value {err:.2e}");
    assert!(err <= 1e-6, "{err}");
    assert_eq!(kept, scores);
    assert_eq!(kept, (c.b * c.h * c.lq * c.lk) as i64);
}

/// Keys whose blocks point along distinct axes, and queries whose blocks each point at one of them:
/// the right block per query block is known by construction.
#[test]
fn hand_built_blocks_are_masked_as_expected() {
    let mut c = Case::new(40, 36, 10, 9, 0.25); // 4 query blocks, 4 key blocks, 1 kept each
    c.h = 1;
    c.d = 4;
    let target = [2usize, 0, 3, 1];
    let mut x = random_data(&c, "hand");
    for s in 0..c.lk {
        for j in 0..c.d {
            let on = if j == s / c.block_k { 3.0 } else { 0.0 };
            x.k[s * c.d + j] = on + 0.05 * x.k[s * c.d + j];
        }
    }
    for t in 0..c.lq {
        for j in 0..c.d {
            let on = if j == target[t / c.block_q] { 2.0 } else { 0.0 };
            x.q[t * c.d + j] = on + 0.05 * x.q[t * c.d + j];
        }
    }
    let mut mask = all_blocks(&c);
    for (i, row) in mask[0].iter_mut().enumerate() {
        for (j, m) in row.iter_mut().enumerate() {
            *m = j == target[i];
        }
    }
    assert_eq!(
        reference_mask(&c, &x),
        mask,
        "the construction selects the target blocks"
    );
    let (o, kept) = run_op(&c, &x);
    let (expected, _) = reference_attention(&c, &x, &mask);
    let err = relative_error(&o, &expected);
    // Every query block keeps one key block of 9 keys: 40 x 9 scores.
    assert_eq!(kept, 40 * 9);
    let (dense, _) = reference_attention(&c, &x, &all_blocks(&c));
    let off = relative_error(&o, &dense);
    println!("hand-built mask: vs the known mask {err:.2e}, vs dense {off:.2e}");
    assert!(err <= 1e-6, "{err}");
    assert!(off > 1e-2, "the mask must matter: {off}");
}

#[test]
fn linear_branch_matches_a_direct_f64_computation() {
    let mut c = Case::new(33, 40, 8, 16, 0.5);
    c.linear = true;
    let x = random_data(&c, "linear");
    let (o, _) = run_op(&c, &x);
    let mask = reference_mask(&c, &x);
    let (expected, _) = reference_attention(&c, &x, &mask);
    let err = relative_error(&o, &expected);
    c.linear = false;
    let (without, _) = reference_attention(&c, &x, &mask);
    let moved = relative_error(
        &without.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        &expected,
    );
    println!(
        "sparse + linear branch vs f64: {err:.2e} (the branch moves the output by {moved:.2e})"
    );
    assert!(err <= 1e-5, "{err}");
    assert!(moved > 1e-2, "{moved}");
}

#[test]
fn the_function_body_matches_the_f64_reference_for_both_selections() {
    // Top-k over partial blocks.
    let c = Case::new(70, 70, 16, 16, 0.3);
    let x = random_data(&c, "topk");
    check_against_reference(&c, &x, "top-k 0.3");

    // Cumulative mass with the guard: key and query blocks along a block direction (self-similar)
    // except every third one, which is noise (not similar: always computed).
    let mut c = Case::new(72, 72, 12, 12, 1.0);
    c.mass = Some(0.6);
    c.sim_threshold = 0.5;
    let mut x = random_data(&c, "mass");
    let directions = pseudo_random("mass.directions", 6 * c.d);
    for bh in 0..c.b * c.h {
        for t in 0..c.lq {
            let block = t / 12;
            let strength = if block % 3 == 2 { 0.0 } else { 3.0 };
            for j in 0..c.d {
                let at = (bh * c.lq + t) * c.d + j;
                x.q[at] = strength * directions[block * c.d + j] + 0.3 * x.q[at];
                x.k[at] = strength * directions[((block + 1) % 6) * c.d + j] + 0.3 * x.k[at];
            }
        }
    }
    let mask = reference_mask(&c, &x);
    let kept: usize = mask.iter().flatten().flatten().filter(|&&m| m).count();
    let total = c.b * c.h * c.nq() * c.nk();
    println!("mass 0.6: {kept} of {total} blocks kept");
    assert!(
        kept > total / 3 && kept < total,
        "the case exercises the selection: {kept}/{total}"
    );
    // The guard decides some blocks: with every block counted as self-similar the mask differs.
    let mut unguarded = c.clone();
    unguarded.sim_threshold = -1.0;
    let without_guard: usize = reference_mask(&unguarded, &x)
        .iter()
        .flatten()
        .flatten()
        .filter(|&&m| m)
        .count();
    println!("mass 0.6 without the guard: {without_guard} blocks kept");
    assert!(without_guard < kept, "{without_guard} vs {kept}");
    check_against_reference(&unguarded, &x, "mass 0.6, no block forced");
    check_against_reference(&c, &x, "mass 0.6");
}

fn check_against_reference(c: &Case, x: &Data, label: &str) {
    let mask = reference_mask(c, x);
    let (expected, scores) = reference_attention(c, x, &mask);
    let (o, kept) = run_op(c, x);
    let err = relative_error(&o, &expected);
    println!("{label}: tract's function body vs f64 reference {err:.2e}, scores kept {kept} (reference {scores})");
    assert_eq!(kept, scores, "{label}");
    assert!(err <= 1e-5, "{label}: {err}");
}

#[test]
fn dense_steps_compute_every_block_before_the_step() {
    let mut c = Case::new(48, 48, 16, 16, 0.34);
    c.dense_steps = 3;
    let x = random_data(&c, "warmup");
    c.step = 2;
    let (early, kept_early) = run_op(&c, &x);
    c.step = 3;
    let (late, kept_late) = run_op(&c, &x);
    let (dense, _) = reference_attention(&c, &x, &all_blocks(&c));
    let mask = reference_mask(&c, &x);
    let (sparse, scores) = reference_attention(&c, &x, &mask);
    assert!(relative_error(&early, &dense) <= 1e-6);
    assert_eq!(kept_early, (c.b * c.h * 48 * 48) as i64);
    assert!(relative_error(&late, &sparse) <= 1e-6);
    assert_eq!(kept_late, scores);
    assert_eq!(scores, (c.b * c.h * 48 * 16) as i64, "1 of 3 key blocks");
}

#[test]
fn local_functions_are_inlined_with_caller_and_default_attributes() {
    use ditc::onnx::proto;
    // Scaled(X) = X * alpha, alpha defaulting to 2; called twice, once with alpha = 3.
    let reference = proto::AttributeProto {
        name: "value_float".into(),
        ref_attr_name: "alpha".into(),
        r#type: proto::attribute_type::FLOAT,
        ..Default::default()
    };
    let body = vec![
        Node::new("c", "Constant", &[], &["a"])
            .with_attr("value_float", AttrValue::Other(Box::new(reference))),
        Node::new("m", "Mul", &["X", "a"], &["Y"]),
    ];
    let f = proto::FunctionProto {
        name: "Scaled".into(),
        domain: "test.fn".into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute_proto: vec![proto::AttributeProto {
            name: "alpha".into(),
            r#type: proto::attribute_type::FLOAT,
            f: Some(2.0),
            ..Default::default()
        }],
        node: ditc::onnx::nodes_to_proto(&body),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        ..Default::default()
    };
    let call = |name: &str, out: &str| {
        let mut n = Node::new(name, "Scaled", &["x"], &[out]);
        n.domain = "test.fn".into();
        n
    };
    let vi = |n: &str| ValueInfo::tensor(n, DataType::F32, vec![Dim::Value(3)]);
    let graph = Graph {
        inputs: vec![vi("x")],
        outputs: vec![vi("by3"), vi("by2")],
        nodes: vec![
            call("first", "by3").with_attr("alpha", AttrValue::Float(3.0)),
            call("second", "by2"),
        ],
        ..Graph::default()
    };
    let mut model = Model::new(graph, 17);
    model.opsets.push(("test.fn".into(), 1));
    model.functions.push(f);
    // The function survives writing and reading back.
    let bytes = ditc::onnx::model_to_bytes_inline(&model).unwrap();
    let model = ditc::onnx::model_from_bytes(bytes.into(), std::path::Path::new(".")).unwrap();
    assert_eq!(model.functions.len(), 1);
    let x = Tensor::from_f32("x", vec![3], &[1.0, -2.0, 0.5]);
    let out = ditc::runtime::run_once(&model, &[x]).unwrap();
    let get = |n: &str| {
        out.iter()
            .find(|t| t.name == n)
            .unwrap()
            .to_f32_vec()
            .unwrap()
    };
    assert_eq!(get("by3"), vec![3.0, -6.0, 1.5]);
    assert_eq!(get("by2"), vec![2.0, -4.0, 1.0]);
}

// ---- the pass ----------------------------------------------------------------------------------

fn recipe(dir: &std::path::Path, options: &str) -> std::path::PathBuf {
    let path = dir.join("recipe.toml");
    let text = format!(
        "name = \"sla-test\"\nversion = 1\n[sampler]\nkind = \"ddim\"\nsteps = 10\nnum_train_timesteps = 1000\nbeta_schedule = \"linear\"\nbeta_start = 0.0001\nbeta_end = 0.02\n\n[[passes]]\nname = \"sparse-linear-attention\"\n[passes.options]\n{options}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn on_latte_tiny_the_pass_emits_one_plugin_node_per_site_and_topk_one_is_the_dense_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo().join("model.onnx");
    let convert = |options: &str, out: &str| {
        let out = tmp.path().join(out);
        let r = recipe(tmp.path(), options);
        ditc_ok(&[
            "convert",
            model.to_str().unwrap(),
            "--recipe",
            r.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-progress",
        ]);
        out
    };
    let dense = convert(
        "topk = 1.0\nblock_q = 16\nblock_k = 16\nkinds = [\"spatial\"]",
        "dense",
    );
    let sparse = convert(
        "topk = 0.25\nblock_q = 16\nblock_k = 16\nkinds = [\"spatial\"]",
        "sparse",
    );

    let bundle = ditc::onnx::read_model(&sparse.join("model.onnx")).unwrap();
    let ops: Vec<&Node> = bundle
        .graph
        .nodes
        .iter()
        .filter(|n| n.domain == DOMAIN && n.op_type == OP)
        .collect();
    assert_eq!(ops.len(), 4, "one node per spatial site");
    assert_eq!(bundle.functions.len(), 1);
    assert_eq!(
        (
            bundle.functions[0].domain.as_str(),
            bundle.functions[0].name.as_str()
        ),
        (DOMAIN, OP)
    );
    assert!(bundle.opsets.iter().any(|(d, v)| d == DOMAIN && *v == 1));
    for n in &ops {
        assert_eq!(n.attr_int("keep_blocks"), Some(1), "floor(0.25 * 4)");
        assert_eq!(n.attr_string("plugin_namespace").as_deref(), Some(DOMAIN));
    }
    // TensorRT: no violation, four plugin requirements; the manifest lists them, names the library.
    let violations = ditc::lint::lint(&bundle, ditc::lint::Target::Trt10, None);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(ditc::lint::plugin_nodes(&bundle).len(), 4);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sparse.join("manifest.json")).unwrap()).unwrap();
    assert!(ditc::manifest::validate_schema(&manifest).is_empty());
    assert_eq!(
        manifest["tensorrt"]["plugins"][0]["nodes"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert!(manifest["tensorrt"]["build_command"]
        .as_str()
        .unwrap()
        .contains("--staticPlugins=libditc_plugins.so"));
    let sites = manifest["sparse_attention"]["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 4);
    assert!(sites
        .iter()
        .all(|s| s["kind"] == "spatial" && s["key_blocks"] == 4));
    // `ditc inspect` finds the sparse nodes as sites (spatial, as before) with the cost model's
    // estimate at their static kept fraction (64 keys: below the 1024 where the model gives no gain).
    let report: serde_json::Value = serde_json::from_slice(&ditc_ok(&[
        "inspect",
        sparse.join("model.onnx").to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let sparse_sites: Vec<&serde_json::Value> = report["attention"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["anchor"].as_str().unwrap().starts_with("ditc.sla."))
        .collect();
    assert_eq!(sparse_sites.len(), 4);
    assert!(sparse_sites.iter().all(|s| s["kind"] == "spatial"));
    let estimates = report["h100_estimate"].as_array().unwrap();
    let kept: Vec<f64> = estimates
        .iter()
        .filter_map(|e| e["kept_fraction"].as_f64())
        .collect();
    assert_eq!(kept, vec![0.25; 4]);
    assert!(estimates
        .iter()
        .all(|e| e["estimated_ms"].as_f64() == e["dense_ms"].as_f64()));
    // Without the plugin TensorRT builds the function bodies: they pass the lint too, in both modes;
    // unmarked nodes need no plugin and the build command loads none.
    let inlined = ditc::ir::functions::inline_local_functions(&bundle).unwrap();
    assert!(
        inlined.functions.is_empty() && !inlined.graph.nodes.iter().any(|n| n.domain == DOMAIN)
    );
    let v = ditc::lint::lint(&inlined, ditc::lint::Target::Trt10, None);
    assert!(v.is_empty(), "{v:?}");
    let portable = convert(
        "mass = 0.9\nplugin = false\nblock_q = 16\nblock_k = 16\nkinds = [\"spatial\"]",
        "portable",
    );
    let mass_bundle = ditc::onnx::read_model(&portable.join("model.onnx")).unwrap();
    assert!(ditc::lint::plugin_nodes(&mass_bundle).is_empty());
    let inlined = ditc::ir::functions::inline_local_functions(&mass_bundle).unwrap();
    let v = ditc::lint::lint(&inlined, ditc::lint::Target::Trt10, None);
    assert!(v.is_empty(), "{v:?}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(portable.join("manifest.json")).unwrap()).unwrap();
    assert!(!m["tensorrt"]["build_command"]
        .as_str()
        .unwrap()
        .contains("--staticPlugins"));
    assert!(m["tensorrt"].get("plugins").is_none());
    // A node without its function is an unsupported op for TensorRT.
    let mut stripped = bundle.clone();
    stripped.functions.clear();
    let v = ditc::lint::lint(&stripped, ditc::lint::Target::Trt10, None);
    assert_eq!(v.iter().filter(|v| v.rule == "unsupported-op").count(), 4);

    // One model call: top-k 1.0 equals the source graph; top-k 0.25 does not.
    let verify = |b: &std::path::Path| -> f64 {
        let out = common::ditc(&[
            "verify",
            b.join("model.onnx").to_str().unwrap(),
            model.to_str().unwrap(),
            "--inputs",
            demo().join("io.safetensors").to_str().unwrap(),
            "--prefix",
            "0.",
            "--json",
            "--tolerance",
            "1",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        v[0]["rel_l2"].as_f64().unwrap()
    };
    let (same, moved) = (verify(&dense), verify(&sparse));
    println!("latte-tiny one call vs the source graph: top-k 1.0 rel-L2 {same:.2e}, top-k 0.25 {moved:.2e}");
    assert!(same <= 1e-6, "{same}");
    assert!(moved > 1e-3, "{moved}");
}

#[test]
fn bad_options_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo().join("model.onnx");
    let cases: &[(&str, &[&str])] = &[
        ("block_q = 0", &["block_q = 0", "at least 1"]),
        ("block_k = -4", &["block_k = -4"]),
        ("topk = 0.0", &["topk = 0", "(0, 1]"]),
        ("topk = 1.5", &["topk = 1.5", "(0, 1]"]),
        ("mass = 1.2", &["mass = 1.2"]),
        ("kinds = [\"cross\"]", &["cross-attention"]),
        ("sites = [\"attn2\"]", &["'attn2'", "cross-attention site"]),
        (
            "sites = [\"nowhere\"]",
            &["'nowhere' names no attention site"],
        ),
        (
            "dense_steps = 11",
            &["dense_steps = 11", "beyond the sampler's 10 steps"],
        ),
        (
            "kinds = [\"temporal\"]\nblock_k = 16",
            &["block_k = 16", "larger than its sequence", "8 keys"],
        ),
        ("topk_ratio = 0.2", &["unknown field", "topk_ratio"]),
    ];
    for (i, (options, expect)) in cases.iter().enumerate() {
        let r = recipe(tmp.path(), options);
        let out = tmp.path().join(format!("out{i}"));
        assert_refused(
            &[
                "convert",
                model.to_str().unwrap(),
                "--recipe",
                r.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--no-progress",
            ],
            expect,
        );
        assert!(!out.exists(), "{options}: nothing written");
    }
}

// ---- fidelity on wan-small -----------------------------------------------------------------------

/// Final latent of wan-small (CFG 5.0, 50 steps, case 0) with the recipe's sparse attention vs the
/// dense run: (PSNR, cosine, rel-L2, attention FLOPs kept).
pub fn wan_small_row(sets: &[&str], full: &[f32], dir: &std::path::Path) -> (f64, f64, f64, f64) {
    let example = repo_path("examples/wan-small");
    let m = convert_wan_small(&example, &repo_path("passes/wan-sla.toml"), sets, dir);
    assert!(ditc::manifest::validate_schema(&m).is_empty());
    let (latent, report) = run_bundle(
        &dir.join("manifest.json"),
        &example.join("inputs.safetensors"),
        "0.",
        false,
    );
    let f = ditc::metrics::compare(&latent, full);
    (
        f.psnr_db,
        f.cosine,
        f.rel_l2,
        report.attention_flops_kept_fraction,
    )
}

/// The attention FLOPs kept fraction a top-k run must report, from the manifest alone: sparse sites
/// keep `keep_blocks / key_blocks` of their score and value products at sparse steps and all of them
/// at dense warm-up steps; the other sites keep everything.
fn expected_kept_fraction(m: &serde_json::Value, steps: f64, dense_steps: f64) -> f64 {
    let sparse: std::collections::BTreeMap<u64, f64> = m["sparse_attention"]["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let f = s["keep_blocks"].as_f64().unwrap() / s["key_blocks"].as_f64().unwrap();
            (
                s["site"].as_u64().unwrap(),
                (dense_steps + (steps - dense_steps) * f) / steps,
            )
        })
        .collect();
    let (mut kept, mut total) = (0.0, 0.0);
    for site in m["dit_map"]["attention"].as_array().unwrap() {
        let flops = site["flops"].as_f64().unwrap();
        kept += flops * sparse.get(&site["id"].as_u64().unwrap()).unwrap_or(&1.0);
        total += flops;
    }
    kept / total
}

#[test]
fn wan_small_fidelity_rows_of_the_readme_table() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let dense_dir = tmp.path().join("dense");
    convert_wan_small(&example, &repo_path("passes/wan-cfg.toml"), &[], &dense_dir);
    let (full, _) = run_bundle(
        &dense_dir.join("manifest.json"),
        &example.join("inputs.safetensors"),
        "0.",
        false,
    );
    // (overrides, the README's PSNR, cosine, rel-L2; dense warm-up steps for the kept fraction)
    type Row<'a> = (&'a [&'a str], f64, f64, f64, Option<f64>);
    let rows: &[Row] = &[
        (
            &[
                "sparse-linear-attention.topk=0.5",
                "sparse-linear-attention.dense_steps=10",
            ],
            11.94,
            0.90235,
            0.4444,
            Some(10.0),
        ),
        (
            &["sparse-linear-attention.mass=0.9"],
            24.84,
            0.99493,
            0.1007,
            None,
        ),
    ];
    for (i, (sets, psnr_table, cos_table, rel_table, warm)) in rows.iter().enumerate() {
        let dir = tmp.path().join(format!("r{i}"));
        let (psnr, cosine, rel, kept) = wan_small_row(sets, &full, &dir);
        println!("{sets:?}: PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel:.4}, attention FLOPs kept {:.1}%", 100.0 * kept);
        assert!(
            (psnr - psnr_table).abs() <= 0.3,
            "{sets:?}: PSNR {psnr} vs {psnr_table}"
        );
        assert!(
            (cosine - cos_table).abs() <= 0.005,
            "{sets:?}: cosine {cosine} vs {cos_table}"
        );
        assert!(
            (rel - rel_table).abs() <= 0.01,
            "{sets:?}: rel-L2 {rel} vs {rel_table}"
        );
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        match warm {
            Some(w) => {
                let expected = expected_kept_fraction(&m, 50.0, *w);
                assert!(
                    (kept - expected).abs() < 1e-9,
                    "{sets:?}: kept {kept} vs {expected}"
                );
            }
            // Mass mode: value dependent; the table's 98.3%.
            None => assert!((kept - 0.983).abs() < 0.002, "{sets:?}: kept {kept}"),
        }
    }
}

/// onnx.proto is proto2: an attribute whose value is 0 must still be written (onnx's checker refuses
/// a `Constant` whose `value_int` / `value_float` field is absent, which a proto3 writer drops).
#[test]
fn zero_valued_attributes_are_written() {
    use prost::Message;
    let node = Node::new("c", "Constant", &[], &["zero"]).with_attr("value_int", AttrValue::Int(0));
    let f = Node::new("d", "Constant", &[], &["zero_f"])
        .with_attr("value_float", AttrValue::Float(0.0));
    let vi = |n: &str, t: DataType| ValueInfo::tensor(n, t, vec![]);
    let graph = Graph {
        outputs: vec![vi("zero", DataType::I64), vi("zero_f", DataType::F32)],
        nodes: vec![node, f],
        ..Graph::default()
    };
    let bytes = ditc::onnx::model_to_bytes_inline(&Model::new(graph, 17)).unwrap();
    let proto = ditc::onnx::proto::ModelProto::decode(&bytes[..]).unwrap();
    let g = proto.graph.unwrap();
    assert_eq!(g.node[0].attribute[0].i, Some(0));
    assert_eq!(g.node[1].attribute[0].f, Some(0.0));
}

#[test]
fn a_schedule_bakes_over_sparse_sites_but_not_the_other_way_round() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo().join("model.onnx");
    let sla = "[[passes]]\nname = \"sparse-linear-attention\"\n[passes.options]\ntopk = 0.5\nblock_q = 16\nblock_k = 16\nkinds = [\"spatial\"]\n";
    let pab = "[[passes]]\nname = \"broadcast-static\"\n[passes.options]\nspatial = { period = 2, window = [0, 1000] }\n";
    let sampler = "name = \"x\"\nversion = 1\n[sampler]\nkind = \"ddim\"\nsteps = 10\nnum_train_timesteps = 1000\nbeta_schedule = \"linear\"\nbeta_start = 0.0001\nbeta_end = 0.02\n";
    let convert = |i: usize, passes: &str| {
        let r = tmp.path().join(format!("r{i}.toml"));
        std::fs::write(&r, format!("{sampler}{passes}")).unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let args: Vec<String> = [
            "convert",
            model.to_str().unwrap(),
            "--recipe",
            r.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-progress",
        ]
        .map(String::from)
        .to_vec();
        (args, out)
    };
    // Sparse, then PAB: every sparse site counts its scores at the steps PAB's table computes it,
    // none at the others.
    let (args, out) = convert(0, &format!("{sla}{pab}"));
    ditc_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let table: Vec<bool> =
        serde_json::from_value(m["schedule"]["tables"]["spatial"].clone()).unwrap();
    let computed = table.iter().filter(|&&c| c).count() as u64;
    assert!(computed < table.len() as u64);
    let (_, report) = run_bundle(
        &out.join("manifest.json"),
        &demo().join("sampling.safetensors"),
        "0.",
        false,
    );
    let sites = m["sparse_attention"]["sites"].as_array().unwrap();
    assert_eq!(report.scheduled.sparse_sites.len(), sites.len());
    for site in sites {
        let id = site["site"].as_u64().unwrap() as usize;
        let run = &report.scheduled.sparse_sites[&id];
        assert_eq!(
            run.scores_dense,
            site["scores_dense"].as_u64().unwrap() * computed,
            "site {id}"
        );
        assert_eq!(
            run.kept_fraction, 0.5,
            "site {id}: top-k 0.5 of its key blocks"
        );
    }
    // PAB, then sparse: refused (the sites are in If branches).
    let (args, out) = convert(1, &format!("{pab}{sla}"));
    assert_refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["cannot be combined yet"],
    );
    assert!(!out.exists());
}
