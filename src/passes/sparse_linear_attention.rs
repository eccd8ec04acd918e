//! Pass `sparse-linear-attention`: block-sparse attention (SLA's top-k, or SpargeAttn's cumulative
//! mass with its self-similarity guard) plus SLA's linear branch, as one `ai.ditc` op per site.
//!
//! Each selected site (`MatMul(Q, Kᵀ)` -> constant scale -> `Softmax` -> `MatMul(P, V)`) becomes one
//! node `SparseLinearAttention` (domain `ai.ditc`) whose attributes carry every option, so a TensorRT
//! plugin can implement it, and the model gets one ONNX local function of the same name and domain
//! holding the portable decomposition in standard ONNX ops ([`function`]), so onnxruntime, TensorRT
//! without the plugin, and tract (the runtime inlines it) compute the same values.
//!
//! The op (README "The SparseLinearAttention op" is its full contract):
//! inputs `Q` [B, H, Lq, D], `K` [B, H, Lk, D], `V` [B, H, Lk, Dv] (Q unscaled: `scale` multiplies the
//! scores), `step` (int64 scalar, the sampling step, for dense warm-up), `proj_weight` [D, D] and
//! `proj_bias` [D] (the linear branch's `proj_l`, PyTorch layout [out, in]); outputs `O` [B, H, Lq, Dv]
//! and `kept` (int64 scalar: the number of (query, key) scores the sparse branch computes).
//!
//! Block counting follows SLA: `Nq = ceil(Lq / block_q)`, `Nk = ceil(Lk / block_k)`; the last block of
//! a sequence may be partial (its mean is over the tokens it has; its missing tokens do not exist).
//! Top-k keeps `max(1, floor(topk * Nk))` key blocks per query block: SLA's own `int(topk * Nk)` can be
//! 0, and its kernel then divides by an empty sum; ditc keeps at least one block (a deliberate
//! difference).

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{Pass, PassContext, STEP_INPUT};
use crate::analysis::{gpu_cost, AttentionKind, AttentionSite};
use crate::ir::{
    infer_types, remove_dead_nodes, remove_unused_initializers, sort_topologically, AttrValue,
    Attribute, DataType, Graph, Model, Node, Tensor, ValueInfo,
};
use crate::manifest::{PluginNode, PluginRequirement, SparseAttention, SparseSite};
use crate::onnx::proto;

pub const DOMAIN: &str = "ai.ditc";
pub const OP: &str = "SparseLinearAttention";
/// The plugin library the trtexec command loads for `ai.ditc` ops.
pub const PLUGIN_LIBRARY: &str = "libditc_plugins.so";
pub const PLUGIN_VERSION: &str = "1";

/// Options of the pass (`[passes.options]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaOptions {
    /// Fraction of key blocks kept per query block (0, 1]; TurboDiffusion runs Wan with 0.1.
    #[serde(default = "default_topk")]
    pub topk: f64,
    /// Query and key block sizes in tokens (TurboDiffusion's SLA for Wan: 128 and 64).
    #[serde(default = "default_block_q")]
    pub block_q: i64,
    #[serde(default = "default_block_k")]
    pub block_k: i64,
    /// Which attention kinds (full, spatial, temporal; never cross).
    #[serde(default = "default_kinds")]
    pub kinds: Vec<AttentionKind>,
    /// Sites whose query or key sequence is shorter stay dense.
    #[serde(default)]
    pub min_seq_len: i64,
    /// SLA's linear branch (zero without learned SLA weights: the projection is zero-initialised).
    #[serde(default)]
    pub linear: bool,
    /// SpargeAttn's selection instead of top-k: per query block, the key blocks in decreasing order of
    /// the softmax of the pooled scores whose cumulative mass stays within `mass` (at least one).
    #[serde(default)]
    pub mass: Option<f64>,
    /// SpargeAttn's self-similarity guard (mass mode): a block whose tokens' mean pairwise cosine is
    /// not above this is always computed (query block: against every key block; key block: by every
    /// query block).
    #[serde(default = "default_sim_threshold")]
    pub sim_threshold: f64,
    /// The first `dense_steps` sampling steps run dense attention (Sparse VideoGen's warm-up).
    #[serde(default)]
    pub dense_steps: usize,
    /// The first `dense_blocks` transformer blocks (DiT map order) stay dense.
    #[serde(default)]
    pub dense_blocks: usize,
    /// Only the sites whose anchor or score-product node name contains one of these strings.
    #[serde(default)]
    pub sites: Option<Vec<String>>,
    /// Mark each node for the TensorRT plugin (`plugin_namespace`, `plugin_version`): TensorRT then
    /// builds the plugin (which must be loaded) instead of the local function's body.
    #[serde(default = "default_true")]
    pub plugin: bool,
    /// Learned SLA weights (the linear branch's `proj_l` per block): a safetensors file or a
    /// checkpoint folder ([`super::sla_weights`]); without it the projection is zero. Needs `linear`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_weights: Option<std::path::PathBuf>,
}

fn default_topk() -> f64 {
    0.1
}
fn default_block_q() -> i64 {
    128
}
fn default_block_k() -> i64 {
    64
}
fn default_kinds() -> Vec<AttentionKind> {
    vec![
        AttentionKind::Full,
        AttentionKind::Spatial,
        AttentionKind::Temporal,
    ]
}
fn default_sim_threshold() -> f64 {
    0.6
}
fn default_true() -> bool {
    true
}

