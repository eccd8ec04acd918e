//! Pass `quantize-w8a8`: explicit INT8 quantization that TensorRT accepts (reference.md §4).
//!
//! Rewrites every selected layer (MatMul with a constant 2-D weight, Gemm, or Conv when included):
//! - the weight becomes an INT8 initializer, symmetric per output channel (scale = absmax/127, zero
//!   point 0), followed by `DequantizeLinear` with the output-channel `axis`;
//! - its activation input goes through `QuantizeLinear -> DequantizeLinear` with one static per-tensor
//!   scale (amax/127 from calibration, zero point int8 0), shared by every layer reading that value.
//!
//! Selection is structural: the Q/K/V/output projections of every attention site and both linear layers
//! of every block's FFN (the DiT map). Patch embedding, timestep and caption embedders, adaLN/modulation
//! projections and the final projection are not among them. Options:
//! - `calibration_stats` (required): a stats file from `ditc calibrate` or written elsewhere;
//! - `exclude`: node-name substrings to keep in high precision; `skip_blocks`: DiT-map block indices;
//!   `include`: node-name substrings of further MatMul/Gemm layers to quantize;
//! - `format`: `"int8"`, or `"fp8"`: FLOAT8 E4M3FN per tensor (scale amax/448) with opset-19 Q/DQ (the
//!   model's opset is raised to 19); tract verifies it through an exact emulation ([`crate::fp8`]);
//! - `smooth_quant = true` (alpha 0.8) or `smooth_quant_alpha = A`: SmoothQuant with an inserted `Mul` on each activation (needs
//!   per-channel ranges from `ditc calibrate`);
//! - `budget_psnr`, `budget_cosine`: keep the fewest most-sensitive layers in high precision that meet the
//!   budget, from the table `ditc calibrate --sensitivity` measured.
//!
//! Invariants: the MatMul/Gemm nodes keep their names and outputs; only their inputs change.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Pass, PassContext};
use crate::analysis::DitMap;
use crate::calibration::CalibrationStats;
use crate::ir::{remove_unused_initializers, AttrValue, DataType, Graph, Model, Node, Tensor};
use crate::manifest::{Precision, QuantizedLayer};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeOptions {
    pub calibration_stats: Option<PathBuf>,
    /// Node-name substrings of further MatMul/Gemm layers to quantize (beyond the structural choice).
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub skip_blocks: Vec<usize>,
    pub format: Option<String>,
    pub smooth_quant_alpha: Option<f64>,
    /// SmoothQuant with the default alpha 0.8 (`smooth_quant_alpha` chooses another).
    #[serde(default)]
    pub smooth_quant: bool,
    /// Keep the fewest most-sensitive layers in high precision that meet this PSNR (dB), as measured
    /// by `ditc calibrate --sensitivity` (its budget table is in the stats file).
    pub budget_psnr: Option<f64>,
    /// Same, for the cosine similarity of the final latent.
    pub budget_cosine: Option<f64>,
}

impl QuantizeOptions {
    /// The SmoothQuant alpha in effect, if SmoothQuant is on.
    pub fn alpha(&self) -> Option<f64> {
        self.smooth_quant_alpha.or(self.smooth_quant.then_some(0.8))
    }

    pub fn validate(&self) -> Result<()> {
        match self.format.as_deref() {
            None | Some("int8") => {}
            Some("fp8") if self.alpha().is_some() => {
                bail!("quantize-w8a8: SmoothQuant is only offered with format = \"int8\"")
            }
            Some("fp8") => {}
            Some(other) => {
                bail!("quantize-w8a8.format = \"{other}\": expected \"int8\" or \"fp8\"")
            }
        }
        if let Some(a) = self.smooth_quant_alpha {
            if !(0.0..=1.0).contains(&a) {
                bail!("quantize-w8a8.smooth_quant_alpha = {a}: must be in [0, 1] (0.8 is the usual choice)");
            }
        }
        Ok(())
    }
}

