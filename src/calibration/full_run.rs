//! A full sampling run of the float graph along a recipe's sampler and guidance, nothing skipped, with
//! every call's outputs shown to the caller: what MagCache's ratio calibration and the drift profile
//! ([`super::profile`]) measure on.
//!
//! With classifier-free guidance each step makes the conditional call, then the unconditional one, and
//! advances with `u + g * (c - u)`, as the runtime does.

use anyhow::{Context, Result};

use crate::ir::{Model, Tensor};
use crate::manifest::ModelIo;
use crate::runtime::sampling::{branch_inputs, prediction_for, timestep_tensor};
use crate::runtime::TractRunner;
use crate::schedule::guidance::{branches, combine, Branch, Guidance};
use crate::schedule::Sampler;

/// What one full run measures and on what.
pub struct Calibration<'a> {
    pub model: &'a Model,
    pub io: &'a ModelIo,
    pub sampler: &'a Sampler,
    /// With its `input` resolved (see [`Guidance::resolve_input`]).
    pub guidance: Option<&'a Guidance>,
    pub source: String,
}

/// One model call of a full run, as [`run_full`] shows it.
pub struct FullCall<'a> {
    /// Index into the cases given to [`run_full`].
    pub case: usize,
    pub step: usize,
    pub branch: Branch,
    /// Every output of `probed` at this call.
    pub outputs: &'a [Tensor],
}

/// Sample every case (`noise` plus the model's condition inputs and the negative) with `probed` (the
/// calibration's model with extra outputs), calling `on_call` after each model call.
pub fn run_full(
    c: &Calibration,
    probed: &Model,
    cases: &[Vec<Tensor>],
    progress: bool,
    mut on_call: impl FnMut(&FullCall) -> Result<()>,
) -> Result<()> {
    let branches = branches(c.guidance);
    let steps = c.sampler.steps();
    let mut runner: Option<TractRunner> = None;
    let bar = crate::progress::steps_bar((steps * cases.len()) as u64, "calibrating", progress);
    for (case_index, case) in cases.iter().enumerate() {
        let noise = case
            .iter()
            .find(|t| t.name == "noise")
            .context("no 'noise' tensor")?;
        let base: Vec<Tensor> = case.iter().filter(|t| t.name != "noise").cloned().collect();
        let inputs: Vec<Vec<Tensor>> = branches
            .iter()
            .map(|&b| branch_inputs(&base, c.guidance, b, case))
            .collect::<Result<_>>()?;
        let mut x = noise.to_f32_vec().context("noise must be f32")?;
        for step in 0..steps {
            let mut predictions = Vec::new();
            for (&branch, inputs) in branches.iter().zip(&inputs) {
                let mut feed = inputs.clone();
                feed.push(Tensor::from_f32(&c.io.latent, noise.dims.clone(), &x));
                feed.push(timestep_tensor(
                    c.model,
                    &c.io.timestep,
                    c.sampler.timesteps[step],
                )?);
                if runner.is_none() {
                    runner = Some(TractRunner::new(probed, &feed)?);
                }
                let out = runner.as_ref().expect("prepared").run(&feed)?;
                on_call(&FullCall {
                    case: case_index,
                    step,
                    branch,
                    outputs: &out,
                })?;
                let prediction = out
                    .iter()
                    .find(|t| t.name == c.io.prediction)
                    .with_context(|| format!("no output '{}'", c.io.prediction))?;
                predictions.push(prediction_for(prediction, noise)?);
            }
            let velocity = match (c.guidance, predictions.as_slice()) {
                (Some(g), [cond, uncond]) => combine(g.scale, cond, uncond),
                _ => predictions.swap_remove(0),
            };
            c.sampler.step(step, &mut x, &velocity);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The f32 values of the output `name` of one call.
pub fn output_f32(outputs: &[Tensor], name: &str) -> Result<Vec<f32>> {
    outputs
        .iter()
        .find(|t| t.name == name)
        .and_then(Tensor::to_f32_vec)
        .with_context(|| format!("no f32 output '{name}'"))
}