impl SlaOptions {
    /// Option-level checks (before any model is read).
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("block_q", self.block_q), ("block_k", self.block_k)] {
            if b < 1 {
                bail!("sparse-linear-attention: {name} = {b}: a block size must be at least 1");
            }
            if b > 1 << 20 {
                bail!("sparse-linear-attention: {name} = {b} is larger than any sequence");
            }
        }
        if !(self.topk > 0.0 && self.topk <= 1.0) {
            bail!(
                "sparse-linear-attention: topk = {} must be in (0, 1] (the fraction of key blocks kept)",
                self.topk
            );
        }
        if let Some(m) = self.mass {
            if !(m > 0.0 && m <= 1.0) {
                bail!("sparse-linear-attention: mass = {m} must be in (0, 1] (the cumulative softmax mass kept)");
            }
        }
        if !(self.sim_threshold.is_finite() && (-1.0..=1.0).contains(&self.sim_threshold)) {
            bail!(
                "sparse-linear-attention: sim_threshold = {} must be a cosine in [-1, 1]",
                self.sim_threshold
            );
        }
        if self.kinds.is_empty() {
            bail!("sparse-linear-attention: kinds is empty (give some of full, spatial, temporal)");
        }
        if self.kinds.contains(&AttentionKind::Cross) {
            bail!("sparse-linear-attention: kinds contains 'cross': cross-attention (keys from the text) is never made sparse");
        }
        if self.min_seq_len < 0 {
            bail!(
                "sparse-linear-attention: min_seq_len = {} is negative",
                self.min_seq_len
            );
        }
        if let (Some(path), false) = (&self.sla_weights, self.linear) {
            bail!(
                "sparse-linear-attention: sla_weights = '{}' but linear = false: the weights are the linear branch's projection; set linear = true (or drop sla_weights for pure sparse attention)",
                path.display()
            );
        }
        if let Some(s) = &self.sites {
            if s.is_empty() || s.iter().any(|p| p.is_empty()) {
                bail!("sparse-linear-attention: sites must list non-empty node names");
            }
        }
        Ok(())
    }

    /// Checks against the sampler (before any model is read).
    pub fn check_steps(&self, steps: Option<usize>) -> Result<()> {
        match steps {
            None if self.dense_steps > 0 => bail!(
                "sparse-linear-attention: dense_steps = {} needs a sampler: add a [sampler] table to the recipe",
                self.dense_steps
            ),
            Some(n) if self.dense_steps > n => bail!(
                "sparse-linear-attention: dense_steps = {} is beyond the sampler's {n} steps",
                self.dense_steps
            ),
            _ => Ok(()),
        }
    }

    /// Key blocks kept per query block in top-k mode: `max(1, floor(topk * Nk))` (f64, as Python).
    pub fn keep_blocks(&self, key_blocks: i64) -> i64 {
        ((self.topk * key_blocks as f64).floor() as i64).clamp(1, key_blocks)
    }
}

pub struct SparseLinearAttention {
    options: SlaOptions,
}

impl SparseLinearAttention {
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let options: SlaOptions = options.clone().try_into().context(
            "invalid sparse-linear-attention options (valid keys: topk, block_q, block_k, kinds, min_seq_len, linear, mass, sim_threshold, dense_steps, dense_blocks, sites, plugin, sla_weights)",
        )?;
        options.validate()?;
        Ok(SparseLinearAttention { options })
    }
}

/// Blocks of the sequence of `len` tokens in blocks of `block`: `ceil(len / block)`.
pub fn block_count(len: i64, block: i64) -> i64 {
    (len + block - 1) / block
}

impl Pass for SparseLinearAttention {
    fn name(&self) -> &'static str {
        "sparse-linear-attention"
    }

    fn check_sampler(&self, steps: Option<usize>) -> Result<()> {
        self.options.check_steps(steps)
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        let o = &self.options;
        o.check_steps(cx.sampler.as_ref().map(|(_, s)| s.steps()))?;
        if cx.sparse_attention.is_some() {
            bail!("the graph already has sparse attention from an earlier pass");
        }
        if super::quantize_attention::already_quantized(model, &cx.dit_map) {
            bail!("the attention sites were quantized by an earlier quantize-attention pass: list sparse-linear-attention before quantize-attention (format = \"sage\" then makes the sparse sites SageSLA sites)");
        }
        if let Some(s) = &cx.schedule {
            bail!(
                "a '{}' schedule is already baked (it moved attention sites into If branches): sparse attention and a schedule pass cannot be combined yet",
                s.policy
            );
        }
        if model.default_opset() < 13 {
            bail!(
                "the model's opset is {}: the op's portable body needs opset 13 or newer",
                model.default_opset()
            );
        }
        let selected = select_sites(o, cx)?;
        // Everything is checked for every site before the graph changes.
        let types = infer_types(&model.graph, model.default_opset());
        let plans = plan_sites(&model.graph, &types, &selected, o, |s| {
            cx.dit_map.block_of(s).map(|b| b.index)
        })?;
        let learned = match &o.sla_weights {
            Some(path) => super::sla_weights::read(path)?,
            None => Default::default(),
        };
        let learned = super::sla_weights::assign(&learned, &plans, cx.dit_map.blocks.len())?;
        let step = step_value(model, cx, o.dense_steps);
        let mut sites = Vec::new();
        let mut plugin_nodes = Vec::new();
        let mut zero_proj: HashSet<i64> = HashSet::new();
        for plan in &plans {
            let (w, b) = match learned.get(&plan.id) {
                Some(p) => super::sla_weights::install(&mut model.graph, p),
                None => zero_projection(&mut model.graph, plan.head_dim, &mut zero_proj),
            };
            let node = rewrite_site(&mut model.graph, plan, o, &step, &w, &b);
            retarget_site(cx, plan.id, &node.name);
            plugin_nodes.push(plugin_node(&node));
            sites.push(plan.manifest_site(o));
        }
        install_op(model, function(model.default_opset()))?;
        cx.sparse_attention = Some(SparseAttention {
            op: OP.into(),
            domain: DOMAIN.into(),
            options: serde_json::to_value(o)?,
            sites,
        });
        if o.plugin {
            cx.plugins.push(plugin_requirement(OP, plugin_nodes));
        }
        Ok(())
    }
}

