//! Finding attention sites and classifying them by what their sequence axis spans.
//!
//! Decomposed attention (both torch exporters) is matched starting from `Softmax`: walk back through
//! scale/mask/cast ops to the `MatMul(Q, K^T)` that makes the scores, and forward to the `MatMul(P, V)`
//! that consumes the probabilities. The opset-23 `Attention` op is a site by itself. The kind comes from
//! the axis provenance ([`super::axes`]) of the score matrix: the query axis spanning frames only is
//! temporal, pixels of one frame spatial, both (or video plus text) full, and keys with no video
//! axis at all are cross-attention.

use std::collections::HashMap;

use serde::Serialize;

use super::axes::{tag_names, tags_of, Axes, CHANNEL, FRAME, HEIGHT, TEXT, VIDEO, WIDTH};
use super::flops::node_flops;
use crate::ir::{Graph, Node, TypeMap};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Sequence = the tokens of one frame (or image).
    Spatial,
    /// Sequence = the frames at one spatial position.
    Temporal,
    /// Sequence = all video tokens, possibly joined with text tokens.
    Full,
    /// Keys/values from the text or condition embedding (queries from the video, or from the text
    /// itself, as in HunyuanVideo's token refiner).
    Cross,
}

impl AttentionKind {
    pub const ALL: [AttentionKind; 4] = [
        AttentionKind::Spatial,
        AttentionKind::Temporal,
        AttentionKind::Full,
        AttentionKind::Cross,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttentionKind::Spatial => "spatial",
            AttentionKind::Temporal => "temporal",
            AttentionKind::Full => "full",
            AttentionKind::Cross => "cross",
        }
    }
}

/// One attention site: where it is, its geometry and cost.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionSite {
    pub id: usize,
    pub kind: AttentionKind,
    /// False when the sequence axes could not be traced to the inputs (the kind is then a guess: full).
    pub traced: bool,
    /// The node the site was found from (`Softmax`, or the `Attention` op).
    pub anchor: String,
    pub qk_matmul: Option<String>,
    pub pv_matmul: Option<String>,
    pub q_proj: Option<String>,
    pub k_proj: Option<String>,
    pub v_proj: Option<String>,
    pub out_proj: Option<String>,
    /// The site's result after its output projection (and bias), when found.
    pub output: Option<String>,
    /// Independent attention problems per call other than heads (batch x frames, ...).
    pub batch: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub v_head_dim: i64,
    pub query_len: i64,
    pub key_len: i64,
    pub query_axes: Vec<&'static str>,
    pub key_axes: Vec<&'static str>,
    /// FLOPs of the score and value products per call.
    pub flops: u64,
    /// FLOPs of the Q/K/V/output projections found for this site.
    pub projection_flops: u64,
    /// Position of the anchor in topological order (for ordering and block assignment).
    #[serde(skip)]
    pub position: usize,
}

pub fn classify(query: u8, key: u8) -> Option<AttentionKind> {
    let spatial = HEIGHT | WIDTH;
    // Keys without video: attention to the condition. Text attending to text only (HunyuanVideo's
    // token refiner) is that too: its keys and values come from the text embedding.
    if key & VIDEO == 0 && (query & VIDEO != 0 || query & TEXT != 0) {
        return Some(AttentionKind::Cross);
    }
    if query & FRAME != 0 && query & spatial != 0 || query & TEXT != 0 && query & VIDEO != 0 {
        return Some(AttentionKind::Full);
    }
    if query & FRAME != 0 {
        return Some(AttentionKind::Temporal);
    }
    if query & spatial != 0 {
        return Some(AttentionKind::Spatial);
    }
    None
}