/// Give a `quantize-w8a8` options table the target GPU's format when it names none: INT8 when it asks
/// for SmoothQuant (offered for INT8 only), else the GPU's default (INT8 on Ampere, FP8 from Ada on).
/// FP8 on a GPU without FP8 tensor cores is refused.
pub fn set_format_for_gpu(options: &mut toml::Table, gpu: crate::target::Gpu) -> Result<()> {
    let smooth = options.contains_key("smooth_quant_alpha")
        || options.get("smooth_quant").and_then(|v| v.as_bool()) == Some(true);
    let default = if smooth {
        "int8"
    } else {
        gpu.default_w8a8_format()
    };
    let format = options.entry("format").or_insert_with(|| default.into());
    if format.as_str() == Some("fp8") && !gpu.has_fp8() {
        bail!(
            "quantize-w8a8.format = \"fp8\" but --target {} has no FP8 tensor cores (FP8 needs Ada, Hopper or Blackwell): use format = \"int8\" or another --target",
            gpu.name()
        );
    }
    Ok(())
}

/// The quantized number format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// INT8: weights per output channel, scale amax/127.
    Int8,
    /// FLOAT8 E4M3FN: weights and activations per tensor, scale amax/448 (opset 19 Q/DQ).
    Fp8,
}

impl Format {
    fn max(self) -> f32 {
        match self {
            Format::Int8 => 127.0,
            Format::Fp8 => crate::fp8::E4M3_MAX,
        }
    }

    /// A scalar zero point of the format's type.
    fn zero(self, name: &str) -> Tensor {
        let dtype = match self {
            Format::Int8 => DataType::I8,
            Format::Fp8 => DataType::F8E4M3FN,
        };
        Tensor::from_raw(name, dtype, vec![], Bytes::from(vec![0u8])).expect("one byte")
    }
}

/// A linear layer chosen for quantization.
#[derive(Clone, Debug)]
pub struct Target {
    pub node: String,
    pub activation: String,
    pub weight: String,
    /// Axis of the weight's output channels (1 for MatMul `x @ W[K, N]`, 0 for Gemm with transB).
    pub axis: usize,
    pub block: Option<usize>,
}

/// The layers the pass would quantize, and those it leaves in high precision with the reason.
pub fn select_targets(
    model: &Model,
    map: &DitMap,
    options: &QuantizeOptions,
) -> (Vec<Target>, Vec<(String, String)>) {
    let graph = &model.graph;
    let mut wanted: BTreeMap<String, Option<usize>> = BTreeMap::new();
    for block in &map.blocks {
        let sites = block.attention.iter().filter_map(|&i| map.attention.get(i));
        for s in sites {
            for p in [&s.q_proj, &s.k_proj, &s.v_proj, &s.out_proj]
                .into_iter()
                .flatten()
            {
                wanted.insert(p.clone(), Some(block.index));
            }
        }
        for f in block.ffn.iter().flatten() {
            wanted.insert(f.clone(), Some(block.index));
        }
    }
    for node in &graph.nodes {
        let matches = options
            .include
            .iter()
            .any(|p| node.name.contains(p.as_str()));
        if matches && matches!(node.op_type.as_str(), "MatMul" | "Gemm" | "Conv") {
            wanted.entry(node.name.clone()).or_insert(None);
        }
    }
    let (mut targets, mut excluded) = (Vec::new(), Vec::new());
    for (name, block) in wanted {
        let Some(node) = graph.nodes.iter().find(|n| n.name == name) else {
            continue;
        };
        if let Some(p) = options.exclude.iter().find(|p| name.contains(p.as_str())) {
            excluded.push((name, format!("matches exclude pattern '{p}'")));
            continue;
        }
        if block.is_some_and(|b| options.skip_blocks.contains(&b)) {
            excluded.push((name, format!("in skipped block {}", block.unwrap_or(0))));
            continue;
        }
        match linear_weight(graph, node) {
            Some((weight, axis)) => targets.push(Target {
                node: name,
                activation: node.inputs[0].clone(),
                weight,
                axis,
                block,
            }),
            None => excluded.push((
                name,
                "weight is not a constant f32 initializer (or BF16/F16 cast to f32) of a supported layout".into(),
            )),
        }
    }
    (targets, excluded)
}

