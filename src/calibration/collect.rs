//! Measuring activation ranges along real sampling trajectories (what `ditc calibrate` runs).
//!
//! The float graph runs with tract along the recipe's sampler from each case's `noise` and condition
//! inputs; every activation a quantized layer reads is exposed as an extra output, and its largest |x|
//! (per tensor and per channel of the last axis) or a percentile of |x| is recorded over the chosen
//! steps. A NaN or Inf activation stops calibration with the node that produced it and the step: its
//! range would be meaningless and every scale made from it wrong. An activation that stays exactly 0
//! gets the range [`AMAX_FLOOR`] and a warning, so no scale is ever zero.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::{CalibrationStats, TensorStats, AMAX_FLOOR, FORMAT};
use crate::ir::{Model, Tensor, ValueInfo, ValueType};
use crate::manifest::ModelIo;
use crate::runtime::sampling::{prediction_for, timestep_tensor};
use crate::runtime::TractRunner;
use crate::schedule::Sampler;

/// The range statistic recorded per activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RangeMethod {
    /// The largest |x| seen.
    Max,
    /// This percentile of |x| over a histogram of every value seen.
    Percentile(f64),
}

/// Which steps of each trajectory are recorded.
#[derive(Clone, Debug)]
pub struct StepFilter {
    /// Every this-many-th step (1 = all).
    pub every: usize,
    /// Only steps whose timestep lies in `[lo, hi]`.
    pub window: Option<(f64, f64)>,
}

impl StepFilter {
    fn keeps(&self, step: usize, timestep: f64) -> bool {
        step.is_multiple_of(self.every)
            && self
                .window
                .is_none_or(|(lo, hi)| lo <= timestep && timestep <= hi)
    }
}

/// One sampling trajectory: the model's latent/timestep/prediction names, the sampler, one case's inputs.
pub struct Trajectory<'a> {
    pub io: &'a ModelIo,
    pub sampler: &'a Sampler,
    pub inputs: &'a [Tensor],
}

impl Trajectory<'_> {
    /// Sample with `model` from the case's `noise` and return the final latent. `on_step(i, feed,
    /// outputs)` sees every step; `runner` is the plan for `model`, made on first use and reusable.
    pub fn run(
        &self,
        model: &Model,
        runner: &mut Option<TractRunner>,
        mut on_step: impl FnMut(usize, &[Tensor], &[Tensor]) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let noise = self
            .inputs
            .iter()
            .find(|t| t.name == "noise")
            .context("no 'noise' tensor")?;
        let mut x = noise.to_f32_vec().context("noise must be f32")?;
        for i in 0..self.sampler.steps() {
            let mut feed: Vec<Tensor> = self
                .inputs
                .iter()
                .filter(|t| t.name != "noise")
                .cloned()
                .collect();
            feed.push(Tensor::from_f32(&self.io.latent, noise.dims.clone(), &x));
            feed.push(timestep_tensor(
                model,
                &self.io.timestep,
                self.sampler.timesteps[i],
            )?);
            if runner.is_none() {
                *runner = Some(TractRunner::new(model, &feed)?);
            }
            let out = runner.as_ref().expect("prepared").run(&feed)?;
            on_step(i, &feed, &out)?;
            let pred = out
                .iter()
                .find(|o| o.name == self.io.prediction)
                .context("no prediction")?;
            let pred = prediction_for(pred, noise)?;
            self.sampler.step(i, &mut x, &pred);
        }
        Ok(x)
    }
}

/// One model call kept for replay: its inputs and the float model's prediction.
pub type ReplayPoint = (Vec<Tensor>, Vec<f32>);

/// Running ranges of the probed activations.
pub struct RangeRecorder {
    method: RangeMethod,
    filter: StepFilter,
    amax: BTreeMap<String, f32>,
    channel_amax: BTreeMap<String, Vec<f32>>,
    histograms: BTreeMap<String, Histogram>,
    /// The node producing each activation, for error messages.
    producers: BTreeMap<String, String>,
    /// Model calls recorded.
    pub samples: usize,
}