/// Point the DiT map's site `id` at the op node that now computes it (`node`): later passes (a
/// schedule that must move the site into an `If`) look for its anchor; its products are gone.
pub(crate) fn retarget_site(cx: &mut PassContext, id: usize, node: &str) {
    if let Some(site) = cx.dit_map.attention.iter_mut().find(|s| s.id == id) {
        site.anchor = node.to_string();
        site.qk_matmul = None;
        site.pv_matmul = None;
    }
}

/// The manifest's entry for one plugin node: its name and every attribute as JSON.
pub(crate) fn plugin_node(node: &Node) -> PluginNode {
    PluginNode {
        node: node.name.clone(),
        attributes: node
            .attributes
            .iter()
            .map(|a| (a.name.clone(), attr_json(&a.value)))
            .collect(),
    }
}

/// What a TensorRT engine of this graph needs for ditc op `op` at `nodes`: the op from ditc's
/// plugin library.
pub(crate) fn plugin_requirement(op: &str, nodes: Vec<PluginNode>) -> PluginRequirement {
    PluginRequirement {
        name: op.into(),
        version: PLUGIN_VERSION.into(),
        namespace: DOMAIN.into(),
        library: PLUGIN_LIBRARY.into(),
        nodes,
    }
}

/// Finish a rewrite that put a ditc op in the graph: declare the ditc domain, make `body` the op's
/// only local function (replacing one of the same name), and tidy the graph (topological order,
/// dead nodes, unused initializers).
pub(crate) fn install_op(model: &mut Model, body: proto::FunctionProto) -> Result<()> {
    model.opsets.retain(|(d, _)| d != DOMAIN);
    model.opsets.push((DOMAIN.to_string(), 1));
    model
        .functions
        .retain(|f| !(f.domain == body.domain && f.name == body.name));
    model.functions.push(body);
    sort_topologically(&mut model.graph)?;
    remove_dead_nodes(&mut model.graph);
    remove_unused_initializers(&mut model.graph);
    Ok(())
}

/// The value the nodes read as `step`: the graph's `ditc.step` input (added if needed) with a dense
/// warm-up, else a constant 0 (no step input for the runtime to feed).
fn step_value(model: &mut Model, cx: &mut PassContext, dense_steps: usize) -> String {
    if dense_steps > 0 {
        if !model.graph.inputs.iter().any(|i| i.name == STEP_INPUT) {
            model
                .graph
                .inputs
                .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
        }
        cx.step_input = Some(STEP_INPUT.to_string());
        return STEP_INPUT.to_string();
    }
    let name = "ditc.sla.no_warmup_step".to_string();
    model
        .graph
        .initializers
        .push(Tensor::from_i64(&name, vec![], &[0]));
    name
}

pub(crate) fn attr_json(v: &AttrValue) -> serde_json::Value {
    match v {
        AttrValue::Float(f) => serde_json::json!(f),
        AttrValue::Int(i) => serde_json::json!(i),
        AttrValue::String(s) => serde_json::json!(String::from_utf8_lossy(s)),
        AttrValue::Ints(v) => serde_json::json!(v),
        AttrValue::Floats(v) => serde_json::json!(v),
        _ => serde_json::Value::Null,
    }
}

/// The sites the options select, with every refusal checked.
fn select_sites<'a>(o: &SlaOptions, cx: &'a PassContext) -> Result<Vec<&'a AttentionSite>> {
    let all = &cx.dit_map.attention;
    let named = |s: &AttentionSite, p: &str| {
        s.anchor.contains(p) || s.qk_matmul.as_deref().is_some_and(|n| n.contains(p))
    };
    if let Some(patterns) = &o.sites {
        for p in patterns {
            let matched: Vec<&AttentionSite> = all.iter().filter(|s| named(s, p)).collect();
            if matched.is_empty() {
                bail!("sites: '{p}' names no attention site");
            }
            if let Some(c) = matched.iter().find(|s| s.kind == AttentionKind::Cross) {
                bail!(
                    "sites: '{p}' selects attention site {} ({}), a cross-attention site: cross-attention (keys from the text) is never made sparse",
                    c.id,
                    c.anchor
                );
            }
        }
    }
    let selected: Vec<&AttentionSite> = all
        .iter()
        .filter(|s| o.kinds.contains(&s.kind))
        .filter(|s| {
            o.sites
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| named(s, p)))
        })
        .filter(|s| s.query_len >= o.min_seq_len && s.key_len >= o.min_seq_len)
        .filter(|s| {
            cx.dit_map
                .block_of(s.id)
                .is_none_or(|b| b.index >= o.dense_blocks)
        })
        .collect();
    if selected.is_empty() {
        let have: Vec<String> = all
            .iter()
            .map(|s| {
                format!(
                    "{} {} ({}x{})",
                    s.id,
                    s.kind.as_str(),
                    s.query_len,
                    s.key_len
                )
            })
            .collect();
        bail!(
            "no attention site matches (kinds {:?}, min_seq_len {}, dense_blocks {}); the model's sites: {}",
            o.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            o.min_seq_len,
            o.dense_blocks,
            have.join(", ")
        );
    }
    for s in &selected {
        if o.block_q > s.query_len || o.block_k > s.key_len {
            bail!(
                "attention site {} ({}): block_q = {} / block_k = {} is larger than its sequence ({} queries, {} keys); use smaller blocks or min_seq_len to leave it dense",
                s.id,
                s.anchor,
                o.block_q,
                o.block_k,
                s.query_len,
                s.key_len
            );
        }
    }
    Ok(selected)
}

