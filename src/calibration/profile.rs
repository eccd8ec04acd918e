//! Drift profiling (`ditc calibrate --profile`): how much every value a step cache looks at changes
//! from one sampling step to the next, per guidance branch, along a full run of the float model.
//!
//! The quantities, found from graph structure ([`find_quantities`]):
//! - `output`: the model's prediction (what TeaCache's polynomial predicts the change of);
//! - `first_block_residual`: block 0's output − input (FirstBlockCache's metric, research spec §1);
//! - `timestep_embedding` / `timestep_modulation`: Wan's `e` and `e0` (TeaCache4Wan2.1's indicator
//!   without / with `use_ret_steps`, spec §4), and `modulated_input`: the input of block 0's first
//!   attention's query projection, the timestep-modulated input TeaCache's other ports read;
//! - `mid_block_residual`: the middle block's output − input, and `mid_block_attention_residual`: its
//!   gated self-attention residual (the term its first residual `Add` adds to the stream), AdaCache's
//!   metric on models without temporal attention (spec §5);
//! - `mid_block_motion`: AdaCache's MoReg motion of that residual (how much it differs from one frame
//!   to the next, a per-step value, not a change between steps);
//! - `stack_residual`: the whole stack's output − input (what MagCache and TeaCache reuse), and
//!   `mag_ratio`: MagCache's ratio of consecutive stack-residual norms (spec §2);
//! - `attention.<id>`: every attention site's output (what PAB reuses), and `mlp.<block>`: every
//!   transformer block's MLP output (what `broadcast-static`'s MLP table reuses); `ditc tune`'s static
//!   tables are built from these two.
//!
//! Measures: `rel_l1`, `mean|x_t − x_{t−1}| / mean|x_{t−1}|` between consecutive steps of one branch
//! (f64 sums over f32 values; null at step 0 and where not finite), as FirstBlockCache and TeaCache
//! compute their distances; `norm_ratio`, MagCache's `mean(‖r_t‖₂ / (‖r_{t−1}‖₂ + 1e-8))` (1.0 at
//! step 0), as `ditc calibrate --mag-ratios` measures it. Residuals are differences of two graph
//! values taken in f32, as the graph takes them. Everything is read as extra outputs of a copy of the
//! graph, every step computing (no cache), so each step compares with the step before.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::full_run::{output_f32, run_full, Calibration};
use super::mag_ratios::mean_norm_ratio;
use crate::analysis::axes::FRAME;
use crate::analysis::stack::{find_stack, BlockSpan};
use crate::analysis::{analyse, DitMap};
use crate::ir::{infer_types, Graph, Model, Tensor, TypeMap, ValueInfo, ValueType};
use crate::schedule::guidance::{branches, Branch};
use crate::schedule::tea_cache::relative_l1;

pub const PROFILE_FORMAT: &str = "ditc-profile";
/// The JSON Schema of `profile.json` (`schemas/profile.schema.json`).
pub const PROFILE_SCHEMA: &str = include_str!("../../schemas/profile.schema.json");

/// `profile.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub format: String,
    pub version: u32,
    pub source: String,
    pub steps: usize,
    /// The sampler's timestep at each step.
    pub timesteps: Vec<f64>,
    /// The calibration cases, in the order of each quantity's per-case series.
    pub cases: Vec<String>,
    pub branches: Vec<Branch>,
    pub quantities: Vec<QuantityProfile>,
    /// Quantities this model does not have, and why.
    #[serde(default)]
    pub left_out: Vec<LeftOut>,
}

/// What one quantity's values are grouped with in the pictures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantityGroup {
    /// The model's prediction.
    Output,
    /// A value an adaptive policy decides or reuses by.
    Policy,
    /// An attention site's output.
    Attention,
    /// A transformer block's MLP output.
    Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    RelL1,
    NormRatio,
    /// AdaCache's MoReg motion of one step's value (not a change between steps).
    Motion,
}

/// One quantity's measure at every step, per branch and case.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantityProfile {
    pub name: String,
    pub group: QuantityGroup,
    /// The policies that look at it.
    pub policies: Vec<String>,
    /// Where it is in the graph.
    pub what: String,
    pub measure: Measure,
    /// `values[branch][case][step]`.
    pub values: BTreeMap<Branch, Vec<Vec<Option<f64>>>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeftOut {
    pub name: String,
    pub reason: String,
}