pub struct Context<'a> {
    pub graph: &'a Graph,
    pub types: &'a TypeMap,
    pub axes: &'a HashMap<String, Axes>,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Context<'a> {
    pub fn new(graph: &'a Graph, types: &'a TypeMap, axes: &'a HashMap<String, Axes>) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.as_str(), i);
            }
            for input in n.present_inputs() {
                consumers.entry(input).or_default().push(i);
            }
        }
        Context {
            graph,
            types,
            axes,
            producer,
            consumers,
        }
    }

    pub fn producer(&self, value: &str) -> Option<&'a Node> {
        self.producer.get(value).map(|&i| &self.graph.nodes[i])
    }

    fn consumers(&self, value: &str) -> Vec<&'a Node> {
        self.consumers
            .get(value)
            .map(|v| v.iter().map(|&i| &self.graph.nodes[i]).collect())
            .unwrap_or_default()
    }

    fn is_constant(&self, value: &str) -> bool {
        self.graph.initializer(value).is_some()
            || self
                .producer(value)
                .is_some_and(|n| n.op_type == "Constant")
    }

    fn shape(&self, value: &str) -> Option<Vec<i64>> {
        self.types.get(value)?.shape.clone()
    }

    /// The value after a linear layer's bias add (or its own output without one), and after the
    /// reshape back to tokens that follows a 2-D Gemm (graphs built from checkpoints).
    pub fn bias_output(&self, linear: &Node) -> String {
        let mut out = linear.outputs[0].clone();
        if let [add] = self.consumers(&out).as_slice() {
            if add.op_type == "Add" && add.present_inputs().any(|i| self.is_constant(i)) {
                out = add.outputs[0].clone();
            }
        }
        if let [reshape] = self.consumers(&out).as_slice() {
            if reshape.op_type == "Reshape" && linear.op_type == "Gemm" {
                out = reshape.outputs[0].clone();
            }
        }
        out
    }

    /// A linear layer: MatMul/Gemm whose weight is a constant (possibly through Transpose/Cast/DQ).
    pub fn is_linear(&self, node: &Node) -> bool {
        matches!(node.op_type.as_str(), "MatMul" | "Gemm")
            && node
                .inputs
                .get(1)
                .is_some_and(|w| self.is_constant_weight(w))
    }

    fn is_constant_weight(&self, value: &str) -> bool {
        if self.is_constant(value) {
            return true;
        }
        match self.producer(value) {
            Some(n)
                if matches!(
                    n.op_type.as_str(),
                    "Transpose" | "Cast" | "DequantizeLinear" | "Reshape"
                ) =>
            {
                n.inputs.first().is_some_and(|v| self.is_constant_weight(v))
            }
            _ => false,
        }
    }

    /// Walk back from `value` through ops in `through` (following their first non-constant input)
    /// until `stop` accepts a producer.
    fn walk_back(
        &self,
        value: &str,
        through: &[&str],
        stop: impl Fn(&Node) -> bool,
    ) -> Option<&'a Node> {
        let mut current = value.to_string();
        for _ in 0..16 {
            let node = self.producer(&current)?;
            if stop(node) {
                return Some(node);
            }
            if !through.contains(&node.op_type.as_str()) {
                return None;
            }
            current = node
                .present_inputs()
                .find(|i| !self.is_constant(i))?
                .to_string();
        }
        None
    }

    /// Walk forward from `value` through single-consumer ops in `through` until `stop` accepts one.
    fn walk_forward(
        &self,
        value: &str,
        through: &[&str],
        stop: impl Fn(&Node) -> bool,
    ) -> Option<&'a Node> {
        let mut current = value.to_string();
        for _ in 0..16 {
            let consumers = self.consumers(&current);
            if let Some(hit) = consumers.iter().find(|n| stop(n)) {
                return Some(hit);
            }
            let next = consumers
                .iter()
                .find(|n| through.contains(&n.op_type.as_str()))?;
            current = next.outputs.first()?.clone();
        }
        None
    }
}

const SCORE_OPS: &[&str] = &["Mul", "Div", "Add", "Sub", "Cast", "Where", "Identity"];
const LAYOUT_OPS: &[&str] = &[
    "Transpose",
    "Reshape",
    "Cast",
    "Identity",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
];
/// Ops between a projection and its Q/K input: layout, scaling, q/k norms, rotary embedding pieces.
const PROJECTION_PATH: &[&str] = &[
    "Transpose",
    "Reshape",
    "Cast",
    "Identity",
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Concat",
    "Slice",
    "Split",
    "Neg",
    "ScatterND",
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "Squeeze",
    "Unsqueeze",
    "Expand",
];