/// What rewriting one site needs, found and checked before the graph changes.
pub(crate) struct SitePlan {
    pub(crate) id: usize,
    pub(crate) kind: AttentionKind,
    pub(crate) block: Option<usize>,
    pub(crate) name: String,
    pub(crate) q: String,
    pub(crate) k_t: String,
    pub(crate) v: String,
    pub(crate) out: String,
    pub(crate) scale: f32,
    pub(crate) batch: i64,
    pub(crate) heads: i64,
    pub(crate) query_len: i64,
    pub(crate) key_len: i64,
    pub(crate) head_dim: i64,
    pub(crate) v_head_dim: i64,
    pub(crate) flops: u64,
}

impl SitePlan {
    fn kept_output(&self) -> String {
        format!("ditc.sla.kept.site{}", self.id)
    }

    fn manifest_site(&self, o: &SlaOptions) -> SparseSite {
        let (nq, nk) = (
            block_count(self.query_len, o.block_q),
            block_count(self.key_len, o.block_k),
        );
        let keep = o.mass.is_none().then(|| o.keep_blocks(nk));
        let kept = keep.map(|k| k as f64 / nk as f64);
        SparseSite {
            site: self.id,
            node: self.name.clone(),
            kind: self.kind.as_str().into(),
            block: self.block,
            batch: self.batch,
            heads: self.heads,
            query_len: self.query_len,
            key_len: self.key_len,
            head_dim: self.head_dim,
            v_head_dim: self.v_head_dim,
            query_blocks: nq,
            key_blocks: nk,
            keep_blocks: keep,
            kept_output: self.kept_output(),
            scores_dense: (self.batch * self.heads * self.query_len * self.key_len) as u64,
            flops_dense: self.flops,
            h100_ms_dense: gpu_cost::dense_ms(self.flops),
            h100_ms_estimated: kept.map(|k| gpu_cost::sparse_ms(self.flops, k, self.key_len)),
        }
    }
}

/// A scalar float constant (initializer or `Constant` node), if `value` is one.
fn constant_scalar(graph: &Graph, value: &str) -> Option<f32> {
    let t = graph.initializer(value).or_else(|| {
        graph
            .nodes
            .iter()
            .find(|n| n.op_type == "Constant" && n.outputs.first().is_some_and(|o| o == value))
            .and_then(|n| n.attr_tensor("value"))
    })?;
    match t.to_f32_vec()?.as_slice() {
        [x] => Some(*x),
        _ => None,
    }
}

pub(crate) fn producer<'a>(graph: &'a Graph, value: &str) -> Option<&'a Node> {
    graph
        .nodes
        .iter()
        .find(|n| n.outputs.iter().any(|o| o == value))
}

/// `value` = `x * c` (or `c * x`) with a scalar constant `c`: `(x, c)`.
fn scaled_by_constant(graph: &Graph, value: &str) -> Option<(String, f32)> {
    let n = producer(graph, value)?;
    if n.op_type != "Mul" || !n.is_onnx() || n.inputs.len() != 2 {
        return None;
    }
    match (
        constant_scalar(graph, &n.inputs[0]),
        constant_scalar(graph, &n.inputs[1]),
    ) {
        (None, Some(c)) => Some((n.inputs[0].clone(), c)),
        (Some(c), None) => Some((n.inputs[1].clone(), c)),
        _ => None,
    }
}

/// [`plan_site`] for every site, each error naming its site; `block` gives a site's block index.
pub(crate) fn plan_sites(
    graph: &Graph,
    types: &crate::ir::TypeMap,
    sites: &[&AttentionSite],
    o: &SlaOptions,
    block: impl Fn(usize) -> Option<usize>,
) -> Result<Vec<SitePlan>> {
    sites
        .iter()
        .map(|s| {
            plan_site(graph, types, s, o, block(s.id)).with_context(|| {
                format!(
                    "attention site {} ({}, {})",
                    s.id,
                    s.kind.as_str(),
                    s.anchor
                )
            })
        })
        .collect()
}

