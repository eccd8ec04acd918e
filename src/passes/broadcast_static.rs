//! Pass `broadcast-static`: Pyramid Attention Broadcast baked into one graph.
//!
//! Rewrites: for every attention site whose kind has a period > 1, the nodes that only serve that
//! site's output (after its output projection and bias: projections, norms, softmax, ...) move into the
//! then-branch of an `If`; the else-branch returns the state input `ditc.state.<output>`. The `If`
//! condition is `Gather(ditc.table.<kind>, ditc.step)`, a constant bool table of the static schedule
//! (reference.md §1 decision rule, step 0 always computes). The site's result is also returned as
//! `ditc.state_out.<output>`, which the runtime feeds back at the next step.
//!
//! MLP broadcast (`mlp = { timesteps, blocks, reuse }`) bakes the same way around each listed block's
//! FFN result (after its second linear layer and bias), with one `ditc.table.mlp`.
//!
//! Options: `spatial`, `temporal`, `cross`, `full` (defaults to `spatial`), each `{ period, window }`,
//! and `mlp`; or per group an explicit table (`table = { full = "CCRC...", mlp = "..." }`, one letter
//! per step; `table.mlp` drives every block's MLP). Needs a sampler (the timesteps).
//!
//! Invariants: consumers of a site's output are untouched (the `If` produces the same value name); sites
//! with period 1 and kinds without settings stay unconditional; moved nodes feed nothing else.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Context, Result};

use super::region::exclusive_region;
use super::{Pass, PassContext};
use crate::ir::{
    infer_types, AttrValue, DataType, Dim, Graph, Model, Node, Tensor, TypeMap, ValueInfo,
};
use crate::manifest::{Calls, Schedule, StateBinding};
use crate::schedule::pab::{tables, PabOptions};
use crate::schedule::Group;

pub const STEP_INPUT: &str = "ditc.step";

pub struct BroadcastStatic {
    options: PabOptions,
}

impl BroadcastStatic {
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let options: PabOptions = options
            .clone()
            .try_into()
            .context("invalid broadcast-static options (valid keys: spatial, temporal, cross, full, mlp, table; each kind takes period and window; mlp takes timesteps, blocks, reuse; table takes spatial, temporal, cross, full, mlp, each a string of one C (compute) or R (reuse) per step)")?;
        options.validate()?;
        Ok(BroadcastStatic { options })
    }
}

/// Name of the bool value deciding whether the values of `group` compute at this step.
pub fn condition_name(group: Group) -> String {
    format!("ditc.compute.{}", group.as_str())
}

impl Pass for BroadcastStatic {
    fn name(&self) -> &'static str {
        "broadcast-static"
    }

    fn bakes_schedule(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        let sampler = cx.schedule_sampler(model)?;
        let steps = sampler.steps();
        let tables = tables(&self.options, &sampler.timesteps)?;
        let types = infer_types(&model.graph, model.default_opset());
        let mut members: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
        for site in &cx.dit_map.attention {
            let group = Group::from(site.kind);
            if !tables.contains_key(&group) {
                continue;
            }
            let what = format!("attention site {} ({})", site.id, site.anchor);
            let Some(output) = &site.output else {
                bail!(
                    "{what}: its output projection was not found, so its result cannot be cached"
                );
            };
            let mut binding = bake_value(
                &mut model.graph,
                output,
                group,
                &format!("site{}", site.id),
                &types,
            )
            .with_context(|| what.clone())?;
            binding.site = Some(site.id);
            cx.state.push(binding);
            members.entry(group).or_default().push(site.id);
        }
        if tables.contains_key(&Group::Mlp) {
            // `mlp` lists blocks; an explicit `table.mlp` drives every block's MLP.
            let listed = self.options.mlp.as_ref().map(|m| &m.blocks);
            for block in cx
                .dit_map
                .blocks
                .iter()
                .filter(|b| listed.is_none_or(|l| l.contains(&b.family_index)))
            {
                let what = format!("the MLP of block {} ({})", block.index, block.name);
                let Some(output) = &block.ffn_output else {
                    continue;
                };
                let mut binding = bake_value(
                    &mut model.graph,
                    output,
                    Group::Mlp,
                    &format!("block{}.mlp", block.index),
                    &types,
                )
                .with_context(|| what.clone())?;
                binding.block = Some(block.index);
                cx.state.push(binding);
                members.entry(Group::Mlp).or_default().push(block.index);
            }
            if !members.contains_key(&Group::Mlp) {
                match listed {
                    Some(l) => bail!(
                        "mlp.blocks {l:?} match no transformer block with a feed-forward network"
                    ),
                    None => bail!(
                        "broadcast-static.table.mlp: the model has no transformer block with a feed-forward network"
                    ),
                }
            }
        }
        if !members.is_empty() {
            add_decision_tables(&mut model.graph, &tables, steps, &members);
            cx.step_input = Some(STEP_INPUT.to_string());
        }
        // Every branch runs the same tables (with its own state).
        let branches = cx.branches().len();
        let calls = members
            .iter()
            .map(|(g, ids)| {
                let computed = tables[g].iter().filter(|&&c| c).count() * ids.len();
                (
                    *g,
                    Calls {
                        computed: computed * branches,
                        total: steps * ids.len() * branches,
                    },
                )
            })
            .collect();
        let blocks = members.remove(&Group::Mlp).unwrap_or_default();
        cx.schedule = Some(Schedule {
            policy: "pab-static".into(),
            options: serde_json::to_value(&self.options)?,
            tables: tables
                .into_iter()
                .filter(|(g, _)| {
                    members.contains_key(g) || (*g == Group::Mlp && !blocks.is_empty())
                })
                .collect(),
            uncond_tables: None,
            metrics: None,
            sites: members,
            blocks,
            calls,
            adaptive: None,
        });
        Ok(())
    }
}