/// The constant weight of a linear layer and its output-channel axis: an f32 initializer, or a
/// BF16/F16 (or f32) initializer behind a Cast to f32 (graphs built from checkpoints keep the stored
/// dtype).
fn linear_weight(graph: &Graph, node: &Node) -> Option<(String, usize)> {
    let input = node.inputs.get(1)?;
    let w = match graph.initializer(input) {
        Some(w) => w,
        None => {
            let cast = graph
                .nodes
                .iter()
                .find(|n| n.outputs.first() == Some(input))?;
            let to_f32 = cast.attr_int("to") == Some(DataType::F32.onnx_code() as i64);
            let w = graph.initializer(cast.inputs.first()?)?;
            if cast.op_type != "Cast"
                || !to_f32
                || !matches!(w.dtype, DataType::BF16 | DataType::F16 | DataType::F32)
            {
                return None;
            }
            w
        }
    };
    if w.dtype != DataType::F32 && graph.initializer(input).is_some() {
        return None;
    }
    if node.op_type == "Conv" {
        return (w.dims.len() >= 3).then(|| (w.name.clone(), 0));
    }
    if w.dims.len() != 2 {
        return None;
    }
    let axis = match node.op_type.as_str() {
        "MatMul" => 1,
        "Gemm" if node.attr_int("transA").unwrap_or(0) != 0 => return None,
        "Gemm" if node.attr_int("transB").unwrap_or(0) != 0 => 0,
        "Gemm" => 1,
        _ => return None,
    };
    Some((w.name.clone(), axis))
}

pub struct QuantizeW8A8 {
    options: QuantizeOptions,
}

impl QuantizeW8A8 {
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let options: QuantizeOptions = options.clone().try_into().context(
            "invalid quantize-w8a8 options (valid keys: calibration_stats, include, exclude, skip_blocks, format, smooth_quant, smooth_quant_alpha, budget_psnr, budget_cosine)",
        )?;
        options.validate()?;
        if options.calibration_stats.is_none() {
            bail!("quantize-w8a8 needs calibration_stats: run `ditc calibrate` and pass --calibration-stats FILE");
        }
        Ok(QuantizeW8A8 { options })
    }
}

impl Pass for QuantizeW8A8 {
    fn name(&self) -> &'static str {
        "quantize-w8a8"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        let path = self
            .options
            .calibration_stats
            .as_ref()
            .expect("checked at construction");
        let stats = CalibrationStats::read(path)?;
        let (mut targets, mut excluded) = select_targets(model, &cx.dit_map, &self.options);
        if self.options.budget_psnr.is_some() || self.options.budget_cosine.is_some() {
            let keep =
                stats.layers_to_keep(self.options.budget_psnr, self.options.budget_cosine)?;
            targets.retain(|t| {
                let kept = keep.contains(&t.node);
                if kept {
                    excluded.push((
                        t.node.clone(),
                        "kept in high precision for the fidelity budget (most sensitive layers)"
                            .into(),
                    ));
                }
                !kept
            });
        }
        let format = if self.options.format.as_deref() == Some("fp8") {
            Format::Fp8
        } else {
            Format::Int8
        };
        let layers = quantize_layers_with(model, &targets, &stats, self.options.alpha(), format)
            .with_context(|| format!("with calibration stats '{}'", path.display()))?;
        if !model
            .opsets
            .iter()
            .any(|(d, v)| (d.is_empty() || d == "ai.onnx") && *v >= 13)
        {
            bail!("per-channel DequantizeLinear needs opset 13 or later");
        }
        cx.precision = Some(Precision {
            format: match format {
                Format::Int8 => "w8a8-int8".into(),
                Format::Fp8 => "w8a8-fp8-e4m3".into(),
            },
            weights: match format {
                Format::Int8 => "int8, symmetric, per output channel, scale = absmax/127".into(),
                Format::Fp8 => {
                    "float8 e4m3fn, per tensor, scale = absmax/448 (tract verifies it by emulation)"
                        .into()
                }
            },
            activations: match format {
                Format::Int8 => "int8, symmetric, per tensor, static scale = amax/127".into(),
                Format::Fp8 => "float8 e4m3fn, per tensor, static scale = amax/448".into(),
            },
            quantized: layers,
            excluded: excluded
                .into_iter()
                .map(|(node, reason)| crate::manifest::Excluded { node, reason })
                .collect(),
            calibration: Some(stats.describe(path)?),
        });
        Ok(())
    }
}