pub(crate) fn plan_site(
    graph: &Graph,
    types: &crate::ir::TypeMap,
    s: &AttentionSite,
    o: &SlaOptions,
    block: Option<usize>,
) -> Result<SitePlan> {
    let (Some(qk_name), Some(pv_name)) = (&s.qk_matmul, &s.pv_matmul) else {
        bail!("only attention written as MatMul -> Softmax -> MatMul can be made sparse (the opset-23 Attention op is not supported yet)");
    };
    let find = |name: &str| graph.nodes.iter().find(|n| n.name == *name);
    let (Some(qk), Some(softmax), Some(pv)) = (find(qk_name), find(&s.anchor), find(pv_name))
    else {
        bail!("its nodes are not in the graph (a ditc bug)");
    };
    // Between the score product and the softmax: only constant scalar scaling.
    let mut scale = 1.0f32;
    let mut value = softmax.inputs[0].clone();
    while value != qk.outputs[0] {
        let Some(n) = producer(graph, &value) else {
            bail!("the softmax does not read the score product");
        };
        let c = n
            .inputs
            .get(1)
            .and_then(|i| constant_scalar(graph, i))
            .filter(|_| matches!(n.op_type.as_str(), "Mul" | "Div"));
        let Some(c) = c else {
            bail!(
                "node {} sits between the score product and the softmax: only a constant scalar scale can (masked or biased attention is not supported)",
                n.label()
            );
        };
        scale = if n.op_type == "Mul" {
            scale * c
        } else {
            scale / c
        };
        value = n.inputs[0].clone();
    }
    if pv.inputs[0] != softmax.outputs[0] {
        bail!(
            "the value product {} does not read the softmax directly",
            pv.label()
        );
    }
    let (mut q, mut k_t) = (qk.inputs[0].clone(), qk.inputs[1].clone());
    if let Some((x, c)) = scaled_by_constant(graph, &q) {
        q = x;
        scale *= c;
    }
    if let Some((x, c)) = scaled_by_constant(graph, &k_t) {
        k_t = x;
        scale *= c;
    }
    let v = pv.inputs[1].clone();
    let shape = |name: &str| -> Result<Vec<i64>> {
        types
            .get(name)
            .and_then(|t| t.shape.clone())
            .with_context(|| format!("the shape of '{name}' is unknown"))
    };
    let (qs, ks, vs) = (shape(&q)?, shape(&k_t)?, shape(&v)?);
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        bail!("Q, Kᵀ and V must be 4-D [B, H, L, D] (they are {qs:?}, {ks:?}, {vs:?})");
    }
    let dtype = types.get(&q).and_then(|t| t.dtype);
    if dtype != Some(DataType::F32) {
        bail!("Q is {dtype:?}: the op is defined on float32");
    }
    if qs[..2] != ks[..2] || qs[..2] != vs[..2] || ks[3] != vs[2] || qs[3] != ks[2] {
        bail!(
            "Q {qs:?}, Kᵀ {ks:?} and V {vs:?} do not agree (no broadcasting over batch or heads)"
        );
    }
    if o.linear && vs[3] != qs[3] {
        bail!(
            "the linear branch's projection is head_dim x head_dim: V's head dim {} differs from Q's {}",
            vs[3],
            qs[3]
        );
    }
    Ok(SitePlan {
        id: s.id,
        kind: s.kind,
        block,
        name: format!("ditc.sla.site{}", s.id),
        q,
        k_t,
        v,
        out: pv.outputs[0].clone(),
        scale,
        batch: qs[0],
        heads: qs[1],
        query_len: qs[2],
        key_len: ks[3],
        head_dim: qs[3],
        v_head_dim: vs[3],
        flops: s.flops,
    })
}

/// Zero `proj_l` weight and bias for head dim `d` (shared by every site of that head dim).
fn zero_projection(graph: &mut Graph, d: i64, made: &mut HashSet<i64>) -> (String, String) {
    let (w, b) = (
        format!("ditc.sla.proj_l.zero_weight.d{d}"),
        format!("ditc.sla.proj_l.zero_bias.d{d}"),
    );
    if made.insert(d) {
        let n = d as usize;
        graph
            .initializers
            .push(Tensor::from_f32(&w, vec![d, d], &vec![0.0; n * n]));
        graph
            .initializers
            .push(Tensor::from_f32(&b, vec![d], &vec![0.0; n]));
    }
    (w, b)
}

/// Replace the site by one op node; returns the node.
fn rewrite_site(
    graph: &mut Graph,
    plan: &SitePlan,
    o: &SlaOptions,
    step: &str,
    proj_w: &str,
    proj_b: &str,
) -> Node {
    let k = format!("{}/k", plan.name);
    let transpose = Node::new(
        &format!("{}/k_transpose", plan.name),
        "Transpose",
        &[&plan.k_t],
        &[&k],
    )
    .with_attr("perm", AttrValue::Ints(vec![0, 1, 3, 2]));
    let kept = plan.kept_output();
    let (nq, nk) = (
        block_count(plan.query_len, o.block_q),
        block_count(plan.key_len, o.block_k),
    );
    let mut node = Node::new(
        &plan.name,
        OP,
        &[&plan.q, &k, &plan.v, step, proj_w, proj_b],
        &[&plan.out, &kept],
    );
    node.domain = DOMAIN.into();
    let attrs: Vec<(&str, AttrValue)> = vec![
        ("scale", AttrValue::Float(plan.scale)),
        ("block_q", AttrValue::Int(o.block_q)),
        ("block_k", AttrValue::Int(o.block_k)),
        ("topk", AttrValue::Float(o.topk as f32)),
        ("keep_blocks", AttrValue::Int(o.keep_blocks(nk))),
        ("query_blocks", AttrValue::Int(nq)),
        ("key_blocks", AttrValue::Int(nk)),
        ("mass", AttrValue::Float(o.mass.unwrap_or(0.0) as f32)),
        ("sim_threshold", AttrValue::Float(o.sim_threshold as f32)),
        ("linear", AttrValue::Int(o.linear as i64)),
        ("dense_steps", AttrValue::Int(o.dense_steps as i64)),
        (
            "kind",
            AttrValue::String(plan.kind.as_str().as_bytes().to_vec().into()),
        ),
    ];
    for (name, value) in attrs {
        node.attributes.push(Attribute {
            name: name.into(),
            value,
        });
    }
    if o.plugin {
        for (name, value) in [
            ("plugin_namespace", DOMAIN),
            ("plugin_version", PLUGIN_VERSION),
        ] {
            node.attributes.push(Attribute {
                name: name.into(),
                value: AttrValue::String(value.as_bytes().to_vec().into()),
            });
        }
    }
    // The value product is replaced in place (its output keeps its name for the consumers).
    let at = graph
        .nodes
        .iter()
        .position(|n| n.outputs.first() == Some(&plan.out))
        .expect("planned");
    graph.nodes[at] = node.clone();
    graph.nodes.insert(at, transpose);
    graph
        .outputs
        .push(ValueInfo::tensor(&kept, DataType::I64, vec![]));
    node
}

/// Every attribute the op takes (the local function declares them all).
pub const ATTRIBUTES: &[&str] = &[
    "scale",
    "block_q",
    "block_k",
    "topk",
    "keep_blocks",
    "query_blocks",
    "key_blocks",
    "mass",
    "sim_threshold",
    "linear",
    "dense_steps",
    "kind",
    "plugin_namespace",
    "plugin_version",
];

