//! Plans for graphs with run-time conditions, and the state a sampling loop carries per branch.
//!
//! A [`Plan`] of a graph without `If` is one tract plan. A graph with an `If` (a condition computed in
//! the graph, as adaptive caches bake) is split at it ([`crate::schedule::split`]): the prefix runs,
//! the 0-D condition is read on the host, and only the plan of the taken outcome runs, as TensorRT
//! does. Each part is planned once, so nothing is re-planned per call (tract would re-plan the taken
//! branch of an `If` on every call). Parts with further `If`s split again.

use anyhow::{bail, Context, Result};

use super::TractRunner;
use crate::ir::{DataType, Model, Tensor};
use crate::manifest::StateBinding;
use crate::schedule::specialize::model_flops;
use crate::schedule::split::{first_if, split_at};

pub enum Plan {
    Plain { runner: TractRunner, flops: u64 },
    Split(Box<SplitPlan>),
}

pub struct SplitPlan {
    prefix: Plan,
    condition: String,
    /// `[else, then]`.
    parts: [Plan; 2],
    outputs: Vec<String>,
}

/// What one call returned and cost.
pub struct Call {
    /// The graph's outputs, in its order.
    pub outputs: Vec<Tensor>,
    /// FLOPs of what ran (prefix and taken parts).
    pub flops: u64,
}

impl Plan {
    /// Plan `model` for inputs shaped like `example` (matched by name). A graph with an `If` is split;
    /// its prefix runs once on `example` to shape the parts' inputs.
    pub fn new(model: &Model, example: &[Tensor]) -> Result<Plan> {
        let Some(index) = first_if(model) else {
            return Ok(Plan::Plain {
                runner: TractRunner::new(model, example)?,
                flops: model_flops(model),
            });
        };
        let split = split_at(model, index)?;
        let prefix = Plan::new(&split.prefix, example).context("the graph before its If")?;
        let handed = prefix.run(example)?.outputs;
        let inputs = [example, &handed].concat();
        let [else_part, then_part] = &split.parts;
        let parts = [
            Plan::new(else_part, &inputs).context("the If's else outcome")?,
            Plan::new(then_part, &inputs).context("the If's then outcome")?,
        ];
        Ok(Plan::Split(Box::new(SplitPlan {
            prefix,
            condition: split.condition,
            parts,
            outputs: split.outputs,
        })))
    }

    pub fn run(&self, inputs: &[Tensor]) -> Result<Call> {
        match self {
            Plan::Plain { runner, flops } => Ok(Call {
                outputs: runner.run(inputs)?,
                flops: *flops,
            }),
            Plan::Split(s) => s.run(inputs),
        }
    }
}

impl SplitPlan {
    fn run(&self, inputs: &[Tensor]) -> Result<Call> {
        let before = self.prefix.run(inputs)?;
        let condition = before
            .outputs
            .iter()
            .chain(inputs)
            .find(|t| t.name == self.condition)
            .with_context(|| format!("no value for the If condition '{}'", self.condition))?;
        let taken = bool_scalar(condition)?;
        let all = [inputs, &before.outputs].concat();
        let after = self.parts[taken as usize].run(&all)?;
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            let t = after
                .outputs
                .iter()
                .chain(&before.outputs)
                .find(|t| &t.name == name)
                .with_context(|| format!("no part of the split graph computed output '{name}'"))?;
            outputs.push(t.clone());
        }
        Ok(Call {
            outputs,
            flops: before.flops + after.flops,
        })
    }
}

/// The value of a one-element bool tensor.
pub fn bool_scalar(t: &Tensor) -> Result<bool> {
    match (t.dtype, t.raw().map(|r| r.as_ref())) {
        (DataType::Bool, Some([b])) => Ok(*b != 0),
        _ => bail!(
            "'{}' must be a one-element bool tensor (got {} {:?})",
            t.name,
            t.dtype,
            t.dims
        ),
    }
}

/// The state tensors of one branch of a sampling loop (one set per classifier-free-guidance branch, so
/// no branch reads another's cache): zeros before the first call, then each call's state outputs.
#[derive(Clone, Debug)]
pub struct StateSet {
    tensors: Vec<Tensor>,
}

impl StateSet {
    /// Zeros for every binding that `model` takes as an input, typed as that input. (The float source
    /// model that `--compare-full` runs for a quantized bundle has none of the bundle's state inputs.)
    pub fn zeros(model: &Model, bindings: &[StateBinding]) -> Result<StateSet> {
        let mut tensors = Vec::with_capacity(bindings.len());
        for b in bindings {
            let Some(input) = model.graph.inputs.iter().find(|i| i.name == b.input) else {
                continue;
            };
            let dtype = input.dtype().unwrap_or(DataType::F32);
            let numel = crate::ir::checked_numel(&b.shape)
                .with_context(|| format!("state '{}': bad shape {:?}", b.input, b.shape))?;
            let bytes = dtype
                .storage_bytes(numel)
                .with_context(|| format!("state '{}': {dtype} has no raw layout", b.input))?;
            tensors.push(Tensor::from_raw(
                &b.input,
                dtype,
                b.shape.clone(),
                vec![0u8; bytes as usize].into(),
            )?);
        }
        Ok(StateSet { tensors })
    }

    /// The state inputs for the next call.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// Take a call's state outputs as the next call's inputs; values a call does not output (a plan
    /// that leaves them unchanged) keep their value.
    pub fn update(&mut self, bindings: &[StateBinding], outputs: &[Tensor]) {
        for b in bindings {
            let Some(out) = outputs.iter().find(|t| t.name == b.output) else {
                continue;
            };
            if let Some(slot) = self.tensors.iter_mut().find(|t| t.name == b.input) {
                *slot = Tensor {
                    name: b.input.clone(),
                    ..out.clone()
                };
            }
        }
    }
}

/// One call of `plan` on the inputs common to every branch plus `state`, whose values it then advances.
pub fn call(
    plan: &Plan,
    common: &[Tensor],
    state: &mut StateSet,
    bindings: &[StateBinding],
) -> Result<Call> {
    let inputs = [common, state.tensors()].concat();
    let call = plan.run(&inputs)?;
    state.update(bindings, &call.outputs);
    Ok(call)
}
