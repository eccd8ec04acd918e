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
//! per step; `table.mlp` drives every block's MLP), and per block (`table.blocks = { 3 = { cross =
//! "..." } }`: block 3's values of that group follow it instead, `ditc.table.cross.block3`, condition
//! `ditc.compute.cross.block3`). Needs a sampler (the timesteps).
//!
//! Invariants: consumers of a site's output are untouched (the `If` produces the same value name); sites
//! with period 1 and kinds without settings stay unconditional; moved nodes feed nothing else.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Context, Result};

use super::region::exclusive_region;
use super::{Pass, PassContext};
use crate::analysis::AttentionKind;
use crate::ir::{
    infer_types, AttrValue, DataType, Dim, Graph, Model, Node, Tensor, TypeMap, ValueInfo,
};
use crate::manifest::{BlockTable, Calls, Schedule, StateBinding};
use crate::schedule::pab::{block_table, tables, BlockTables, PabOptions};
use crate::schedule::{Decider, Group};

pub const STEP_INPUT: &str = "ditc.step";

pub struct BroadcastStatic {
    options: PabOptions,
}

impl BroadcastStatic {
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let options: PabOptions = options
            .clone()
            .try_into()
            .context("invalid broadcast-static options (valid keys: spatial, temporal, cross, full, mlp, table; each kind takes period and window; mlp takes timesteps, blocks, reuse; table takes spatial, temporal, cross, full, mlp, each a string of one C (compute) or R (reuse) per step, and blocks = { INDEX = { the same keys } } for one block alone)")?;
        options.validate()?;
        Ok(BroadcastStatic { options })
    }
}

/// Name of the bool value deciding whether the values of `decider` (a group, or one block's values of
/// a group) compute at this step.
pub fn condition_name(decider: impl Into<Decider>) -> String {
    format!("ditc.compute.{}", decider.into().name())
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
        let block_tables = match &self.options.table {
            Some(t) => t.block_tables(Some(steps))?,
            None => BlockTables::new(),
        };
        check_block_tables(&block_tables, &cx.dit_map)?;
        let types = infer_types(&model.graph, model.default_opset());
        // What drives each value: its block's own table, else its group's.
        let decider = |block: Option<usize>, group: Group| -> Option<Decider> {
            let own = block.filter(|&b| block_table(&block_tables, b, group).is_some());
            match own {
                Some(b) => Some(Decider::in_block(group, b)),
                None => tables.contains_key(&group).then_some(group.into()),
            }
        };
        let mut members: BTreeMap<Decider, Vec<usize>> = BTreeMap::new();
        for site in &cx.dit_map.attention {
            let group = Group::from(site.kind);
            let Some(d) = decider(cx.dit_map.block_of(site.id).map(|b| b.index), group) else {
                continue;
            };
            let what = format!("attention site {} ({})", site.id, site.anchor);
            let Some(output) = &site.output else {
                bail!(
                    "{what}: its output projection was not found, so its result cannot be cached"
                );
            };
            let mut binding = bake_value(
                &mut model.graph,
                output,
                d,
                &format!("site{}", site.id),
                &types,
            )
            .with_context(|| what.clone())?;
            binding.site = Some(site.id);
            cx.state.push(binding);
            members.entry(d).or_default().push(site.id);
        }
        // `mlp` lists blocks; an explicit `table.mlp` drives every block's MLP.
        let listed = self.options.mlp.as_ref().map(|m| &m.blocks);
        let mut mlps = 0;
        for block in &cx.dit_map.blocks {
            let group_table = tables.contains_key(&Group::Mlp)
                && listed.is_none_or(|l| l.contains(&block.family_index));
            let d = match decider(Some(block.index), Group::Mlp) {
                Some(d) if d.block.is_some() || group_table => d,
                _ => continue,
            };
            let what = format!("the MLP of block {} ({})", block.index, block.name);
            let Some(output) = &block.ffn_output else {
                if d.block.is_some() {
                    bail!(
                        "broadcast-static.table.blocks.{}.mlp: {what} was not found",
                        block.index
                    );
                }
                continue;
            };
            let mut binding = bake_value(
                &mut model.graph,
                output,
                d,
                &format!("block{}.mlp", block.index),
                &types,
            )
            .with_context(|| what.clone())?;
            binding.block = Some(block.index);
            cx.state.push(binding);
            members.entry(d).or_default().push(block.index);
            mlps += 1;
        }
        if tables.contains_key(&Group::Mlp) && mlps == 0 {
            match listed {
                Some(l) => bail!(
                    "mlp.blocks {l:?} match no transformer block with a feed-forward network"
                ),
                None => bail!(
                    "broadcast-static.table.mlp: the model has no transformer block with a feed-forward network"
                ),
            }
        }
        let table_of = |d: &Decider| -> &Vec<bool> {
            match d.block {
                Some(b) => {
                    block_table(&block_tables, b, d.group).expect("a block decider has its table")
                }
                None => &tables[&d.group],
            }
        };
        if !members.is_empty() {
            let used: BTreeMap<Decider, &Vec<bool>> =
                members.keys().map(|d| (*d, table_of(d))).collect();
            add_decision_tables(&mut model.graph, &used, steps);
            cx.step_input = Some(STEP_INPUT.to_string());
        }
        // Every branch runs the same tables (with its own state).
        let branches = cx.branches().len();
        let mut calls: BTreeMap<Group, Calls> = BTreeMap::new();
        for (d, ids) in &members {
            let computed = table_of(d).iter().filter(|&&c| c).count() * ids.len();
            let c = calls.entry(d.group).or_insert(Calls {
                computed: 0,
                total: 0,
            });
            c.computed += computed * branches;
            c.total += steps * ids.len() * branches;
        }
        let mut group_sites: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
        let mut blocks = Vec::new();
        let mut own = Vec::new();
        for (d, ids) in &members {
            match (d.block, d.group) {
                (None, Group::Mlp) => blocks.extend(ids.iter().copied()),
                (None, g) => group_sites
                    .entry(g)
                    .or_default()
                    .extend(ids.iter().copied()),
                (Some(block), group) => own.push(BlockTable {
                    block,
                    group,
                    table: table_of(d).clone(),
                    sites: if group == Group::Mlp {
                        Vec::new()
                    } else {
                        ids.clone()
                    },
                }),
            }
        }
        let used_groups: Vec<Group> = members
            .keys()
            .filter(|d| d.block.is_none())
            .map(|d| d.group)
            .collect();
        cx.schedule = Some(Schedule {
            policy: "pab-static".into(),
            options: serde_json::to_value(&self.options)?,
            tables: tables
                .into_iter()
                .filter(|(g, _)| used_groups.contains(g))
                .collect(),
            uncond_tables: None,
            metrics: None,
            sites: group_sites,
            blocks,
            calls,
            adaptive: None,
            block_tables: own,
        });
        Ok(())
    }
}