/// Quantize `targets` in place (weights per channel, activations per tensor with `stats`' ranges).
pub fn quantize_layers(
    model: &mut Model,
    targets: &[Target],
    stats: &CalibrationStats,
) -> Result<Vec<QuantizedLayer>> {
    quantize_layers_with(model, targets, stats, None, Format::Int8)
}

/// As [`quantize_layers`], first applying SmoothQuant with `alpha` when given, in `format` (FP8 raises
/// the model's opset to 19 first).
pub fn quantize_layers_with(
    model: &mut Model,
    targets: &[Target],
    stats: &CalibrationStats,
    alpha: Option<f64>,
    format: Format,
) -> Result<Vec<QuantizedLayer>> {
    if format == Format::Fp8 {
        raise_opset_to_19(model)?;
    }
    let (targets, stats) = match alpha {
        Some(a) => super::smooth_quant::apply(model, targets, stats, a)?,
        None => (targets.to_vec(), stats.clone()),
    };
    let (targets, stats) = (&targets[..], &stats);
    let mut dq_of_activation: HashMap<String, String> = HashMap::new();
    let mut dq_of_weight: HashMap<String, (String, usize)> = HashMap::new();
    let mut layers = Vec::new();
    for t in targets {
        let Some(amax) = stats.amax(&t.activation) else {
            bail!(
                "no amax for '{}' (input of {}): calibrate with the same model",
                t.activation,
                t.node
            );
        };
        if amax < crate::calibration::AMAX_FLOOR {
            eprintln!(
                "warning: activation '{}' (input of {}) has calibrated range {amax:e}; using the floor {:e}",
                t.activation,
                t.node,
                crate::calibration::AMAX_FLOOR
            );
        }
        let act_scale = scale_for(amax, format);
        let dq = match dq_of_activation.get(&t.activation) {
            Some(dq) => dq.clone(),
            None => {
                let dq = quantize_activation(&mut model.graph, &t.activation, act_scale, format);
                dq_of_activation.insert(t.activation.clone(), dq.clone());
                dq
            }
        };
        let (w_dq, channels) = match dq_of_weight.get(&t.weight) {
            Some(done) => done.clone(),
            None => {
                let done = match format {
                    Format::Int8 => quantize_weight(&mut model.graph, &t.weight, t.axis)?,
                    Format::Fp8 => quantize_weight_fp8(&mut model.graph, &t.weight)?,
                };
                dq_of_weight.insert(t.weight.clone(), done.clone());
                done
            }
        };
        let node = model
            .graph
            .nodes
            .iter_mut()
            .find(|n| n.name == t.node)
            .expect("selected from the graph");
        node.inputs[0] = dq;
        node.inputs[1] = w_dq;
        layers.push(QuantizedLayer {
            node: t.node.clone(),
            block: t.block,
            activation: t.activation.clone(),
            activation_amax: amax,
            activation_scale: act_scale,
            weight: t.weight.clone(),
            weight_axis: t.axis,
            weight_channels: channels,
        });
    }
    // Casts of weights now read through Q/DQ are dead; their BF16/F16 sources go with them.
    crate::ir::remove_dead_nodes(&mut model.graph);
    remove_unused_initializers(&mut model.graph);
    Ok(layers)
}

