//! Pass `broadcast-adaptive`: step caches that skip transformer blocks, baked into one graph.
//!
//! Options: `policy` (one of [`POLICIES`]) and that policy's options. Each policy's rule lives in its
//! own file under `src/schedule/`; this pass turns it into graph structure.
//!
//! `policy = "mag-cache"` ([`crate::schedule::mag_cache`]): the decision depends only on the step and
//! the calibrated ratios, so it is baked as a static table like PAB. The cached value is the residual
//! of the whole block stack on the hidden-states stream (`r = last block's output - first block's
//! input`, see [`crate::analysis::stack`]). Every node that only serves the stack's output moves into
//! the then-branch of an `If`, which returns the stack's output and `r`; the else-branch returns
//! `first block's input + ditc.state.<r>` and the state unchanged. The condition is
//! `Gather(ditc.table.stack, ditc.step)`; when the unconditional branch has its own table
//! (`mag_ratios_uncond`), the table is `[2, steps]` and the condition
//! `Gather(Gather(ditc.table.stack, ditc.branch), ditc.step)`, `ditc.branch` an int64 scalar input
//! (0 cond, 1 uncond). A runtime may instead pick a graph specialised per (step, branch) from the
//! manifest's `tables` / `uncond_tables`.
//!
//! `policy = "tea-cache"` ([`crate::schedule::tea_cache`]): TeaCache's indicator (Wan's timestep
//! embedding) depends only on the timestep, so its decisions are a static table too, computed at
//! conversion from the checkpoint's embedder weights and baked exactly as MagCache's.
//!
//! `forecast = "taylor"` (and `order`, 1 or 2), with every policy: on a skipped step the cached
//! residual is extrapolated from the last computed ones (TaylorSeer, [`crate::schedule::forecast`]);
//! the table policies gather the weights from a table, the in-graph ones compute them.
//!
//! `policy = "easy-cache"` ([`crate::schedule::easy_cache`], the default: it needs no calibration):
//! EasyCache's rule (the input's change scaled by the transformation rate measured between computed
//! calls, accumulated against a threshold) computed in the graph at every call, driving the same
//! whole-stack `If`; under guidance the unconditional call follows the conditional call's decision.
//!
//! `policy = "ada-cache"` ([`crate::schedule::ada_cache`]): AdaCache + MoReg, the number of steps
//! to reuse read from a codebook of one block's residual change (scaled by its motion over frames),
//! the counter kept as state; the same whole-stack `If`, its condition computed from the state.
//!
//! `policy = "first-block-cache"` ([`crate::schedule::first_block_cache`]): the decision depends on
//! the head blocks' residual, so the graph computes it at every call (an `If` on a computed condition);
//! the rewrite lives with the policy.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Context, Result};

use super::region::exclusive_region;
use super::{condition_name, Pass, PassContext, STEP_INPUT};
use crate::analysis::stack::{find_stack, Stack};
use crate::ir::{
    infer_types, AttrValue, DataType, Dim, Graph, Model, Node, Tensor, TypeMap, ValueInfo,
};
use crate::manifest::{Calls, Schedule, StateBinding};
use crate::schedule::ada_cache::{self, AdaCacheOptions};
use crate::schedule::easy_cache::{self, EasyCacheOptions};
use crate::schedule::first_block_cache::{self, FbcOptions};
use crate::schedule::forecast::{self, Taylor};
use crate::schedule::guidance::Branch;
use crate::schedule::mag_cache::{decisions, Decisions, MagCacheOptions};
use crate::schedule::tea_cache::{self, TeaCacheOptions};
use crate::schedule::Group;

/// The graph input carrying the guidance branch when decisions differ per branch.
pub const BRANCH_INPUT: &str = "ditc.branch";

/// The policies `broadcast-adaptive` knows.
pub const POLICIES: &[&str] = &[
    easy_cache::POLICY,
    ada_cache::POLICY,
    "mag-cache",
    first_block_cache::POLICY,
    tea_cache::POLICY,
];