/// Builder of the function body: nodes with generated names.
pub(crate) struct Body {
    pub(crate) nodes: Vec<Node>,
}

impl Body {
    /// The body as the local function `domain.name` of `opset` (ditc's ops: domain `ai.ditc`).
    pub(crate) fn into_function(
        self,
        name: &str,
        io: (&[&str], &[&str]),
        attributes: Vec<String>,
        opset: i64,
        doc: &str,
    ) -> proto::FunctionProto {
        proto::FunctionProto {
            name: name.into(),
            domain: DOMAIN.into(),
            input: io.0.iter().map(|s| s.to_string()).collect(),
            output: io.1.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            node: crate::onnx::nodes_to_proto(&self.nodes),
            opset_import: vec![proto::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            doc_string: doc.into(),
            ..Default::default()
        }
    }

    pub(crate) fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
    ) -> String {
        self.op_n(op, inputs, attrs, 1).remove(0)
    }

    pub(crate) fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
        outputs: usize,
    ) -> Vec<String> {
        let i = self.nodes.len();
        let outs: Vec<String> = (0..outputs).map(|j| format!("v{i}_{j}")).collect();
        let out_refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let mut n = Node::new(&format!("n{i}_{op}"), op, inputs, &out_refs);
        for (name, value) in attrs {
            n = n.with_attr(name, value);
        }
        self.nodes.push(n);
        outs
    }

    pub(crate) fn tensor(&mut self, t: Tensor) -> String {
        self.op("Constant", &[], vec![("value", AttrValue::Tensor(t))])
    }

    pub(crate) fn i64s(&mut self, v: &[i64]) -> String {
        self.tensor(Tensor::from_i64("", vec![v.len() as i64], v))
    }

    pub(crate) fn i64(&mut self, v: i64) -> String {
        self.tensor(Tensor::from_i64("", vec![], &[v]))
    }

    pub(crate) fn f32(&mut self, v: f32) -> String {
        self.tensor(Tensor::from_f32("", vec![], &[v]))
    }

    /// A `Constant` taking the caller's attribute `attr` (`value_int` or `value_float`).
    pub(crate) fn attribute(&mut self, attr: &str, int: bool) -> String {
        let (field, ty) = if int {
            ("value_int", proto::attribute_type::INT)
        } else {
            ("value_float", proto::attribute_type::FLOAT)
        };
        let reference = proto::AttributeProto {
            name: field.into(),
            ref_attr_name: attr.into(),
            r#type: ty,
            ..Default::default()
        };
        self.op(
            "Constant",
            &[],
            vec![(field, AttrValue::Other(Box::new(reference)))],
        )
    }

    pub(crate) fn cast(&mut self, x: &str, to: DataType) -> String {
        self.op(
            "Cast",
            &[x],
            vec![("to", AttrValue::Int(to.onnx_code() as i64))],
        )
    }

    pub(crate) fn sum(&mut self, x: &str, axes: &[i64], keep: bool) -> String {
        let axes = self.i64s(axes);
        self.op(
            "ReduceSum",
            &[x, &axes],
            vec![("keepdims", AttrValue::Int(keep as i64))],
        )
    }

    pub(crate) fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let axes = self.i64s(axes);
        self.op("Unsqueeze", &[x, &axes], vec![])
    }

    pub(crate) fn transpose_last(&mut self, x: &str) -> String {
        self.op(
            "Transpose",
            &[x],
            vec![("perm", AttrValue::Ints(vec![0, 1, 3, 2]))],
        )
    }

    pub(crate) fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(op, &[a, b], vec![])
    }

    /// Give the value `from` the name `to` (a formal output of the function).
    pub(crate) fn rename(&mut self, from: &str, to: &str) {
        for n in &mut self.nodes {
            for v in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
                if v == from {
                    *v = to.to_string();
                }
            }
        }
    }
}

/// Per-block bookkeeping of one sequence: token -> block index, one-hot [N, L] and token counts [N, 1].
struct Blocks {
    token_block: String,
    onehot: String,
    counts: String,
}

fn blocks(b: &mut Body, x: &str, block: &str) -> Blocks {
    let (zero, one, minus2) = (b.i64(0), b.i64(1), b.i64(-2));
    let shape = b.op("Shape", &[x], vec![]);
    let len = b.op(
        "Gather",
        &[&shape, &minus2],
        vec![("axis", AttrValue::Int(0))],
    );
    let tokens = b.op("Range", &[&zero, &len, &one], vec![]);
    let token_block = b.bin("Div", &tokens, block);
    let block_minus_one = b.bin("Sub", block, &one);
    let padded = b.bin("Add", &len, &block_minus_one);
    let count = b.bin("Div", &padded, block);
    let ids = b.op("Range", &[&zero, &count, &one], vec![]);
    let ids = b.unsqueeze(&ids, &[1]);
    let per_token = b.unsqueeze(&token_block, &[0]);
    let onehot = b.bin("Equal", &ids, &per_token);
    let onehot = b.cast(&onehot, DataType::F32);
    let counts = b.sum(&onehot, &[1], true);
    Blocks {
        token_block,
        onehot,
        counts,
    }
}

/// Mean over each block of `x` [B, H, L, D]: [B, H, N, D] (sum over the block's tokens / their count).
fn block_mean(b: &mut Body, blocks: &Blocks, x: &str) -> String {
    let sums = b.bin("MatMul", &blocks.onehot, x);
    b.bin("Div", &sums, &blocks.counts)
}