/// Symmetric scale for a range: amax/127 (INT8) or amax/448 (FP8). A range below the calibration floor
/// (an activation that was exactly 0, or a hand-written 0) is raised to it, so no scale is ever 0.
pub fn scale_for(amax: f32, format: Format) -> f32 {
    amax.max(crate::calibration::AMAX_FLOOR) / format.max()
}

/// FP8 weight: one scale (absmax/448) for the tensor, values rounded to E4M3FN.
fn quantize_weight_fp8(graph: &mut Graph, name: &str) -> Result<(String, usize)> {
    let w = graph
        .initializer(name)
        .context("weight initializer")?
        .clone();
    let values = w.to_f32_vec().context("f32 weight")?;
    let s = scale_for(values.iter().fold(0f32, |m, x| m.max(x.abs())), Format::Fp8);
    let scaled: Vec<f32> = values.iter().map(|v| v / s).collect();
    let quantized = crate::fp8::encode_tensor(&format!("{name}.fp8"), w.dims.clone(), &scaled)?;
    let scale = Tensor::from_f32(&format!("{name}.scale"), vec![], &[s]);
    let dq = insert_weight_dequantize(
        graph,
        name,
        quantized,
        scale,
        Format::Fp8.zero(&format!("{name}.zero")),
        None,
    );
    Ok((dq, 1))
}

/// Add the quantized weight, its scale and zero point, and the `DequantizeLinear` that restores
/// weight `name` (with `axis` for per-channel scales); returns the dequantized value's name.
fn insert_weight_dequantize(
    graph: &mut Graph,
    name: &str,
    quantized: Tensor,
    scale: Tensor,
    zero: Tensor,
    axis: Option<usize>,
) -> String {
    let dq = format!("{name}.dq");
    let mut node = Node::new(
        &format!("{name}.dequantize"),
        "DequantizeLinear",
        &[&quantized.name, &scale.name, &zero.name],
        &[&dq],
    );
    if let Some(axis) = axis {
        node = node.with_attr("axis", AttrValue::Int(axis as i64));
    }
    graph.initializers.extend([quantized, scale, zero]);
    graph.nodes.insert(0, node);
    dq
}

/// FP8 Q/DQ needs opset 19. Raise an older model's opset, moving `axes` of Reduce ops (attributes
/// before opset 18) to inputs; refuse ops whose meaning changed otherwise.
pub(crate) fn raise_opset_to_19(model: &mut Model) -> Result<()> {
    let opset = model.default_opset();
    if opset >= 19 {
        return Ok(());
    }
    let changed = ["Resize", "GroupNormalization", "LpPool", "Col2Im"];
    let mut extra = Vec::new();
    for n in &mut model.graph.nodes {
        if n.subgraphs().next().is_some() {
            bail!("raising opset {opset} -> 19 for FP8 is not supported for graphs with subgraphs (node {})", n.label());
        }
        if changed.contains(&n.op_type.as_str()) && n.is_onnx() {
            bail!("raising opset {opset} -> 19 for FP8: node {} changed meaning; export the model at opset 19", n.label());
        }
        // Split: sizes are an input from opset 13; from 18 a split into equal parts must say how
        // many (`num_outputs`).
        if n.op_type == "Split" && n.is_onnx() {
            if let Some(sizes) = n.attr_ints("split").map(|a| a.to_vec()) {
                let name = format!("{}.split", n.name);
                extra.push(Tensor::from_i64(&name, vec![sizes.len() as i64], &sizes));
                n.attributes.retain(|a| a.name != "split");
                n.inputs.truncate(1);
                n.inputs.push(name);
            }
            let sizes_given = n.inputs.get(1).is_some_and(|s| !s.is_empty());
            if !sizes_given && n.attr("num_outputs").is_none() {
                n.attributes.push(crate::ir::Attribute {
                    name: "num_outputs".into(),
                    value: AttrValue::Int(n.outputs.len() as i64),
                });
            }
        }
        if n.op_type.starts_with("Reduce") && n.op_type != "ReduceSum" {
            if let Some(axes) = n.attr_ints("axes").map(|a| a.to_vec()) {
                let name = format!("{}.axes", n.name);
                extra.push(Tensor::from_i64(&name, vec![axes.len() as i64], &axes));
                n.attributes.retain(|a| a.name != "axes");
                n.inputs.truncate(1);
                n.inputs.push(name);
            }
        }
    }
    model.graph.initializers.extend(extra);
    for (d, v) in &mut model.opsets {
        if d.is_empty() || d == "ai.onnx" {
            *v = 19;
        }
    }
    Ok(())
}