/// One adaptive caching policy, baked into the graph.
pub trait AdaptivePolicy {
    fn bake(&self, model: &mut Model, cx: &mut PassContext) -> Result<()>;
}

pub struct BroadcastAdaptive {
    policy: Box<dyn AdaptivePolicy>,
}

impl BroadcastAdaptive {
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let mut options = options.clone();
        let name = match options.remove("policy") {
            Some(toml::Value::String(s)) => s,
            Some(other) => bail!("broadcast-adaptive.policy must be a string, got {other}"),
            // No calibration needed: the default for models without a calibrated table.
            None => easy_cache::POLICY.to_string(),
        };
        let forecast = Taylor::take_from(&mut options)?;
        let policy: Box<dyn AdaptivePolicy> = match name.as_str() {
            "mag-cache" => Box::new(MagCache(MagCacheOptions::from_table(&options)?, forecast)),
            first_block_cache::POLICY => {
                Box::new(FirstBlockCache(FbcOptions::from_table(&options)?, forecast))
            }
            ada_cache::POLICY => {
                Box::new(AdaCache(AdaCacheOptions::from_table(&options)?, forecast))
            }
            easy_cache::POLICY => {
                Box::new(EasyCache(EasyCacheOptions::from_table(&options)?, forecast))
            }
            tea_cache::POLICY => {
                Box::new(TeaCache(TeaCacheOptions::from_table(&options)?, forecast))
            }
            other => bail!(
                "broadcast-adaptive: unknown policy '{other}' (known: {})",
                POLICIES.join(", ")
            ),
        };
        Ok(BroadcastAdaptive { policy })
    }
}

impl Pass for BroadcastAdaptive {
    fn name(&self) -> &'static str {
        "broadcast-adaptive"
    }

    fn bakes_schedule(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        cx.schedule_sampler(model)?;
        self.policy.bake(model, cx)
    }
}

/// FirstBlockCache / DBCache: decided inside the graph at every call.
struct FirstBlockCache(FbcOptions, Option<Taylor>);

impl AdaptivePolicy for FirstBlockCache {
    fn bake(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        first_block_cache::bake(model, cx, &self.0, self.1)
    }
}

/// EasyCache: decided inside the graph from the input's change and the measured transformation rate.
struct EasyCache(EasyCacheOptions, Option<Taylor>);

impl AdaptivePolicy for EasyCache {
    fn bake(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        easy_cache::bake(model, cx, &self.0, self.1)
    }
}

/// AdaCache + MoReg: the steps to reuse from a codebook of the measured distance, decided in the graph.
struct AdaCache(AdaCacheOptions, Option<Taylor>);

impl AdaptivePolicy for AdaCache {
    fn bake(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        ada_cache::bake(model, cx, &self.0, self.1)
    }
}

/// MagCache: a static per-step (and per-branch) table driving the whole block stack.
struct MagCache(MagCacheOptions, Option<Taylor>);

impl AdaptivePolicy for MagCache {
    fn bake(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        let o = &self.0;
        if o.per_branch() && cx.guidance.is_none() {
            bail!("mag_ratios_uncond needs classifier-free guidance ([sampler.guidance]): without it there is no unconditional branch");
        }
        let steps = cx.sampler.as_ref().expect("checked").1.steps();
        let per_branch: BTreeMap<Branch, Decisions> = cx
            .branches()
            .iter()
            .map(|&b| Ok((b, decisions(o, &o.ratios(b)?, steps))))
            .collect::<Result<_>>()?;
        let mut options = serde_json::to_value(o)?;
        options["policy"] = "mag-cache".into();
        bake_static_stack(model, cx, "mag-cache", options, &per_branch, self.1)
    }
}

/// TeaCache: a static table from the timestep embedding's accumulated, rescaled change.
struct TeaCache(TeaCacheOptions, Option<Taylor>);