impl RangeRecorder {
    pub fn new(
        model: &Model,
        activations: &[String],
        method: RangeMethod,
        filter: StepFilter,
    ) -> RangeRecorder {
        let producers = activations
            .iter()
            .map(|a| {
                let node = model
                    .graph
                    .nodes
                    .iter()
                    .find(|n| n.outputs.contains(a))
                    .map_or_else(
                        || format!("graph input '{a}'"),
                        |n| format!("node '{}'", n.name),
                    );
                (a.clone(), node)
            })
            .collect();
        RangeRecorder {
            method,
            filter,
            amax: activations.iter().map(|a| (a.clone(), 0.0)).collect(),
            channel_amax: BTreeMap::new(),
            histograms: activations
                .iter()
                .map(|a| (a.clone(), Histogram::new()))
                .collect(),
            producers,
            samples: 0,
        }
    }

    /// The model with every recorded activation exposed as an extra output.
    pub fn probe(&self, model: &Model) -> Model {
        let mut probe = model.clone();
        for a in self.amax.keys() {
            probe.graph.outputs.push(ValueInfo {
                name: a.clone(),
                ty: ValueType::Tensor {
                    dtype: None,
                    shape: None,
                },
                doc_string: String::new(),
            });
        }
        probe
    }

    /// Record the probed activations among `outputs` of one call at `step` (timestep `timestep`).
    pub fn record(&mut self, outputs: &[Tensor], step: usize, timestep: f64) -> Result<()> {
        self.samples += 1;
        for t in outputs {
            let Some(m) = self.amax.get_mut(&t.name) else {
                continue;
            };
            let v = t.to_f32_vec().context("activations are float")?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!(
                    "activation '{}' (output of {}) is {} at element {i} at sampling step {step} (timestep {timestep}): the float model produces non-finite values, so no range can be calibrated",
                    t.name,
                    self.producers[&t.name],
                    v[i]
                );
            }
            *m = v.iter().fold(*m, |acc, x| acc.max(x.abs()));
            let k = (*t.dims.last().unwrap_or(&1) as usize).max(1);
            let c = self
                .channel_amax
                .entry(t.name.clone())
                .or_insert_with(|| vec![0.0; k]);
            for row in v.chunks_exact(k) {
                for (m, x) in c.iter_mut().zip(row) {
                    *m = m.max(x.abs());
                }
            }
            if matches!(self.method, RangeMethod::Percentile(_)) {
                let h = self
                    .histograms
                    .get_mut(&t.name)
                    .expect("one per activation");
                v.iter().for_each(|x| h.add(x.abs()));
            }
        }
        Ok(())
    }

    /// The statistics file's content. Activations that stayed exactly 0 get [`AMAX_FLOOR`] (with a
    /// warning on stderr naming them).
    pub fn finish(mut self, source: String) -> Result<CalibrationStats> {
        if self.samples == 0 {
            bail!("no step was recorded: --window and --every leave nothing");
        }
        if let RangeMethod::Percentile(p) = self.method {
            for (name, h) in &self.histograms {
                self.amax.insert(name.clone(), h.percentile(p));
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, amax) in self.amax {
            let amax = if amax > 0.0 {
                amax
            } else {
                eprintln!(
                    "warning: activation '{name}' (output of {}) was exactly 0 at every calibrated step; its range is set to the floor {AMAX_FLOOR:e}",
                    self.producers[&name]
                );
                AMAX_FLOOR
            };
            let channel_amax = self.channel_amax.remove(&name);
            tensors.insert(name, TensorStats { amax, channel_amax });
        }
        Ok(CalibrationStats {
            format: FORMAT.into(),
            version: 1,
            method: match self.method {
                RangeMethod::Max => "max".into(),
                RangeMethod::Percentile(p) => format!("percentile {p}"),
            },
            source,
            samples: self.samples,
            tensors,
            sensitivity: Vec::new(),
            budget: Vec::new(),
        })
    }
}

/// Record the ranges of `recorder`'s activations along one trajectory per case; returns each case's
/// final latent and, every `keep_every` steps, the (feed, prediction) points sensitivity replays.
pub fn record_trajectories(
    model: &Model,
    cases: &[Vec<Tensor>],
    io: &ModelIo,
    sampler: &Sampler,
    recorder: &mut RangeRecorder,
    keep_every: Option<usize>,
    progress: bool,
) -> Result<(Vec<Vec<f32>>, Vec<ReplayPoint>)> {
    let probe = recorder.probe(model);
    let bar = crate::progress::steps_bar(
        (cases.len() * sampler.steps()) as u64,
        "calibrating",
        progress,
    );
    let mut runner: Option<TractRunner> = None;
    let mut points = Vec::new();
    let mut finals = Vec::new();
    for inputs in cases {
        let trajectory = Trajectory {
            io,
            sampler,
            inputs,
        };
        let x = trajectory.run(&probe, &mut runner, |i, feed, outputs| {
            let t = sampler.timesteps[i];
            if recorder.filter.keeps(i, t) {
                recorder.record(outputs, i, t)?;
            }
            if keep_every.is_some_and(|k| i % k == 0) {
                let pred = outputs
                    .iter()
                    .find(|t| t.name == io.prediction)
                    .context("no prediction")?;
                points.push((feed.to_vec(), pred.to_f32_vec().context("f32 prediction")?));
            }
            bar.inc(1);
            Ok(())
        })?;
        finals.push(x);
    }
    bar.finish_and_clear();
    Ok((finals, points))
}