fn add_decision_tables(
    graph: &mut Graph,
    tables: &BTreeMap<Group, Vec<bool>>,
    steps: usize,
    used: &BTreeMap<Group, Vec<usize>>,
) {
    graph
        .inputs
        .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
    for (group, table) in tables.iter().filter(|(g, _)| used.contains_key(g)) {
        let name = format!("ditc.table.{}", group.as_str());
        let raw: Vec<u8> = table.iter().map(|&c| c as u8).collect();
        let tensor = Tensor::from_raw(&name, DataType::Bool, vec![steps as i64], raw.into())
            .expect("one byte per step");
        graph.initializers.push(tensor);
        let gather = Node::new(
            &format!("ditc.decide.{}", group.as_str()),
            "Gather",
            &[&name, STEP_INPUT],
            &[&condition_name(*group)],
        )
        .with_attr("axis", AttrValue::Int(0));
        graph.nodes.insert(0, gather);
    }
}

/// Move the nodes that only compute `output` into an `If` on `group`'s decision; returns the state
/// binding the runtime must carry.
fn bake_value(
    graph: &mut Graph,
    output: &str,
    group: Group,
    label: &str,
    types: &TypeMap,
) -> Result<StateBinding> {
    let output = output.to_string();
    let info = types.get(&output).cloned().unwrap_or_default();
    let (Some(dtype), Some(shape)) = (info.dtype, info.shape) else {
        bail!("the shape of '{output}' is unknown");
    };
    let region = exclusive_region(graph, &output, &HashSet::new())
        .with_context(|| format!("cannot isolate the nodes computing '{output}'"))?;
    let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Value(d)).collect();
    let computed = format!("{output}.computed");
    let reused = format!("{output}.reused");
    let state_in = format!("ditc.state.{output}");
    let state_out = format!("ditc.state_out.{output}");

    let first = region[0];
    let in_region: HashSet<usize> = region.iter().copied().collect();
    let (mut moved, mut kept) = (
        Vec::with_capacity(region.len()),
        Vec::with_capacity(graph.nodes.len()),
    );
    for (i, node) in std::mem::take(&mut graph.nodes).into_iter().enumerate() {
        if in_region.contains(&i) {
            moved.push(node);
        } else {
            kept.push(node);
        }
    }
    for node in &mut moved {
        for o in node.outputs.iter_mut().filter(|o| **o == output) {
            *o = computed.clone();
        }
    }
    let then_branch = Graph {
        name: format!("ditc.{label}.compute"),
        nodes: moved,
        outputs: vec![ValueInfo::tensor(&computed, dtype, dims.clone())],
        ..Graph::default()
    };
    let else_branch = Graph {
        name: format!("ditc.{label}.reuse"),
        nodes: vec![Node::new(
            &format!("ditc.{label}.reuse"),
            "Identity",
            &[&state_in],
            &[&reused],
        )],
        outputs: vec![ValueInfo::tensor(&reused, dtype, dims.clone())],
        ..Graph::default()
    };
    let if_node = Node::new(
        &format!("ditc.{label}.broadcast"),
        "If",
        &[&condition_name(group)],
        &[&output],
    )
    .with_attr("then_branch", AttrValue::Graph(then_branch))
    .with_attr("else_branch", AttrValue::Graph(else_branch));
    let save = Node::new(
        &format!("ditc.{label}.save"),
        "Identity",
        &[&output],
        &[&state_out],
    );
    let at = first.min(kept.len());
    kept.insert(at, save);
    kept.insert(at, if_node);
    graph.nodes = kept;
    graph
        .inputs
        .push(ValueInfo::tensor(&state_in, dtype, dims.clone()));
    graph
        .outputs
        .push(ValueInfo::tensor(&state_out, dtype, dims));
    Ok(StateBinding {
        group,
        site: None,
        block: None,
        input: state_in,
        output: state_out,
        dtype: dtype.to_string(),
        shape,
        initial: "zeros".into(),
    })
}