impl AdaptivePolicy for TeaCache {
    fn bake(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        let o = &self.0;
        let timesteps = cx.sampler.as_ref().expect("checked").1.timesteps.clone();
        let indicators = tea_cache::wan_indicators(model, &timesteps, o.use_ret_steps)?;
        // The indicator depends on the timestep only: every branch decides alike (on its own state).
        let per_branch: BTreeMap<Branch, Decisions> = cx
            .branches()
            .iter()
            .map(|&b| (b, tea_cache::decisions(o, &indicators)))
            .collect();
        let mut options = serde_json::to_value(o)?;
        options["policy"] = tea_cache::POLICY.into();
        bake_static_stack(model, cx, tea_cache::POLICY, options, &per_branch, self.1)
    }
}

/// Bake per-branch static decisions for the whole block stack (MagCache, TeaCache): the stack moves
/// into an `If` on `Gather(ditc.table.stack, ditc.step)` (per branch when the branches' tables
/// differ), and the schedule goes into the manifest with the metric each decision compared.
fn bake_static_stack(
    model: &mut Model,
    cx: &mut PassContext,
    policy: &str,
    mut options: serde_json::Value,
    per_branch: &BTreeMap<Branch, Decisions>,
    forecast: Option<Taylor>,
) -> Result<()> {
    let steps = cx.sampler.as_ref().expect("checked").1.steps();
    let cond = &per_branch[&Branch::Cond];
    let uncond = per_branch.get(&Branch::Uncond);
    let own_uncond = uncond.filter(|u| u.compute != cond.compute);
    if forecast.is_some() && own_uncond.is_some() {
        bail!("forecast = \"taylor\" with tables that differ per guidance branch is not implemented yet");
    }
    if let Some(t) = forecast {
        options["forecast"] = "taylor".into();
        options["order"] = t.order.into();
    }

    let types = infer_types(&model.graph, model.default_opset());
    let stack = find_stack(&model.graph, &cx.dit_map, &types)?;
    let sites: Vec<usize> = stack
        .blocks
        .iter()
        .flat_map(|b| cx.dit_map.blocks[b.block].attention.iter().copied())
        .collect();
    let anchors: Vec<String> = sites
        .iter()
        .map(|&id| cx.dit_map.attention[id].anchor.clone())
        .collect();
    let bindings = bake_stack(&mut model.graph, &stack, &anchors, &types, forecast)?;
    let tables: Vec<&[bool]> = std::iter::once(cond.compute.as_slice())
        .chain(own_uncond.map(|u| u.compute.as_slice()))
        .collect();
    if let Some(t) = forecast {
        add_forecast_table(&mut model.graph, &forecast::coefficients(&cond.compute, t));
    }
    add_stack_table(&mut model.graph, &tables);
    cx.state.extend(bindings);
    cx.step_input = Some(STEP_INPUT.to_string());
    if own_uncond.is_some() {
        cx.branch_input = Some(BRANCH_INPUT.to_string());
    }

    let computed: usize = per_branch
        .values()
        .map(|d| d.compute.iter().filter(|&&c| c).count())
        .sum();
    cx.schedule = Some(Schedule {
        policy: policy.into(),
        options,
        tables: BTreeMap::from([(Group::Stack, cond.compute.clone())]),
        uncond_tables: own_uncond.map(|u| BTreeMap::from([(Group::Stack, u.compute.clone())])),
        metrics: Some(
            per_branch
                .iter()
                .map(|(b, d)| (*b, d.metric.clone()))
                .collect(),
        ),
        sites: BTreeMap::from([(Group::Stack, sites)]),
        blocks: Vec::new(),
        calls: BTreeMap::from([(
            Group::Stack,
            Calls {
                computed,
                total: steps * per_branch.len(),
            },
        )]),
        block_tables: Vec::new(),
        adaptive: None,
    });
    Ok(())
}