impl Profile {
    pub fn read(path: &Path) -> Result<Profile> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read profile '{}'", path.display()))?;
        let p: Profile = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "'{}' is not a drift profile (see the README for the format)",
                path.display()
            )
        })?;
        if p.format != PROFILE_FORMAT || p.version != 1 {
            bail!(
                "'{}': format '{}' version {} (expected '{PROFILE_FORMAT}' version 1)",
                path.display(),
                p.format,
                p.version
            );
        }
        Ok(p)
    }

    pub fn quantity(&self, name: &str) -> Option<&QuantityProfile> {
        self.quantities.iter().find(|q| q.name == name)
    }
}

impl QuantityProfile {
    /// The mean over cases at each step (null where any case has none).
    pub fn mean_over_cases(&self, branch: Branch) -> Vec<Option<f64>> {
        let Some(cases) = self.values.get(&branch) else {
            return Vec::new();
        };
        let steps = cases.first().map_or(0, Vec::len);
        (0..steps)
            .map(|i| {
                let v: Option<Vec<f64>> = cases.iter().map(|c| c[i]).collect();
                v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect()
    }
}

/// How a quantity's tensor is read from one call's outputs.
#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    Value(String),
    /// `minuend − subtrahend`, element by element in f32.
    Difference {
        minuend: String,
        subtrahend: String,
    },
}

impl Probe {
    fn values(&self) -> Vec<&str> {
        match self {
            Probe::Value(v) => vec![v],
            Probe::Difference {
                minuend,
                subtrahend,
            } => vec![minuend, subtrahend],
        }
    }

