//! Attention classification on graphs built here, where the right answer is known by construction.
//!
//! The latent is `[1, C, F, H, W]` with F = H*W = 4, so frames and pixels have the same count: a
//! classifier that looked at sequence lengths (or names, which are meaningless here) could not tell
//! spatial from temporal attention.

use std::path::Path;

use ditc::analysis::{analyse, AttentionKind};
use ditc::ir::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use ditc::runtime::run_once;

const C: i64 = 8;
const F: i64 = 4;
const H: i64 = 2;
const W: i64 = 2;
const HEADS: i64 = 2;
const TEXT: i64 = 3;

struct Builder {
    graph: Graph,
    next: usize,
}

impl Builder {
    fn new() -> Builder {
        let dims = |v: &[i64]| v.iter().map(|&d| Dim::Value(d)).collect();
        Builder {
            graph: Graph {
                name: "synthetic".into(),
                inputs: vec![
                    ValueInfo::tensor("latent", DataType::F32, dims(&[1, C, F, H, W])),
                    ValueInfo::tensor("text", DataType::F32, dims(&[1, TEXT, C])),
                ],
                ..Graph::default()
            },
            next: 0,
        }
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>) -> String {
        let out = self.fresh("v");
        let name = self.fresh("n");
        let mut n = Node::new(&name, op, inputs, &[&out]);
        for (k, v) in attrs {
            n = n.with_attr(k, v);
        }
        self.graph.nodes.push(n);
        out
    }

    fn constant_i64(&mut self, values: &[i64]) -> String {
        let name = self.fresh("shape");
        self.graph
            .initializers
            .push(Tensor::from_i64(&name, vec![values.len() as i64], values));
        name
    }

    fn weight(&mut self, rows: i64, cols: i64) -> String {
        let name = self.fresh("w");
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 40.0)
            .collect();
        self.graph
            .initializers
            .push(Tensor::from_f32(&name, vec![rows, cols], &values));
        name
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.constant_i64(shape);
        self.node("Reshape", &[x, &s], vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node(
            "Transpose",
            &[x],
            vec![("perm", AttrValue::Ints(perm.to_vec()))],
        )
    }

    fn linear(&mut self, x: &str) -> String {
        let w = self.weight(C, C);
        self.node("MatMul", &[x, &w], vec![])
    }

    /// Tokens `[batch, seq, C]` from the latent, sequence over `seq_axes` of (F, H, W).
    fn tokens(&mut self, perm: &[i64], batch: i64, seq: i64) -> String {
        let t = self.transpose("latent", perm);
        self.reshape(&t, &[batch, seq, C])
    }

    /// Decomposed multi-head attention: `[b, s, C]` queries against `[b, s', C]` keys/values.
    fn attention(&mut self, q_in: &str, kv_in: &str, b: i64, sq: i64, sk: i64) -> String {
        let d = C / HEADS;
        let q = self.linear(q_in);
        let k = self.linear(kv_in);
        let v = self.linear(kv_in);
        let q = self.reshape(&q, &[b, sq, HEADS, d]);
        let q = self.transpose(&q, &[0, 2, 1, 3]);
        let k = self.reshape(&k, &[b, sk, HEADS, d]);
        let k = self.transpose(&k, &[0, 2, 3, 1]);
        let v = self.reshape(&v, &[b, sk, HEADS, d]);
        let v = self.transpose(&v, &[0, 2, 1, 3]);
        let scores = self.node("MatMul", &[&q, &k], vec![]);
        let scale = self.fresh("scale");
        self.graph
            .initializers
            .push(Tensor::from_f32(&scale, vec![], &[0.5]));
        let scores = self.node("Mul", &[&scores, &scale], vec![]);
        let p = self.node("Softmax", &[&scores], vec![("axis", AttrValue::Int(-1))]);
        let o = self.node("MatMul", &[&p, &v], vec![]);
        let o = self.transpose(&o, &[0, 2, 1, 3]);
        let o = self.reshape(&o, &[b, sq, C]);
        self.linear(&o)
    }

    fn finish(mut self, outputs: &[&str], opset: i64) -> Model {
        for (i, o) in outputs.iter().enumerate() {
            let name = format!("out{i}");
            let id = self.fresh("id");
            self.graph
                .nodes
                .push(Node::new(&id, "Identity", &[o], &[&name]));
            self.graph.outputs.push(ValueInfo {
                name,
                ty: ditc::ir::ValueType::Tensor {
                    dtype: Some(DataType::F32),
                    shape: None,
                },
                doc_string: String::new(),
            });
        }
        Model::new(self.graph, opset)
    }
}

fn spatial(b: &mut Builder) -> String {
    let x = b.tokens(&[0, 2, 3, 4, 1], F, H * W); // [F, HW, C]
    b.attention(&x, &x, F, H * W, H * W)
}

fn temporal(b: &mut Builder) -> String {
    let x = b.tokens(&[0, 3, 4, 2, 1], H * W, F); // [HW, F, C]
    b.attention(&x, &x, H * W, F, F)
}

fn full(b: &mut Builder) -> String {
    let x = b.tokens(&[0, 2, 3, 4, 1], 1, F * H * W);
    b.attention(&x, &x, 1, F * H * W, F * H * W)
}

fn cross(b: &mut Builder) -> String {
    let x = b.tokens(&[0, 2, 3, 4, 1], 1, F * H * W);
    b.attention(&x, "text", 1, F * H * W, TEXT)
}

fn kinds_of(model: &Model) -> Vec<AttentionKind> {
    analyse(model).attention.iter().map(|s| s.kind).collect()
}