/// The name of the bool deciding whether the stack computes (`ditc.compute.stack`).
fn stack_condition() -> String {
    condition_name(Group::Stack)
}

/// Move every node that only serves the stack's output into an `If` on [`stack_condition`]: the
/// then-branch returns the output and the stack's residual, the else-branch the stack's input plus
/// the cached residual, and that residual unchanged.
/// `anchors` are the stack's attention nodes (all must move).
/// With `forecast` (TaylorSeer, [`crate::schedule::forecast`]), the last `order + 1` computed
/// residuals are state (newest first) and the else-branch adds their combination weighted by
/// `ditc.forecast.weights` (one row of `ditc.table.stack.forecast`, gathered at the step) instead of
/// the newest one alone.
pub fn bake_stack(
    graph: &mut Graph,
    stack: &Stack,
    anchors: &[String],
    types: &TypeMap,
    forecast: Option<Taylor>,
) -> Result<Vec<StateBinding>> {
    bake_stack_with(graph, stack, anchors, types, forecast, &[])
}

/// A value the stack's `If` also returns: computed by `nodes` (appended to the then-branch, they
/// may read any value of the stack) as `then_value`, and `else_value` (a value of the enclosing
/// graph, e.g. a state input) on a skipped call; the `If`'s output is `output`.
pub struct IfExtra {
    pub nodes: Vec<Node>,
    pub then_value: String,
    pub else_value: String,
    pub output: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

/// [`bake_stack`], with `extras` returned by the `If` as well.
pub fn bake_stack_with(
    graph: &mut Graph,
    stack: &Stack,
    anchors: &[String],
    types: &TypeMap,
    forecast: Option<Taylor>,
    extras: &[IfExtra],
) -> Result<Vec<StateBinding>> {
    let (input, output) = (stack.input().to_string(), stack.output().to_string());
    let dtype = types
        .get(&output)
        .and_then(|t| t.dtype)
        .with_context(|| format!("the type of the stack's output '{output}' is unknown"))?;
    let keep: HashSet<String> = HashSet::from([input.clone()]);
    let region = exclusive_region(graph, &output, &keep)
        .with_context(|| format!("cannot isolate the nodes computing '{output}'"))?;
    check_region_covers(graph, &region, anchors)?;

    let dims: Vec<Dim> = stack.shape.iter().map(|&d| Dim::Value(d)).collect();
    let cached = format!("{output}.stack_residual");
    let state_in = format!("ditc.state.{cached}");
    let state_out = format!("ditc.state_out.{cached}");
    let (computed, residual) = (format!("{output}.computed"), format!("{cached}.computed"));
    let (reused, kept) = (format!("{output}.reused"), format!("{cached}.kept"));
    let tensor = |name: &str| ValueInfo::tensor(name, dtype, dims.clone());

    let first = region[0];
    let in_region: HashSet<usize> = region.iter().copied().collect();
    let (mut moved, mut others) = (Vec::new(), Vec::new());
    for (i, node) in std::mem::take(&mut graph.nodes).into_iter().enumerate() {
        if in_region.contains(&i) {
            moved.push(node);
        } else {
            others.push(node);
        }
    }
    for node in &mut moved {
        for o in node.outputs.iter_mut().filter(|o| **o == output) {
            *o = computed.clone();
        }
    }
    moved.push(Node::new(
        "ditc.stack.residual",
        "Sub",
        &[&computed, &input],
        &[&residual],
    ));
    let mut then_branch = Graph {
        name: "ditc.stack.compute".into(),
        nodes: moved,
        outputs: vec![tensor(&computed), tensor(&residual)],
        ..Graph::default()
    };
    // Older residuals kept for a forecast: state j holds the j-th newest computed residual.
    let older = forecast.map_or(0, |t| t.order);
    let state = |j: usize, io: &str| match j {
        0 => format!("ditc.{io}.{cached}"),
        j => format!("ditc.{io}.{cached}.{j}"),
    };
    let mut else_nodes = Vec::new();
    let mut else_outputs = vec![tensor(&reused), tensor(&kept)];
    let mut if_outputs = vec![output.clone(), state_out.clone()];
    for j in 1..=older {
        let shifted = format!("{cached}.{j}.shifted");
        then_branch.nodes.push(Node::new(
            &format!("ditc.stack.shift.{j}"),
            "Identity",
            &[&state(j - 1, "state")],
            &[&shifted],
        ));
        then_branch.outputs.push(tensor(&shifted));
        let unchanged = format!("{cached}.{j}.kept");
        else_nodes.push(Node::new(
            &format!("ditc.stack.keep.{j}"),
            "Identity",
            &[&state(j, "state")],
            &[&unchanged],
        ));
        else_outputs.push(tensor(&unchanged));
        if_outputs.push(state(j, "state_out"));
    }
    for (k, x) in extras.iter().enumerate() {
        let dims: Vec<Dim> = x.shape.iter().map(|&d| Dim::Value(d)).collect();
        then_branch.nodes.extend(x.nodes.iter().cloned());
        then_branch
            .outputs
            .push(ValueInfo::tensor(&x.then_value, x.dtype, dims.clone()));
        let kept = format!("ditc.stack.extra.{k}.kept");
        else_nodes.push(Node::new(&kept, "Identity", &[&x.else_value], &[&kept]));
        else_outputs.push(ValueInfo::tensor(&kept, x.dtype, dims));
        if_outputs.push(x.output.clone());
    }
    let estimate = if older == 0 {
        state_in.clone()
    } else {
        forecast_nodes(graph, &mut else_nodes, older, &|j| state(j, "state"))
    };
    else_nodes.insert(
        0,
        Node::new("ditc.stack.keep", "Identity", &[&state_in], &[&kept]),
    );
    else_nodes.push(Node::new(
        "ditc.stack.reuse",
        "Add",
        &[&input, &estimate],
        &[&reused],
    ));
    let else_branch = Graph {
        name: "ditc.stack.reuse".into(),
        nodes: else_nodes,
        outputs: else_outputs,
        ..Graph::default()
    };
    let outputs: Vec<&str> = if_outputs.iter().map(String::as_str).collect();
    let if_node = Node::new("ditc.stack.cache", "If", &[&stack_condition()], &outputs)
        .with_attr("then_branch", AttrValue::Graph(then_branch))
        .with_attr("else_branch", AttrValue::Graph(else_branch));
    others.insert(first.min(others.len()), if_node);
    graph.nodes = others;
    let mut bindings = Vec::new();
    for j in 0..=older {
        graph.inputs.push(tensor(&state(j, "state")));
        graph.outputs.push(tensor(&state(j, "state_out")));
        bindings.push(StateBinding {
            group: Group::Stack,
            site: None,
            block: None,
            table_block: None,
            input: state(j, "state"),
            output: state(j, "state_out"),
            dtype: dtype.to_string(),
            shape: stack.shape.clone(),
            initial: "zeros".into(),
        });
    }
    Ok(bindings)
}

/// Nodes (appended to `nodes`, inside the else-branch) computing `Σ_j w_j · state_j` for `j` in
/// `0..=older`, `w` = `ditc.forecast.weights`; the index constants go into `graph`. Returns the sum.
pub fn forecast_nodes(
    graph: &mut Graph,
    nodes: &mut Vec<Node>,
    older: usize,
    state: &dyn Fn(usize) -> String,
) -> String {
    let mut sum = String::new();
    for j in 0..=older {
        let index = format!("ditc.forecast.index.{j}");
        graph
            .initializers
            .push(Tensor::from_i64(&index, vec![], &[j as i64]));
        let weight = format!("ditc.forecast.weight.{j}");
        nodes.push(
            Node::new(
                &format!("ditc.forecast.weight.{j}"),
                "Gather",
                &[FORECAST_WEIGHTS, &index],
                &[&weight],
            )
            .with_attr("axis", AttrValue::Int(0)),
        );
        let term = format!("ditc.forecast.term.{j}");
        nodes.push(Node::new(
            &format!("ditc.forecast.term.{j}"),
            "Mul",
            &[&state(j), &weight],
            &[&term],
        ));
        if j == 0 {
            sum = term;
        } else {
            let next = format!("ditc.forecast.sum.{j}");
            nodes.push(Node::new(
                &format!("ditc.forecast.sum.{j}"),
                "Add",
                &[&sum, &term],
                &[&next],
            ));
            sum = next;
        }
    }
    sum
}

/// The forecast weights of the current step (gathered from `ditc.table.stack.forecast`, or computed
/// in the graph by a policy that decides there), f32 `[order + 1]`, newest residual first.
pub const FORECAST_WEIGHTS: &str = "ditc.forecast.weights";

/// `ditc.table.stack.forecast` [steps, order + 1] and the node gathering its row at the step.
fn add_forecast_table(graph: &mut Graph, weights: &[Vec<f64>]) {
    let (steps, width) = (weights.len() as i64, weights[0].len() as i64);
    let name = "ditc.table.stack.forecast";
    let flat: Vec<f32> = weights.iter().flatten().map(|&w| w as f32).collect();
    graph
        .initializers
        .push(Tensor::from_f32(name, vec![steps, width], &flat));
    graph.nodes.insert(
        0,
        Node::new(
            "ditc.forecast.weights",
            "Gather",
            &[name, STEP_INPUT],
            &[FORECAST_WEIGHTS],
        )
        .with_attr("axis", AttrValue::Int(0)),
    );
}

/// Every attention site of the stack must be inside the region, else skipping the stack would not
/// skip it (a block value read outside the stack, e.g. a graph output).
fn check_region_covers(graph: &Graph, region: &[usize], anchors: &[String]) -> Result<()> {
    let moved: HashSet<&str> = region
        .iter()
        .map(|&i| graph.nodes[i].name.as_str())
        .collect();
    if let Some(a) = anchors.iter().find(|a| !moved.contains(a.as_str())) {
        bail!("attention '{a}' also serves values outside the block stack, so the stack cannot be skipped as a whole");
    }
    Ok(())
}

/// `ditc.step` (and `ditc.branch` for two tables) and the node computing [`stack_condition`] from the
/// constant table(s).
fn add_stack_table(graph: &mut Graph, tables: &[&[bool]]) {
    let steps = tables[0].len() as i64;
    if !graph.inputs.iter().any(|i| i.name == STEP_INPUT) {
        graph
            .inputs
            .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
    }
    let name = "ditc.table.stack";
    let raw: Vec<u8> = tables
        .iter()
        .flat_map(|t| t.iter().map(|&c| c as u8))
        .collect();
    let mut dims = vec![steps];
    let mut table = name.to_string();
    let mut nodes = Vec::new();
    if tables.len() == 2 {
        dims.insert(0, 2);
        graph
            .inputs
            .push(ValueInfo::tensor(BRANCH_INPUT, DataType::I64, vec![]));
        table = "ditc.table.stack.branch".into();
        nodes.push(
            Node::new(
                "ditc.decide.stack.branch",
                "Gather",
                &[name, BRANCH_INPUT],
                &[&table],
            )
            .with_attr("axis", AttrValue::Int(0)),
        );
    }
    let tensor =
        Tensor::from_raw(name, DataType::Bool, dims, raw.into()).expect("one byte per entry");
    graph.initializers.push(tensor);
    nodes.push(
        Node::new(
            "ditc.decide.stack",
            "Gather",
            &[&table, STEP_INPUT],
            &[&stack_condition()],
        )
        .with_attr("axis", AttrValue::Int(0)),
    );
    for (i, n) in nodes.into_iter().enumerate() {
        graph.nodes.insert(i, n);
    }
}