    fn read(&self, outputs: &[Tensor]) -> Result<Vec<f32>> {
        match self {
            Probe::Value(v) => output_f32(outputs, v),
            Probe::Difference {
                minuend,
                subtrahend,
            } => {
                let (a, b) = (
                    output_f32(outputs, minuend)?,
                    output_f32(outputs, subtrahend)?,
                );
                if a.len() != b.len() {
                    bail!(
                        "'{minuend}' has {} values, '{subtrahend}' {}: their difference is not a residual",
                        a.len(),
                        b.len()
                    );
                }
                Ok(a.iter().zip(&b).map(|(x, y)| x - y).collect())
            }
        }
    }
}

/// A quantity to profile.
#[derive(Clone, Debug)]
pub struct Quantity {
    pub name: String,
    pub group: QuantityGroup,
    pub policies: Vec<String>,
    pub what: String,
    pub measure: Measure,
    pub probe: Probe,
    /// For [`Measure::NormRatio`]: the width of the rows the norms are taken over.
    pub width: usize,
    /// For [`Measure::Motion`]: elements per batch row, and per frame (the shift between frames).
    pub strides: (usize, usize),
}

impl Quantity {
    fn new(
        name: &str,
        group: QuantityGroup,
        policies: &[&str],
        what: String,
        probe: Probe,
    ) -> Self {
        Quantity {
            name: name.to_string(),
            group,
            policies: policies.iter().map(|p| p.to_string()).collect(),
            what,
            measure: Measure::RelL1,
            probe,
            width: 0,
            strides: (0, 0),
        }
    }
}

/// The quantities read from the block stack.
const STACK_QUANTITIES: [&str; 6] = [
    "first_block_residual",
    "mid_block_residual",
    "mid_block_attention_residual",
    "mid_block_motion",
    "stack_residual",
    "mag_ratio",
];

/// Every quantity `model` has (the prediction output named `prediction`), and those it lacks, with why.
pub fn find_quantities(model: &Model, prediction: &str) -> (Vec<Quantity>, Vec<LeftOut>) {
    use QuantityGroup::*;
    let map = analyse(model);
    let types = infer_types(&model.graph, model.default_opset());
    let mut found = vec![Quantity::new(
        "output",
        Output,
        &["tea-cache (fitting target)"],
        format!("the model's prediction '{prediction}'"),
        Probe::Value(prediction.to_string()),
    )];
    let mut left_out = Vec::new();
    let leave = |left_out: &mut Vec<LeftOut>, name: &str, reason: String| {
        left_out.push(LeftOut {
            name: name.to_string(),
            reason,
        })
    };
    match find_stack(&model.graph, &map, &types) {
        Ok(stack) => {
            let block_name = |span: &BlockSpan| map.blocks[span.block].name.clone();
            let residual = |span: &BlockSpan| Probe::Difference {
                minuend: span.output.clone(),
                subtrahend: span.input.clone(),
            };
            let first = &stack.blocks[0];
            found.push(Quantity::new(
                "first_block_residual",
                Policy,
                &["first-block-cache"],
                format!("block 0 ({}): output - input", block_name(first)),
                residual(first),
            ));
            let mid = &stack.blocks[stack.blocks.len() / 2];
            found.push(Quantity::new(
                "mid_block_residual",
                Policy,
                &["ada-cache"],
                format!(
                    "the middle block {} ({}): output - input",
                    mid.block,
                    block_name(mid)
                ),
                residual(mid),
            ));
            match gated_attention_residual(&model.graph, &map, mid) {
                Some(term) => {
                    found.push(Quantity::new(
                        "mid_block_attention_residual",
                        Policy,
                        &["ada-cache"],
                        format!(
                            "the middle block {} ({}): its gated self-attention residual '{term}'",
                            mid.block,
                            block_name(mid)
                        ),
                        Probe::Value(term.clone()),
                    ));
                    match frame_strides(model, &types, &term) {
                        Ok(strides) => {
                            let mut motion = Quantity::new(
                                "mid_block_motion",
                                Policy,
                                &["ada-cache (MoReg)"],
                                format!("MoReg's motion of '{term}': |r[f+1] - r[f]|_1 / (|r[f+1]|_1 + |r[f]|_1) over frames f, stride 1"),
                                Probe::Value(term),
                            );
                            motion.measure = Measure::Motion;
                            motion.strides = strides;
                            found.push(motion);
                        }
                        Err(reason) => leave(&mut left_out, "mid_block_motion", reason),
                    }
                }
                None => {
                    let reason = format!("no residual Add of block {} adds its first attention's output to the stream", mid.block);
                    leave(
                        &mut left_out,
                        "mid_block_attention_residual",
                        reason.clone(),
                    );
                    leave(&mut left_out, "mid_block_motion", reason);
                }
            }
            let whole = Probe::Difference {
                minuend: stack.output().to_string(),
                subtrahend: stack.input().to_string(),
            };
            found.push(Quantity::new(
                "stack_residual",
                Policy,
                &["mag-cache", "tea-cache"],
                format!(
                    "the {} blocks: last output - first input",
                    stack.blocks.len()
                ),
                whole.clone(),
            ));
            let mut ratio = Quantity::new(
                "mag_ratio",
                Policy,
                &["mag-cache"],
                "mean(|r_t|_2 / (|r_t-1|_2 + 1e-8)) of the stack residual r, norms over the last axis"
                    .into(),
                whole,
            );
            ratio.measure = Measure::NormRatio;
            ratio.width = stack.shape.last().copied().unwrap_or(0).max(0) as usize;
            found.push(ratio);
        }
        Err(e) => {
            for name in STACK_QUANTITIES {
                leave(&mut left_out, name, format!("no block stack: {e:#}"));
            }
        }
    }
    for (name, node, what) in [
        (
            "timestep_embedding",
            "condition_embedder.time_embedder.linear_2",
            "Wan's timestep embedding e",
        ),
        (
            "timestep_modulation",
            "condition_embedder.time_proj",
            "Wan's timestep modulation e0 (use_ret_steps)",
        ),
    ] {
        match model.graph.nodes.iter().find(|n| n.name == node) {
            Some(n) => found.push(Quantity::new(
                name,
                Policy,
                &["tea-cache"],
                format!("{what}: output of '{node}'"),
                Probe::Value(n.outputs[0].clone()),
            )),
            None => leave(
                &mut left_out,
                name,
                format!("no node '{node}' (not a Wan graph built by ditc)"),
            ),
        }
    }
    let first_site = map
        .blocks
        .first()
        .and_then(|b| b.attention.first())
        .map(|&id| &map.attention[id]);
    let modulated = first_site
        .and_then(|s| s.q_proj.as_ref())
        .and_then(|q| model.graph.nodes.iter().find(|n| &n.name == q))
        .and_then(|n| n.inputs.first().cloned());
    match modulated {
        Some(v) => found.push(Quantity::new(
            "modulated_input",
            Policy,
            &["tea-cache (other families)"],
            format!("block 0's first attention input '{v}' (the timestep-modulated input)"),
            Probe::Value(v),
        )),
        None => leave(
            &mut left_out,
            "modulated_input",
            "block 0's first attention site has no query projection".into(),
        ),
    }
    for site in &map.attention {
        let block = map
            .block_of(site.id)
            .map_or(String::new(), |b| b.name.clone());
        let name = format!("attention.{}", site.id);
        match &site.output {
            Some(out) => found.push(Quantity::new(
                &name,
                Attention,
                &["pab", "static-table"],
                format!(
                    "site {} ({}, {block}): '{out}'",
                    site.id,
                    site.kind.as_str()
                ),
                Probe::Value(out.clone()),
            )),
            None => leave(
                &mut left_out,
                &name,
                "the site's output was not found".into(),
            ),
        }
    }
    found.extend(mlp_outputs(model));
    (found, left_out)
}

/// The output of every transformer block's MLP (after its second linear layer and bias), named
/// `mlp.<block index>`: what `broadcast-static`'s MLP table reuses.
pub fn mlp_outputs(model: &Model) -> Vec<Quantity> {
    let map = analyse(model);
    map.blocks
        .iter()
        .filter_map(|b| {
            let out = b.ffn_output.as_ref()?;
            Some(Quantity::new(
                &format!("mlp.{}", b.index),
                QuantityGroup::Mlp,
                &["pab (mlp)", "static-table"],
                format!("the MLP of block {} ({}): '{out}'", b.index, b.name),
                Probe::Value(out.clone()),
            ))
        })
        .collect()
}

/// The term the first residual `Add` of block `span` adds to the stream (`gate_msa * attn` on Wan):
/// the other operand of an `Add` reading the block's input, computed from its first attention site.
fn gated_attention_residual(graph: &Graph, map: &DitMap, span: &BlockSpan) -> Option<String> {
    let site = &map.attention[*map.blocks[span.block].attention.first()?];
    let anchor = graph.nodes.iter().find(|n| n.name == site.anchor)?;
    let downstream = descendants(graph, &anchor.outputs[0]);
    graph.nodes.iter().find_map(|n| {
        let operands: Vec<&str> = n.present_inputs().collect();
        match (n.op_type.as_str(), &operands[..]) {
            ("Add", &[a, b]) if a == span.input && downstream.contains(b) => Some(b.to_string()),
            ("Add", &[a, b]) if b == span.input && downstream.contains(a) => Some(a.to_string()),
            _ => None,
        }
    })
}

/// For `value` `[batch, tokens, ...]` whose token axis is frames outermost (frame, then the positions
/// of a frame, as Wan's patch sequence is): elements per batch row and per frame.
fn frame_strides(
    model: &Model,
    types: &TypeMap,
    value: &str,
) -> std::result::Result<(usize, usize), String> {
    let axes = crate::analysis::axes::propagate(&model.graph, types);
    let dims = axes
        .get(value)
        .ok_or(format!("no axis information for '{value}'"))?;
    let shape = types
        .get(value)
        .and_then(|t| t.shape.clone())
        .ok_or(format!("the shape of '{value}' is unknown"))?;
    let token = dims
        .iter()
        .position(|d| d.iter().any(|a| a.tags & FRAME != 0))
        .ok_or(format!("'{value}' has no frame axis"))?;
    let frames = match dims[token].first() {
        Some(a) if a.tags == FRAME => a.size,
        _ => {
            return Err(format!(
                "the token axis of '{value}' does not have frames outermost"
            ))
        }
    };
    if frames < 2 {
        return Err(format!(
            "'{value}' spans {frames} frame(s): no motion between frames"
        ));
    }
    if token == 0 || shape.len() != dims.len() || shape.iter().any(|&d| d <= 0) {
        return Err(format!("'{value}' {shape:?} is not [batch, tokens, ...]"));
    }
    let per_batch: i64 = shape[1..].iter().product();
    let per_token: i64 = shape[token + 1..].iter().product();
    let per_frame = shape[token] / frames * per_token;
    Ok((per_batch as usize, per_frame as usize))
}

/// AdaCache's MoReg motion (research spec §5, stride 1): `‖r[f+1] − r[f]‖₁ / (‖r[f+1]‖₁ + ‖r[f]‖₁)`
/// with `r[f+1]` the tokens of frames 1.. and `r[f]` those of frames ..−1, summed over the batch.
pub fn moreg_motion(r: &[f32], per_batch: usize, per_frame: usize) -> f64 {
    let (mut diff, mut later, mut earlier) = (0f64, 0f64, 0f64);
    for row in r.chunks(per_batch) {
        let (head, tail) = (&row[..row.len() - per_frame], &row[per_frame..]);
        for (a, b) in tail.iter().zip(head) {
            diff += (*a as f64 - *b as f64).abs();
            later += (*a as f64).abs();
            earlier += (*b as f64).abs();
        }
    }
    diff / (later + earlier)
}

/// Every value computed from `value` (itself included) in the top-level graph.
fn descendants(graph: &Graph, value: &str) -> HashSet<String> {
    let mut seen: HashSet<String> = HashSet::from([value.to_string()]);
    let mut changed = true;
    // Nodes are in topological order after building; loop until stable for graphs that are not.
    while changed {
        changed = false;
        for n in &graph.nodes {
            if n.present_inputs().any(|i| seen.contains(i)) {
                for o in &n.outputs {
                    changed |= seen.insert(o.clone());
                }
            }
        }
    }
    seen
}

/// Profile `quantities` along a full run of every case (named `case_names`).
pub fn profile(
    c: &Calibration,
    quantities: &[Quantity],
    left_out: Vec<LeftOut>,
    cases: &[Vec<Tensor>],
    case_names: &[String],
    progress: bool,
) -> Result<Profile> {
    let mut probed = c.model.clone();
    let mut exposed: HashSet<String> = probed
        .graph
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .collect();
    for q in quantities {
        for v in q.probe.values() {
            if exposed.insert(v.to_string()) {
                probed.graph.outputs.push(ValueInfo {
                    name: v.to_string(),
                    ty: ValueType::Tensor {
                        dtype: None,
                        shape: None,
                    },
                    doc_string: String::new(),
                });
            }
        }
    }
    let steps = c.sampler.steps();
    let branches = branches(c.guidance);
    let mut values: Vec<BTreeMap<Branch, Vec<Vec<Option<f64>>>>> = quantities
        .iter()
        .map(|_| {
            branches
                .iter()
                .map(|&b| (b, vec![vec![None; steps]; cases.len()]))
                .collect()
        })
        .collect();
    // Per quantity and branch: the previous step's tensor of the current case.
    let mut previous: BTreeMap<(usize, Branch), Vec<f32>> = BTreeMap::new();
    run_full(c, &probed, cases, progress, |call| {
        if call.step == 0 {
            previous.retain(|(_, b), _| *b != call.branch);
        }
        for (k, q) in quantities.iter().enumerate() {
            let now = q.probe.read(call.outputs).with_context(|| {
                format!(
                    "quantity '{}' at step {} ({} call)",
                    q.name, call.step, call.branch
                )
            })?;
            let before = previous.get(&(k, call.branch));
            let v = match (q.measure, before) {
                (Measure::RelL1, None) => None,
                (Measure::RelL1, Some(prev)) => Some(relative_l1(&now, prev)),
                (Measure::NormRatio, None) => Some(1.0),
                (Measure::NormRatio, Some(prev)) if q.width > 0 => {
                    Some(mean_norm_ratio(&now, prev, q.width))
                }
                (Measure::NormRatio, Some(_)) => None,
                (Measure::Motion, _) => Some(moreg_motion(&now, q.strides.0, q.strides.1)),
            };
            values[k].get_mut(&call.branch).expect("every branch")[call.case][call.step] =
                v.filter(|v| v.is_finite());
            previous.insert((k, call.branch), now);
        }
        Ok(())
    })?;
    Ok(Profile {
        format: PROFILE_FORMAT.into(),
        version: 1,
        source: c.source.clone(),
        steps,
        timesteps: c.sampler.timesteps.clone(),
        cases: case_names.to_vec(),
        branches: branches.to_vec(),
        quantities: quantities
            .iter()
            .zip(values)
            .map(|(q, values)| QuantityProfile {
                name: q.name.clone(),
                group: q.group,
                policies: q.policies.clone(),
                what: q.what.clone(),
                measure: q.measure,
                values,
            })
            .collect(),
        left_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn motion_is_moreg_between_consecutive_frames() {
        // One batch row of 3 frames of 2 values: frames [1, 1], [3, 3], [3, -1].
        // Later frames minus earlier: |3-1| * 2 + |3-3| + |-1-3| = 8; |later| = 3+3+3+1 = 10,
        // |earlier| = 1+1+3+3 = 8: motion 8 / 18.
        let r = [1.0, 1.0, 3.0, 3.0, 3.0, -1.0];
        assert!((moreg_motion(&r, 6, 2) - 8.0 / 18.0).abs() < 1e-12);
        // Two batch rows are summed, never mixed: the second row (static) adds only to the norms.
        let r2 = [1.0, 1.0, 3.0, 3.0, 3.0, -1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0];
        assert!((moreg_motion(&r2, 6, 2) - 8.0 / 34.0).abs() < 1e-12);
    }

    #[test]
    fn mean_over_cases_is_null_where_a_case_has_none() {
        let q = QuantityProfile {
            name: "q".into(),
            group: QuantityGroup::Policy,
            policies: vec![],
            what: String::new(),
            measure: Measure::RelL1,
            values: BTreeMap::from([(
                Branch::Cond,
                vec![
                    vec![None, Some(0.5), Some(1.0)],
                    vec![None, Some(0.25), None],
                ],
            )]),
        };
        assert_eq!(q.mean_over_cases(Branch::Cond), [None, Some(0.375), None]);
        assert!(q.mean_over_cases(Branch::Uncond).is_empty());
    }
}