/// Find every attention site of `ctx.graph`, in topological order.
pub fn find_sites(ctx: &Context, order: &HashMap<&str, usize>) -> Vec<AttentionSite> {
    let mut sites: Vec<AttentionSite> = ctx
        .graph
        .nodes
        .iter()
        .filter_map(|n| match (n.is_onnx(), n.op_type.as_str()) {
            (true, "Softmax") => decomposed_site(ctx, n),
            (true, "Attention") => fused_site(ctx, n),
            // ditc's own op (a converted bundle): Q [B, H, Lq, D], K [B, H, Lk, D], V as Attention's.
            (false, "SparseLinearAttention") if n.domain == "ai.ditc" => fused_site(ctx, n),
            _ => None,
        })
        .collect();
    for s in &mut sites {
        s.position = order.get(s.anchor.as_str()).copied().unwrap_or(usize::MAX);
    }
    sites.sort_by_key(|s| s.position);
    for (i, s) in sites.iter_mut().enumerate() {
        s.id = i;
    }
    sites
}

fn decomposed_site(ctx: &Context, softmax: &Node) -> Option<AttentionSite> {
    let scores_in = softmax.inputs.first()?;
    let qk = ctx.walk_back(scores_in, SCORE_OPS, |n| n.op_type == "MatMul")?;
    // The softmax must normalise over the key axis (the last one).
    let rank = ctx.shape(scores_in)?.len() as i64;
    let axis = softmax.attr_int("axis").unwrap_or(-1);
    if axis != -1 && axis != rank - 1 {
        return None;
    }
    let pv = ctx.walk_forward(&softmax.outputs[0], &["Cast", "Dropout", "Identity"], |n| {
        n.op_type == "MatMul"
    })?;
    let scores = ctx.axes.get(qk.outputs.first()?)?;
    let scores_shape = ctx.shape(qk.outputs.first()?)?;
    let q_shape = ctx.shape(qk.inputs.first()?)?;
    let v_shape = ctx.shape(pv.inputs.get(1)?)?;
    let n = scores.len();
    if n < 2 {
        return None;
    }
    let (query_tags, key_tags) = (tags_of(&scores[n - 2]), tags_of(&scores[n - 1]));
    let lead: i64 = scores_shape[..n - 2].iter().product();
    let heads: i64 = scores[..n - 2]
        .iter()
        .flatten()
        .filter(|a| a.tags == CHANNEL)
        .map(|a| a.size)
        .product();
    // Shapes are sanitized to at most 2^48 elements, so these products cannot overflow.
    let (sq, sk) = (scores_shape[n - 2], scores_shape[n - 1]);
    let (d, dv) = (*q_shape.last()?, *v_shape.last()?);
    let q_proj = projection(ctx, qk.inputs.first()?);
    let k_proj = projection(ctx, qk.inputs.get(1)?);
    let v_proj = projection(ctx, pv.inputs.get(1)?);
    let out_proj = ctx.walk_forward(&pv.outputs[0], LAYOUT_OPS, |n| ctx.is_linear(n));
    let output = out_proj.map(|p| ctx.bias_output(p));
    Some(site(
        softmax,
        Some(qk),
        Some(pv),
        [q_proj, k_proj, v_proj, out_proj],
        output,
        ctx,
        Geometry {
            batch: lead / heads.max(1),
            heads,
            head_dim: d,
            v_head_dim: dv,
            query_len: sq,
            key_len: sk,
            query_tags,
            key_tags,
        },
    ))
}

fn fused_site(ctx: &Context, node: &Node) -> Option<AttentionSite> {
    let (q, k, v) = (
        node.inputs.first()?,
        node.inputs.get(1)?,
        node.inputs.get(2)?,
    );
    let (qs, ks, vs) = (ctx.shape(q)?, ctx.shape(k)?, ctx.shape(v)?);
    let (qa, ka) = (ctx.axes.get(q)?, ctx.axes.get(k)?);
    let g = if qs.len() == 4 {
        Geometry {
            batch: qs[0],
            heads: qs[1],
            head_dim: qs[3],
            v_head_dim: vs[3],
            query_len: qs[2],
            key_len: ks[2],
            query_tags: tags_of(&qa[2]),
            key_tags: tags_of(&ka[2]),
        }
    } else if qs.len() == 3 {
        let heads = node.attr_int("q_num_heads").unwrap_or(1).max(1);
        let kv_heads = node.attr_int("kv_num_heads").unwrap_or(heads).max(1);
        Geometry {
            batch: qs[0],
            heads,
            head_dim: qs[2] / heads,
            v_head_dim: vs[2] / kv_heads,
            query_len: qs[1],
            key_len: ks[1],
            query_tags: tags_of(&qa[1]),
            key_tags: tags_of(&ka[1]),
        }
    } else {
        return None;
    };
    let projections = [
        projection(ctx, q),
        projection(ctx, k),
        projection(ctx, v),
        ctx.walk_forward(&node.outputs[0], LAYOUT_OPS, |n| ctx.is_linear(n)),
    ];
    let output = projections[3].map(|p| ctx.bias_output(p));
    let mut s = site(node, None, None, projections, output, ctx, g);
    s.flops = node_flops(node, ctx.types).max(s.flops);
    Some(s)
}