/// Every per-block table names a block of the model and a group the block has values of.
fn check_block_tables(tables: &BlockTables, map: &crate::analysis::DitMap) -> Result<()> {
    for &(index, group) in tables.keys() {
        let what = format!("broadcast-static.table.blocks.{index}.{}", group.as_str());
        let Some(block) = map.blocks.iter().find(|b| b.index == index) else {
            bail!(
                "{what}: the model has {} transformer blocks (0..{}): block {index} does not exist",
                map.blocks.len(),
                map.blocks.len()
            );
        };
        let has = match group {
            Group::Mlp => block.ffn.is_some(),
            g => block
                .kinds
                .iter()
                .any(|&k| Group::from(k) == g || (g == Group::Spatial && k == AttentionKind::Full)),
        };
        if !has {
            let kinds: Vec<&str> = block.kinds.iter().map(|k| k.as_str()).collect();
            bail!(
                "{what}: block {index} ({}) has no such values (its attention: {kinds:?}{})",
                block.name,
                if block.ffn.is_some() {
                    ", and an MLP"
                } else {
                    ", no MLP"
                }
            );
        }
    }
    Ok(())
}

fn add_decision_tables(graph: &mut Graph, tables: &BTreeMap<Decider, &Vec<bool>>, steps: usize) {
    graph
        .inputs
        .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
    for (decider, table) in tables {
        let name = format!("ditc.table.{decider}");
        let raw: Vec<u8> = table.iter().map(|&c| c as u8).collect();
        let tensor = Tensor::from_raw(&name, DataType::Bool, vec![steps as i64], raw.into())
            .expect("one byte per step");
        graph.initializers.push(tensor);
        let gather = Node::new(
            &format!("ditc.decide.{decider}"),
            "Gather",
            &[&name, STEP_INPUT],
            &[&condition_name(*decider)],
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
    decider: Decider,
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
        &[&condition_name(decider)],
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
        group: decider.group,
        site: None,
        block: None,
        table_block: decider.block,
        input: state_in,
        output: state_out,
        dtype: dtype.to_string(),
        shape,
        initial: "zeros".into(),
    })
}