/// A histogram of |x| with a fixed number of bins whose width doubles (merging pairs) when a larger
/// value arrives, so it needs no first pass to find the range.
struct Histogram {
    bins: Vec<u64>,
    width: f32,
}

const BINS: usize = 4096;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            bins: vec![0; BINS],
            width: 1e-6,
        }
    }

    fn add(&mut self, x: f32) {
        if !x.is_finite() {
            return;
        }
        while x >= self.width * BINS as f32 {
            for i in 0..BINS / 2 {
                self.bins[i] = self.bins[2 * i] + self.bins[2 * i + 1];
            }
            self.bins[BINS / 2..].iter_mut().for_each(|b| *b = 0);
            self.width *= 2.0;
        }
        self.bins[((x / self.width) as usize).min(BINS - 1)] += 1;
    }

    /// Upper edge of the bin where the cumulative count reaches `p` percent.
    fn percentile(&self, p: f64) -> f32 {
        let total: u64 = self.bins.iter().sum();
        let target = (total as f64 * p / 100.0).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.bins.iter().enumerate() {
            seen += b;
            if seen >= target.max(1) {
                return (i + 1) as f32 * self.width;
            }
        }
        BINS as f32 * self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Dim, Graph, Node};

    #[test]
    fn histogram_percentiles() {
        let mut h = Histogram::new();
        for i in 1..=10_000 {
            h.add(i as f32 / 1000.0); // 0.001 .. 10.0, uniform
        }
        let p50 = h.percentile(50.0);
        assert!((p50 - 5.0).abs() < 0.01, "{p50}");
        let p100 = h.percentile(100.0);
        assert!((p100 - 10.0).abs() < 0.01, "{p100}");
        assert!(h.percentile(99.0) < p100);
    }

    fn one_relu() -> Model {
        let graph = Graph {
            inputs: vec![ValueInfo::tensor("x", DataType::F32, vec![Dim::Value(2)])],
            outputs: vec![ValueInfo::tensor("y", DataType::F32, vec![Dim::Value(2)])],
            nodes: vec![Node::new("blocks.0.act", "Relu", &["x"], &["y"])],
            ..Graph::default()
        };
        Model::new(graph, 17)
    }

    fn all_steps() -> StepFilter {
        StepFilter {
            every: 1,
            window: None,
        }
    }

    #[test]
    fn non_finite_activation_names_node_and_step() {
        let m = one_relu();
        let mut r = RangeRecorder::new(&m, &["y".into()], RangeMethod::Max, all_steps());
        let bad = Tensor::from_f32("y", vec![2], &[1.0, f32::NAN]);
        let e = r.record(&[bad], 7, 412.0).unwrap_err().to_string();
        for want in ["'y'", "node 'blocks.0.act'", "NaN", "element 1", "step 7"] {
            assert!(e.contains(want), "{want} missing from: {e}");
        }
        let inf = Tensor::from_f32("y", vec![2], &[f32::NEG_INFINITY, 0.0]);
        let e = r.record(&[inf], 3, 1.0).unwrap_err().to_string();
        assert!(e.contains("-inf") && e.contains("step 3"), "{e}");
    }

    #[test]
    fn an_all_zero_activation_gets_the_floor_never_zero() {
        let m = one_relu();
        let mut r = RangeRecorder::new(&m, &["y".into()], RangeMethod::Max, all_steps());
        r.record(&[Tensor::from_f32("y", vec![2], &[0.0, -0.0])], 0, 999.0)
            .unwrap();
        let stats = r.finish("test".into()).unwrap();
        assert_eq!(stats.amax("y"), Some(AMAX_FLOOR));
    }
}