/// SpargeAttn's self-similarity of each block of `x` [B, H, L, D]: the mean pairwise cosine of its
/// tokens, `|mean of the unit rows|²` (the diagonal included), compared with `threshold`: [B, H, N].
fn self_similar(b: &mut Body, blocks: &Blocks, x: &str, threshold: &str) -> String {
    let squares = b.bin("Mul", x, x);
    let norms = b.sum(&squares, &[-1], true);
    let norms = b.op("Sqrt", &[&norms], vec![]);
    let tiny = b.f32(1e-30);
    let norms = b.op("Max", &[&norms, &tiny], vec![]);
    let unit = b.bin("Div", x, &norms);
    let mean = block_mean(b, blocks, &unit);
    let squares = b.bin("Mul", &mean, &mean);
    let similarity = b.sum(&squares, &[-1], false);
    b.bin("Greater", &similarity, threshold)
}

/// The key blocks the op keeps per query block, as the body computes them.
pub(crate) struct Selection {
    /// [B, H, Nq, Nk] bool: (query block, key block) pairs computed.
    pub(crate) mask: String,
    qb: Blocks,
    kb: Blocks,
}

/// The op's block selection (top-k or cumulative mass, dense warm-up) from its attributes
/// `block_q`, `block_k`, `keep_blocks`, `mass`, `sim_threshold`, `scale` and `dense_steps`.
pub(crate) fn select_blocks(b: &mut Body, q: &str, k: &str, step: &str) -> Selection {
    let scale = b.attribute("scale", false);
    let block_q = b.attribute("block_q", true);
    let block_k = b.attribute("block_k", true);
    let keep = b.attribute("keep_blocks", true);
    let mass = b.attribute("mass", false);
    let sim = b.attribute("sim_threshold", false);
    let dense_steps = b.attribute("dense_steps", true);
    // Blocks, K smoothing, pooled block scores [B, H, Nq, Nk].
    let qb = blocks(b, q, &block_q);
    let kb = blocks(b, k, &block_k);
    let k_sum = b.sum(k, &[-2], true);
    let k_shape = b.op("Shape", &[k], vec![]);
    let minus2 = b.i64(-2);
    let k_len = b.op(
        "Gather",
        &[&k_shape, &minus2],
        vec![("axis", AttrValue::Int(0))],
    );
    let k_len = b.cast(&k_len, DataType::F32);
    let k_mean = b.bin("Div", &k_sum, &k_len);
    let k_smooth = b.bin("Sub", k, &k_mean);
    let pooled_q = block_mean(b, &qb, q);
    let pooled_k = block_mean(b, &kb, &k_smooth);
    let pooled_k_t = b.transpose_last(&pooled_k);
    let scores = b.bin("MatMul", &pooled_q, &pooled_k_t);
    let scores_shape = b.op("Shape", &[&scores], vec![]);
    let zeros = b.op("ConstantOfShape", &[&scores_shape], vec![]);

    // Top-k (SLA): the keep_blocks highest pooled scores per query block.
    let keep_1d = b.unsqueeze(&keep, &[0]);
    let top = b.op_n(
        "TopK",
        &[&scores, &keep_1d],
        vec![
            ("axis", AttrValue::Int(-1)),
            ("largest", AttrValue::Int(1)),
            ("sorted", AttrValue::Int(1)),
        ],
        2,
    );
    let top_shape = b.op("Shape", &[&top[1]], vec![]);
    let ones = b.op(
        "ConstantOfShape",
        &[&top_shape],
        vec![(
            "value",
            AttrValue::Tensor(Tensor::from_f32("", vec![1], &[1.0])),
        )],
    );
    let top_mask = b.op(
        "ScatterElements",
        &[&zeros, &top[1], &ones],
        vec![("axis", AttrValue::Int(-1))],
    );
    let top_mask = b.cast(&top_mask, DataType::Bool);

    // Cumulative mass (SpargeAttn): softmax of the scaled pooled scores over the self-similar key
    // blocks, sorted; keep the blocks whose running sum stays within `mass` (at least one), plus
    // every block that is not self-similar.
    let key_ok = self_similar(b, &kb, &k_smooth, &sim);
    let query_ok = self_similar(b, &qb, q, &sim);
    let key_ok = b.unsqueeze(&key_ok, &[2]);
    let query_ok = b.unsqueeze(&query_ok, &[3]);
    let logits = b.bin("Mul", &scores, &scale);
    let excluded = b.f32(-1e30);
    let logits = b.op("Where", &[&key_ok, &logits, &excluded], vec![]);
    let probs = b.op("Softmax", &[&logits], vec![("axis", AttrValue::Int(-1))]);
    let nk = b.op("Shape", &[&scores], vec![]);
    let last = b.i64s(&[-1]);
    let nk = b.op("Gather", &[&nk, &last], vec![("axis", AttrValue::Int(0))]);
    let sorted = b.op_n(
        "TopK",
        &[&probs, &nk],
        vec![
            ("axis", AttrValue::Int(-1)),
            ("largest", AttrValue::Int(1)),
            ("sorted", AttrValue::Int(1)),
        ],
        2,
    );
    let axis = b.i64(-1);
    let cdf = b.op("CumSum", &[&sorted[0], &axis], vec![]);
    let within = b.bin("LessOrEqual", &cdf, &mass);
    let within = b.cast(&within, DataType::I64);
    let count = b.sum(&within, &[-1], true);
    let one = b.i64(1);
    let count = b.op("Max", &[&count, &one], vec![]);
    let (zero, one_step) = (b.i64(0), b.i64(1));
    let nk_scalar = b.op("Squeeze", &[&nk], vec![]);
    let ranks = b.op("Range", &[&zero, &nk_scalar, &one_step], vec![]);
    let keep_sorted = b.bin("Less", &ranks, &count);
    let keep_sorted = b.cast(&keep_sorted, DataType::F32);
    let mass_mask = b.op(
        "ScatterElements",
        &[&zeros, &sorted[1], &keep_sorted],
        vec![("axis", AttrValue::Int(-1))],
    );
    let mass_mask = b.cast(&mass_mask, DataType::Bool);
    let key_forced = b.op("Not", &[&key_ok], vec![]);
    let query_forced = b.op("Not", &[&query_ok], vec![]);
    let mass_mask = b.bin("Or", &mass_mask, &key_forced);
    let mass_mask = b.bin("Or", &mass_mask, &query_forced);

    let zero_f = b.f32(0.0);
    let use_mass = b.bin("Greater", &mass, &zero_f);
    // (Where on bools is not in every runtime: onnxruntime has no bool Where kernel.)
    let use_topk = b.op("Not", &[&use_mass], vec![]);
    let by_mass = b.bin("And", &use_mass, &mass_mask);
    let by_topk = b.bin("And", &use_topk, &top_mask);
    let mask = b.bin("Or", &by_mass, &by_topk);
    // Dense warm-up: every block at the first dense_steps steps.
    let dense = b.bin("Less", step, &dense_steps);
    let mask = b.bin("Or", &mask, &dense);

    Selection { mask, qb, kb }
}