struct Geometry {
    batch: i64,
    heads: i64,
    head_dim: i64,
    v_head_dim: i64,
    query_len: i64,
    key_len: i64,
    query_tags: u8,
    key_tags: u8,
}

fn site(
    anchor: &Node,
    qk: Option<&Node>,
    pv: Option<&Node>,
    projections: [Option<&Node>; 4],
    output: Option<String>,
    ctx: &Context,
    g: Geometry,
) -> AttentionSite {
    let classified = classify(g.query_tags, g.key_tags);
    let calls = [g.batch, g.heads, g.query_len, g.key_len]
        .iter()
        .fold(1u64, |acc, &d| acc.saturating_mul(d.max(0) as u64));
    let name = |n: Option<&Node>| n.map(|n| n.name.clone());
    AttentionSite {
        id: 0,
        kind: classified.unwrap_or(AttentionKind::Full),
        traced: classified.is_some(),
        anchor: anchor.name.clone(),
        qk_matmul: name(qk),
        pv_matmul: name(pv),
        q_proj: name(projections[0]),
        k_proj: name(projections[1]),
        v_proj: name(projections[2]),
        out_proj: name(projections[3]),
        output,
        batch: g.batch,
        heads: g.heads,
        head_dim: g.head_dim,
        v_head_dim: g.v_head_dim,
        query_len: g.query_len,
        key_len: g.key_len,
        query_axes: tag_names(g.query_tags),
        key_axes: tag_names(g.key_tags),
        flops: calls.saturating_mul(2 * (g.head_dim.saturating_add(g.v_head_dim)).max(0) as u64),
        projection_flops: projections
            .iter()
            .flatten()
            .map(|n| node_flops(n, ctx.types))
            .sum(),
        position: 0,
    }
}

/// The linear layer that produced `value`, walking back through layout, scaling, norms and rotary ops.
fn projection<'a>(ctx: &Context<'a>, value: &str) -> Option<&'a Node> {
    let mut frontier = vec![value.to_string()];
    for _ in 0..24 {
        let mut next = Vec::new();
        for v in &frontier {
            let Some(node) = ctx.producer(v) else {
                continue;
            };
            if ctx.is_linear(node) {
                return Some(node);
            }
            if node.op_type == "Add" && node.present_inputs().any(|i| ctx.is_constant(i)) {
                if let Some(lin) = node
                    .present_inputs()
                    .filter_map(|i| ctx.producer(i))
                    .find(|n| ctx.is_linear(n))
                {
                    return Some(lin);
                }
            }
            if PROJECTION_PATH.contains(&node.op_type.as_str()) {
                next.extend(
                    node.present_inputs()
                        .filter(|i| !ctx.is_constant(i))
                        .map(str::to_string),
                );
            }
        }
        if next.is_empty() {
            return None;
        }
        frontier = next;
    }
    None
}

/// The value after a linear layer's bias add (or its own output without one).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_axis_tags() {
        assert_eq!(
            classify(HEIGHT | WIDTH, HEIGHT | WIDTH),
            Some(AttentionKind::Spatial)
        );
        assert_eq!(classify(FRAME, FRAME), Some(AttentionKind::Temporal));
        assert_eq!(classify(VIDEO, VIDEO), Some(AttentionKind::Full));
        assert_eq!(
            classify(VIDEO | TEXT, VIDEO | TEXT),
            Some(AttentionKind::Full)
        );
        assert_eq!(classify(HEIGHT | WIDTH, TEXT), Some(AttentionKind::Cross));
        assert_eq!(classify(VIDEO, TEXT), Some(AttentionKind::Cross));
        assert_eq!(classify(TEXT, TEXT), Some(AttentionKind::Cross));
        assert_eq!(classify(CHANNEL, CHANNEL), None);
    }
}