fn scalar_f32(graph: &mut Graph, name: &str, v: f32) {
    graph
        .initializers
        .push(Tensor::from_f32(name, vec![], &[v]));
}

pub(crate) fn quantize_activation(
    graph: &mut Graph,
    value: &str,
    scale: f32,
    format: Format,
) -> String {
    let (s, z) = (format!("{value}.act_scale"), format!("{value}.act_zero"));
    scalar_f32(graph, &s, scale);
    graph.initializers.push(format.zero(&z));
    let (q, dq) = (format!("{value}.q"), format!("{value}.dq"));
    let at = graph
        .nodes
        .iter()
        .position(|n| n.outputs.iter().any(|o| o == value))
        .map(|i| i + 1)
        .unwrap_or(0);
    graph.nodes.insert(
        at,
        Node::new(
            &format!("{value}.dequantize"),
            "DequantizeLinear",
            &[&q, &s, &z],
            &[&dq],
        ),
    );
    graph.nodes.insert(
        at,
        Node::new(
            &format!("{value}.quantize"),
            "QuantizeLinear",
            &[value, &s, &z],
            &[&q],
        ),
    );
    dq
}

/// Replace weight `name` by INT8 values + per-channel scales; returns the dequantized value's name.
fn quantize_weight(graph: &mut Graph, name: &str, axis: usize) -> Result<(String, usize)> {
    let w = graph
        .initializer(name)
        .context("weight initializer")?
        .clone();
    let values = w.to_f32_vec().context("f32 weight")?;
    // Axis 0: output channels are the outer dimension (Gemm with transB, Conv [M, C/g, k...]);
    // axis 1: the columns of a 2-D MatMul weight [K, N].
    let channels = w.dims[axis] as usize;
    let inner = values.len() / (w.dims[0] as usize).max(1);
    let channel_of = |i: usize| {
        if axis == 0 {
            i / inner.max(1)
        } else {
            i % channels
        }
    };
    let mut scales = vec![0f32; channels];
    for (i, v) in values.iter().enumerate() {
        let ch = channel_of(i);
        scales[ch] = scales[ch].max(v.abs());
    }
    for s in &mut scales {
        *s = scale_for(*s, Format::Int8);
    }
    let q: Vec<u8> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (v / scales[channel_of(i)])
                .round_ties_even()
                .clamp(-127.0, 127.0) as i8 as u8
        })
        .collect();
    let quantized = Tensor::from_raw(
        &format!("{name}.int8"),
        DataType::I8,
        w.dims.clone(),
        Bytes::from(q),
    )?;
    let scale = Tensor::from_f32(&format!("{name}.scale"), vec![channels as i64], &scales);
    let zero = Tensor::from_raw(
        &format!("{name}.zero"),
        DataType::I8,
        vec![channels as i64],
        Bytes::from(vec![0u8; channels]),
    )?;
    let dq = insert_weight_dequantize(graph, name, quantized, scale, zero, Some(axis));
    Ok((dq, channels))
}