impl Selection {
    /// The mask at token level: [B, H, Lq, Lk] bool.
    pub(crate) fn token_mask(&self, b: &mut Body) -> String {
        let (mask, qb, kb) = (&self.mask, &self.qb, &self.kb);
        let rows = b.op(
            "Gather",
            &[mask, &qb.token_block],
            vec![("axis", AttrValue::Int(2))],
        );
        b.op(
            "Gather",
            &[&rows, &kb.token_block],
            vec![("axis", AttrValue::Int(3))],
        )
    }

    /// Scores computed: Σ over kept block pairs of (query tokens x key tokens), an int64 scalar.
    pub(crate) fn kept_scores(&self, b: &mut Body) -> String {
        let (mask, kb) = (&self.mask, &self.kb);
        let kc_t = b.op(
            "Transpose",
            &[&kb.counts],
            vec![("perm", AttrValue::Ints(vec![1, 0]))],
        );
        let pair_tokens = b.bin("MatMul", &self.qb.counts, &kc_t);
        let pair_tokens = b.cast(&pair_tokens, DataType::I64);
        let mask_i = b.cast(mask, DataType::I64);
        let kept = b.bin("Mul", &mask_i, &pair_tokens);
        b.sum(&kept, &[0, 1, 2, 3], false)
    }
}

/// SLA's linear branch with its projection, gated by the attribute `linear` (0: zero).
pub(crate) fn linear_branch(
    b: &mut Body,
    q: &str,
    k: &str,
    v: &str,
    w: &str,
    bias: &str,
) -> String {
    let linear = b.attribute("linear", true);
    // SLA: phi = softmax over the head dim, o_l = phi(q)(phi(k)ᵀv) / (1e-5 +
    // phi(q)·Σphi(k)), then proj_l (x Wᵀ + b), gated by `linear`.
    let fq = b.op("Softmax", &[q], vec![("axis", AttrValue::Int(-1))]);
    let fk = b.op("Softmax", &[k], vec![("axis", AttrValue::Int(-1))]);
    let fk_t = b.transpose_last(&fk);
    let kv = b.bin("MatMul", &fk_t, v);
    let numerator = b.bin("MatMul", &fq, &kv);
    let k_total = b.sum(&fk, &[-2], true);
    let dots = b.bin("Mul", &fq, &k_total);
    let dots = b.sum(&dots, &[-1], true);
    let eps = b.f32(1e-5);
    let denominator = b.bin("Add", &dots, &eps);
    let linear_out = b.bin("Div", &numerator, &denominator);
    let w_t = b.op(
        "Transpose",
        &[w],
        vec![("perm", AttrValue::Ints(vec![1, 0]))],
    );
    let projected = b.bin("MatMul", &linear_out, &w_t);
    let projected = b.bin("Add", &projected, bias);
    let gate = b.cast(&linear, DataType::F32);
    b.bin("Mul", &projected, &gate)
}

/// The local function `ai.ditc.SparseLinearAttention`: the op's portable decomposition.
pub fn function(opset: i64) -> proto::FunctionProto {
    let mut b = Body { nodes: Vec::new() };
    let (q, k, v, step, w, bias) = ("Q", "K", "V", "step", "proj_weight", "proj_bias");
    let selection = select_blocks(&mut b, q, k, step);
    let token_mask = selection.token_mask(&mut b);
    // Sparse branch: exact softmax over the kept blocks' keys.
    let scale = b.attribute("scale", false);
    let q_scaled = b.bin("Mul", q, &scale);
    let k_t = b.transpose_last(k);
    let logits = b.bin("MatMul", &q_scaled, &k_t);
    let minus_inf = b.f32(f32::NEG_INFINITY);
    let logits = b.op("Where", &[&token_mask, &logits, &minus_inf], vec![]);
    let p = b.op("Softmax", &[&logits], vec![("axis", AttrValue::Int(-1))]);
    let sparse = b.bin("MatMul", &p, v);
    let projected = linear_branch(&mut b, q, k, v, w, bias);
    let out = b.bin("Add", &sparse, &projected);
    let kept = selection.kept_scores(&mut b);
    b.rename(&out, "O");
    b.rename(&kept, "kept");
    b.into_function(
        OP,
        (&[q, k, v, step, w, bias], &["O", "kept"]),
        ATTRIBUTES.iter().map(|s| s.to_string()).collect(),
        opset,
        "ditc's SparseLinearAttention: block-sparse softmax attention (SLA top-k or SpargeAttn cumulative mass) plus SLA's linear branch; see ditc's README",
    )
}