#[test]
fn one_attention_over_frames_one_over_pixels() {
    let mut b = Builder::new();
    let s = spatial(&mut b);
    let t = temporal(&mut b);
    let model = b.finish(&[&s, &t], 17);
    let map = analyse(&model);
    let kinds: Vec<AttentionKind> = map.attention.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, vec![AttentionKind::Spatial, AttentionKind::Temporal]);
    for site in &map.attention {
        assert!(site.traced);
        assert_eq!(
            (
                site.heads,
                site.head_dim,
                site.query_len,
                site.key_len,
                site.batch
            ),
            (HEADS, C / HEADS, 4, 4, 4)
        );
        assert_eq!(site.flops, 2 * 2 * (4 * HEADS * 4 * 4 * (C / HEADS)) as u64);
        assert!(
            site.q_proj.is_some()
                && site.k_proj.is_some()
                && site.v_proj.is_some()
                && site.out_proj.is_some()
        );
    }
    // The graph is real: tract runs it.
    let latent = Tensor::from_f32(
        "latent",
        vec![1, C, F, H, W],
        &vec![0.1; (C * F * H * W) as usize],
    );
    let text = Tensor::from_f32("text", vec![1, TEXT, C], &vec![0.2; (TEXT * C) as usize]);
    let out = run_once(&model, &[latent, text]).unwrap();
    assert_eq!(out[0].dims, vec![F, H * W, C]);
}

#[test]
fn full_and_cross_attention() {
    let mut b = Builder::new();
    let f = full(&mut b);
    let c = cross(&mut b);
    let model = b.finish(&[&f, &c], 17);
    assert_eq!(
        kinds_of(&model),
        vec![AttentionKind::Full, AttentionKind::Cross]
    );
}

#[test]
fn video_tokens_joined_with_text_are_full_attention() {
    let mut b = Builder::new();
    let x = b.tokens(&[0, 2, 3, 4, 1], 1, F * H * W);
    let joined = b.node("Concat", &["text", &x], vec![("axis", AttrValue::Int(1))]);
    let n = TEXT + F * H * W;
    let o = b.attention(&joined, &joined, 1, n, n);
    assert_eq!(kinds_of(&b.finish(&[&o], 17)), vec![AttentionKind::Full]);
}

#[test]
fn opset23_attention_op_is_a_site() {
    let mut b = Builder::new();
    let d = C / HEADS;
    let x = b.tokens(&[0, 3, 4, 2, 1], H * W, F); // temporal tokens
    let heads = |b: &mut Builder, v: &str| {
        let v = b.linear(v);
        let v = b.reshape(&v, &[H * W, F, HEADS, d]);
        b.transpose(&v, &[0, 2, 1, 3])
    };
    let (q, k, v) = (heads(&mut b, &x), heads(&mut b, &x), heads(&mut b, &x));
    let o = b.node("Attention", &[&q, &k, &v], vec![]);
    let map = analyse(&b.finish(&[&o], 23));
    assert_eq!(map.attention.len(), 1);
    let site = &map.attention[0];
    assert_eq!(site.kind, AttentionKind::Temporal);
    assert_eq!((site.heads, site.query_len, site.key_len), (HEADS, F, F));
    assert_eq!(site.flops, 2 * (H * W * HEADS * F * F * 2 * d) as u64);
}

#[test]
fn image_latent_attention_is_spatial() {
    let mut b = Builder::new();
    b.graph.inputs[0] = ValueInfo::tensor(
        "latent",
        DataType::F32,
        [1, C, H, W * F].iter().map(|&d| Dim::Value(d)).collect(),
    );
    let t = b.transpose("latent", &[0, 2, 3, 1]);
    let x = b.reshape(&t, &[1, H * W * F, C]);
    let o = b.attention(&x, &x, 1, H * W * F, H * W * F);
    assert_eq!(kinds_of(&b.finish(&[&o], 17)), vec![AttentionKind::Spatial]);
}

/// latte-tiny (diffusers' `LatteTransformer3DModel`, TorchScript export): spatial blocks see
/// `[frames, tokens, channels]`, temporal blocks `[tokens, frames, channels]`; between them the export
/// reshapes and transposes the stream (and adds the temporal positional embedding `/m/Add` before the
/// first temporal block). The stack (names read from the graph by hand): it enters block 0 at the
/// patch embedding's output, each temporal block reads the spatial block's output re-laid-out, and it
/// leaves at the reshape after the last temporal block back to `[frames, tokens, channels]`.
#[test]
fn latte_blocks_form_one_stack_across_layouts() {
    let model = ditc::onnx::read_model(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/latte-tiny/model.onnx"),
    )
    .unwrap();
    let map = analyse(&model);
    let types = ditc::ir::infer_types(&model.graph, model.default_opset());
    let stack = ditc::analysis::stack::find_stack(&model.graph, &map, &types).unwrap();
    assert_eq!(stack.blocks.len(), 8);
    assert!(!stack.one_layout);
    assert_eq!(stack.input(), "/m/pos_embed/Cast_output_0");
    assert_eq!(
        stack.blocks[0].output,
        "/m/transformer_blocks.0/Add_8_output_0"
    );
    assert_eq!(stack.blocks[1].input, "/m/Add_output_0");
    assert_eq!(
        stack.blocks[1].output,
        "/m/temporal_transformer_blocks.0/Add_7_output_0"
    );
    assert_eq!(stack.blocks[2].input, "/m/Reshape_8_output_0");
    assert_eq!(stack.output(), "/m/Reshape_20_output_0");
    assert_eq!(
        stack.shape,
        types["/m/pos_embed/Cast_output_0"].shape.clone().unwrap()
    );
    assert_ne!(
        Some(stack.shape.clone()),
        types["/m/temporal_transformer_blocks.3/Add_7_output_0"].shape
    );
}
