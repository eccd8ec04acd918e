//! The bundle manifest (`manifest.json`, version 1): everything a runtime needs to drive the graph.
//!
//! It lists the files (with hashes), the graph's inputs and outputs and what each means to a sampling
//! loop (`io`), the sampler and its timesteps, the baked schedule (per-kind decision tables and the sites
//! they drive), the state bindings to feed back each step, the expected cost, and provenance. The JSON
//! Schema is `schemas/manifest.schema.json`, built in: [`read`] checks a manifest against it, and tests
//! validate every emitted manifest with it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::ir::{DataType, Dim, Model, ValueInfo};
use crate::onnx::WrittenFile;
use crate::output::sha256_file;
use crate::schedule::guidance::{Branch, Guidance};
use crate::schedule::SamplerConfig;
use crate::schedule::{Decider, Group};

pub const FORMAT: &str = "ditc-manifest";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub ditc_version: String,
    pub source: Source,
    /// Files of the bundle, relative to the manifest's folder; the first is the graph.
    pub files: Vec<WrittenFile>,
    pub ir_version: i64,
    pub opset: i64,
    pub inputs: Vec<Binding>,
    pub outputs: Vec<Binding>,
    /// What the sampling loop feeds and reads (absent when the inputs could not be identified).
    pub io: Option<ModelIo>,
    pub sampler: Option<SamplerSection>,
    pub schedule: Option<Schedule>,
    /// State to carry from step i's outputs to step i+1's inputs.
    pub state: Vec<StateBinding>,
    pub cost: Cost,
    pub tensorrt: TensorRt,
    pub provenance: Provenance,
    /// What is quantized how, what was excluded and why, and the calibration used (null: float).
    pub precision: Option<Precision>,
    /// The DiT map of the source graph (as `ditc inspect --json` reports it).
    pub dit_map: serde_json::Value,
    /// The attention sites made block-sparse (`sparse-linear-attention`), absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_attention: Option<SparseAttention>,
    /// Cost model (README "Compute accounting and the cost model"): per attention site of the bundle's
    /// graph, the estimated H100 milliseconds per call, dense and with its sparsity and quantized
    /// attention (FP8 / SageAttention factor).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention_cost: Vec<crate::analysis::gpu_cost::SiteCost>,
}

/// What `sparse-linear-attention` did: the op, its options and every site it replaced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SparseAttention {
    /// `SparseLinearAttention` in domain `ai.ditc` (a node per site, plus its local function).
    pub op: String,
    pub domain: String,
    /// The pass options.
    pub options: serde_json::Value,
    pub sites: Vec<SparseSite>,
}

/// One attention site replaced by the sparse op.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SparseSite {
    /// The DiT map's site id, and the node that now computes it.
    pub site: usize,
    pub node: String,
    pub kind: String,
    pub block: Option<usize>,
    pub batch: i64,
    pub heads: i64,
    pub query_len: i64,
    pub key_len: i64,
    pub head_dim: i64,
    pub v_head_dim: i64,
    pub query_blocks: i64,
    pub key_blocks: i64,
    /// Key blocks kept per query block (top-k mode; null in mass mode, where it is value dependent).
    pub keep_blocks: Option<i64>,
    /// Graph output (int64 scalar): the (query, key) scores this call computed.
    pub kept_output: String,
    /// Scores of the dense site per call (batch x heads x queries x keys).
    pub scores_dense: u64,
    /// Score and value product FLOPs of the dense site per call.
    pub flops_dense: u64,
    /// Cost model (README "Cost model"): estimated H100 milliseconds per call, dense and as sparse
    /// (top-k mode at a sparse step; null in mass mode).
    pub h100_ms_dense: f64,
    pub h100_ms_estimated: Option<f64>,
}

/// A TensorRT plugin the graph needs, and the nodes that use it with their attributes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginRequirement {
    pub name: String,
    pub version: String,
    pub namespace: String,
    /// The shared library trtexec loads (`--staticPlugins`).
    pub library: String,
    pub nodes: Vec<PluginNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginNode {
    pub node: String,
    pub attributes: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub path: String,
    /// Files read, with their SHA-256 (for a checkpoint folder: config.json and the shard index).
    pub files: Vec<WrittenFile>,
    /// Safetensors weight files of a checkpoint folder: size and the SHA-256 of their header (hashing
    /// every byte of a 28 GB checkpoint would read it twice); empty for ONNX sources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<WeightFile>,
    /// The shapes a checkpoint folder's graph was built with (absent for ONNX sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<crate::models::BuildOptions>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightFile {
    pub path: String,
    pub bytes: u64,
    pub header_sha256: String,
}

/// A graph input or output: name, dtype and shape (numbers, or names for dynamic axes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Binding {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelIo {
    /// The noisy latent input.
    pub latent: String,
    /// The timestep input (fed the sampler's timestep, in the input's dtype).
    pub timestep: String,
    /// The model's prediction (noise, velocity, ...), the first graph output.
    pub prediction: String,
    /// The step-index input of a baked schedule (int64 scalar), if any.
    pub step: Option<String>,
    /// The branch input (int64 scalar: 0 for the conditional call, 1 for the unconditional one) of a
    /// graph whose decisions differ per guidance branch; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SamplerSection {
    pub config: SamplerConfig,
    /// The timestep fed at each step.
    pub timesteps: Vec<f64>,
    /// Classifier-free guidance: two calls per step (cond, then uncond), each with its own state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<Guidance>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    pub policy: String,
    /// The pass options the tables were made from.
    pub options: serde_json::Value,
    /// Per group: compute (true) or reuse (false) at each step (for every branch, unless
    /// `uncond_tables` gives the unconditional branch its own).
    pub tables: BTreeMap<Group, Vec<bool>>,
    /// The unconditional branch's tables, when they differ from `tables`; the graph then takes
    /// `io.branch` and picks its table by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncond_tables: Option<BTreeMap<Group, Vec<bool>>>,
    /// Per branch, the policy's metric at each step as the decision saw it (null where it computes
    /// none), for policies whose metric is known at conversion (MagCache's accumulated error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<Branch, Vec<Option<f64>>>>,
    /// Per attention kind: the attention site ids the table drives.
    pub sites: BTreeMap<Group, Vec<usize>>,
    /// The blocks (DiT map indices) whose MLP the `mlp` table drives.
    pub blocks: Vec<usize>,
    /// Per group: expected computed calls over the whole run, out of `total`.
    pub calls: BTreeMap<Group, Calls>,
    /// For a policy that decides inside the graph (no tables): where the decisions come out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<InGraphDecisions>,
    /// Per-block tables (`broadcast-static`'s `table.blocks`): each drives one block's values of one
    /// group, for every branch, in place of the group's table (those values are not in `sites` /
    /// `blocks`, which list what the group tables drive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_tables: Vec<BlockTable>,
}

/// One transformer block's table for its values of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockTable {
    /// The DiT map's block index.
    pub block: usize,
    pub group: Group,
    /// Compute (true) or reuse at each step.
    pub table: Vec<bool>,
    /// The attention sites it drives (none for `mlp`: the block's MLP).
    pub sites: Vec<usize>,
}

impl BlockTable {
    pub fn decider(&self) -> Decider {
        Decider::in_block(self.group, self.block)
    }
}

/// A schedule decided by the graph at run time: each call computes its decision from the state, an
/// `If` runs the cached blocks or reuses their residual, and the decision and its metric are outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InGraphDecisions {
    /// Graph output: the call's decision (bool scalar, true = the cached blocks computed).
    pub decision: String,
    /// Graph output: the metric compared with the threshold (f32 scalar).
    pub metric: String,
    /// DiT-map blocks that always run before the decision (they feed the metric).
    pub head_blocks: Vec<usize>,
    /// Blocks that run only when the decision says so.
    pub cached_blocks: Vec<usize>,
    /// Blocks that always run after the cached ones.
    pub tail_blocks: Vec<usize>,
    /// Attention sites inside the cached blocks.
    pub sites: Vec<usize>,
    /// A bool scalar input that the unconditional call must be fed with the conditional call's
    /// `decision` of the same step (its decision follows the conditional one's, as EasyCache's);
    /// the graph then also takes `io.branch`. Ignored on the conditional call. Absent: each call
    /// decides on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<String>,
}

impl Schedule {
    /// The decision tables `branch` runs with.
    pub fn tables_for(&self, branch: Branch) -> &BTreeMap<Group, Vec<bool>> {
        match (&self.uncond_tables, branch) {
            (Some(uncond), Branch::Uncond) => uncond,
            _ => &self.tables,
        }
    }

    /// Every table `branch` runs with, the per-block ones included, by what it decides.
    pub fn deciders_for(&self, branch: Branch) -> BTreeMap<Decider, &Vec<bool>> {
        let groups = self
            .tables_for(branch)
            .iter()
            .map(|(g, t)| ((*g).into(), t));
        let blocks = self.block_tables.iter().map(|b| (b.decider(), &b.table));
        groups.chain(blocks).collect()
    }

    /// The decisions of `branch` at step `i`.
    pub fn pattern_at(&self, branch: Branch, i: usize) -> crate::schedule::specialize::Pattern {
        self.deciders_for(branch)
            .into_iter()
            .map(|(d, t)| (d, t[i]))
            .collect()
    }

    /// What drives attention site `id`: its block's table or its kind's (with the stack's, when the
    /// stack is scheduled); empty when nothing does.
    pub fn site_deciders(&self, id: usize) -> Vec<Decider> {
        let own = self.block_tables.iter().filter(|b| b.sites.contains(&id));
        let group = self.sites.iter().filter(|(_, ids)| ids.contains(&id));
        own.map(BlockTable::decider)
            .chain(group.map(|(g, _)| (*g).into()))
            .collect()
    }

    /// The blocks whose MLP is scheduled, each with what decides it.
    pub fn mlp_deciders(&self) -> Vec<(usize, Decider)> {
        let group = self.blocks.iter().map(|&b| (b, Group::Mlp.into()));
        let own = self
            .block_tables
            .iter()
            .filter(|t| t.group == Group::Mlp)
            .map(|t| (t.block, t.decider()));
        let mut out: Vec<(usize, Decider)> = group.chain(own).collect();
        out.sort();
        out
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Calls {
    pub computed: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateBinding {
    /// The table that decides when this value is computed.
    pub group: Group,
    /// The attention site cached (attention groups).
    pub site: Option<usize>,
    /// The block whose MLP result is cached (`mlp`).
    pub block: Option<usize>,
    /// The block whose own table (`schedule.block_tables`) decides this value instead of the group's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_block: Option<usize>,
    pub input: String,
    pub output: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    /// Value before the first step (never read: step 0 always computes).
    pub initial: String,
}

impl StateBinding {
    /// What decides when this value computes.
    pub fn decider(&self) -> Decider {
        match self.table_block {
            Some(b) => Decider::in_block(self.group, b),
            None => self.group.into(),
        }
    }
}

/// FLOPs over one whole sampling run (all steps), as the schedule plans them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cost {
    pub steps: usize,
    /// Attention sites (score/value products plus their projections), every step computing.
    pub attention_flops_full: u64,
    pub attention_flops_scheduled: u64,
    /// The whole model (MatMul/Gemm/Conv/Einsum FLOPs).
    pub model_flops_full: u64,
    pub model_flops_scheduled: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorRt {
    /// Suggested engine build (static shapes as in `inputs`).
    pub build_command: String,
    /// The GPU generation and TensorRT version the bundle was converted for (`--target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::target::DeployTarget>,
    /// Plugins the engine build needs (their library is named in `build_command`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginRequirement>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    pub recipe: Option<String>,
    /// Passes applied, in order, with their options.
    pub passes: Vec<PassRecord>,
    /// `--set` overrides given on the command line.
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassRecord {
    pub name: String,
    pub options: serde_json::Value,
}

impl Manifest {
    /// Classifier-free guidance, when the bundle samples with it.
    pub fn guidance(&self) -> Option<&Guidance> {
        self.sampler.as_ref()?.guidance.as_ref()
    }
}

pub fn binding(v: &ValueInfo) -> Binding {
    Binding {
        name: v.name.clone(),
        dtype: v
            .dtype()
            .map(|d| d.to_string())
            .unwrap_or_else(|| "unknown".into()),
        shape: v
            .shape()
            .unwrap_or(&[])
            .iter()
            .map(|d| match d {
                Dim::Value(x) => serde_json::json!(x),
                Dim::Param(p) => serde_json::json!(p),
                Dim::Unknown => serde_json::json!("?"),
            })
            .collect(),
    }
}

/// Hash the source model file and the external data files it read; for a checkpoint folder, its
/// config.json and index, and the headers of its safetensors files.
pub fn describe_source(path: &Path, model: &Model) -> Result<Source> {
    let absolute = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if path.is_dir() {
        let mut files = vec![hashed(&path.join("config.json"))?];
        let index = path.join(crate::checkpoint::INDEX);
        if index.is_file() {
            files.push(hashed(&index)?);
        }
        let weights = model
            .external_files
            .iter()
            .map(|f| weight_file(f))
            .collect::<Result<_>>()?;
        return Ok(Source {
            path: absolute.display().to_string(),
            files,
            weights,
            build: None,
        });
    }
    let mut files = vec![hashed(path)?];
    for f in &model.external_files {
        files.push(hashed(f)?);
    }
    // Absolute, so a runtime can find the float model from anywhere (`ditc run --compare-full`).
    Ok(Source {
        path: absolute.display().to_string(),
        files,
        weights: Vec::new(),
        build: None,
    })
}

/// A safetensors file identified by size and the SHA-256 of its header (8-byte length + JSON).
fn weight_file(path: &Path) -> Result<WeightFile> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let bytes = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    // Checkpoint::open already refused headers above 100 MB or beyond the file; stay bounded anyway.
    let header_len = u64::from_le_bytes(len)
        .min(bytes.saturating_sub(8))
        .min(100 << 20);
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let mut h = sha2::Sha256::new();
    h.update(len);
    h.update(&header);
    Ok(WeightFile {
        path: path.display().to_string(),
        bytes,
        header_sha256: format!("{:x}", h.finalize()),
    })
}

fn hashed(path: &Path) -> Result<WrittenFile> {
    Ok(WrittenFile {
        path: path.display().to_string(),
        bytes: std::fs::metadata(path)?.len(),
        sha256: sha256_file(path)?,
    })
}

/// The latent and timestep inputs, found from the graph: the latent is the rank-4/5 float input, the
/// timestep a one-element input that reaches a `Sin`/`Cos` (the sinusoidal embedding).
pub fn detect_io(model: &Model) -> Result<ModelIo> {
    let graph = &model.graph;
    let latents: Vec<&ValueInfo> = graph
        .runtime_inputs()
        .filter(|i| {
            i.dtype().is_some_and(DataType::is_float)
                && matches!(i.shape().map(|s| s.len()), Some(4 | 5))
        })
        .collect();
    let [latent] = latents.as_slice() else {
        bail!("cannot tell the latent input: expected exactly one rank-4 or rank-5 float input, found {}", latents.len());
    };
    // One element per batch row: dims of 1, or the symbolic batch axis of a dynamic-batch graph.
    let one_element = |i: &&ValueInfo| {
        i.shape().is_some_and(|s| {
            s.iter()
                .enumerate()
                .all(|(k, d)| d.value() == Some(1) || (k == 0 && matches!(d, Dim::Param(_))))
        })
    };
    let timestep = graph
        .runtime_inputs()
        .filter(one_element)
        .find(|i| reaches_sinusoid(model, &i.name))
        .with_context(|| {
            "cannot tell the timestep input: no one-element input reaches a Sin/Cos embedding"
        })?;
    let prediction = graph.outputs.first().context("the graph has no output")?;
    Ok(ModelIo {
        latent: latent.name.clone(),
        timestep: timestep.name.clone(),
        prediction: prediction.name.clone(),
        step: None,
        branch: None,
    })
}

fn reaches_sinusoid(model: &Model, input: &str) -> bool {
    let mut frontier = vec![input.to_string()];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..24 {
        let mut next = Vec::new();
        for n in &model.graph.nodes {
            if n.present_inputs().any(|i| frontier.iter().any(|f| f == i))
                && seen.insert(n.name.clone())
            {
                if matches!(n.op_type.as_str(), "Sin" | "Cos") {
                    return true;
                }
                next.extend(n.outputs.iter().cloned());
            }
        }
        if next.is_empty() {
            return false;
        }
        frontier = next;
    }
    false
}

/// The trtexec build of the bundle. Strongly typed (precisions come from the graph's Q/DQ and casts);
/// the target GPU is named in a trailing comment because an engine is built on, and for, the GPU it
/// runs on (trtexec has no flag to build for another one).
pub fn trtexec_command(
    model: &Model,
    batch_range: (i64, i64, i64),
    target: crate::target::DeployTarget,
) -> String {
    // One shape list per profile point; symbolic dims (the dynamic batch) take min, opt and max.
    let shapes = |pick: fn((i64, i64, i64)) -> i64| -> String {
        model
            .graph
            .runtime_inputs()
            .filter_map(|i| {
                let dims: Option<Vec<String>> = i
                    .shape()?
                    .iter()
                    .map(|d| match d {
                        Dim::Value(v) => Some(v.to_string()),
                        Dim::Param(_) => Some(pick(batch_range).to_string()),
                        Dim::Unknown => None,
                    })
                    .collect();
                let dims = dims?;
                let dims = if dims.is_empty() {
                    "1".to_string()
                } else {
                    dims.join("x")
                };
                Some(format!("'{}':{dims}", i.name))
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    // Nodes marked for a plugin (`plugin_namespace`) need its library loaded at build and run time.
    let plugins = if crate::lint::plugin_nodes(model).is_empty() {
        String::new()
    } else {
        format!(
            " --staticPlugins={}",
            crate::passes::sparse_linear_attention::PLUGIN_LIBRARY
        )
    };
    format!(
        "trtexec --onnx=model.onnx --saveEngine=model.plan --stronglyTyped --builderOptimizationLevel=4{plugins} --minShapes={} --optShapes={} --maxShapes={}  # build on the target GPU: {} (compute capability {}+), TensorRT {}",
        shapes(|r| r.0),
        shapes(|r| r.1),
        shapes(|r| r.2),
        target.gpu.name(),
        target.gpu.compute_capability(),
        match target.tensorrt {
            crate::lint::Target::Trt10 => "10",
            crate::lint::Target::Trt11 => "11",
        }
    )
}

/// The manifest's JSON Schema (`schemas/manifest.schema.json`), built into the binary so `ditc run`
/// works from any folder.
pub const SCHEMA: &str = include_str!("../schemas/manifest.schema.json");

/// The compiled schema, built once per process.
fn schema_validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let schema: serde_json::Value =
            serde_json::from_str(SCHEMA).expect("the built-in manifest schema is JSON (tested)");
        jsonschema::draft202012::options()
            .build(&schema)
            .expect("the built-in manifest schema compiles (tested)")
    })
}

/// Every violation of the manifest schema by `manifest`, each as `$.json.path: what is wrong`
/// (empty when it conforms).
pub fn validate_schema(manifest: &serde_json::Value) -> Vec<String> {
    schema_validator()
        .iter_errors(manifest)
        .map(|e| {
            // A whole object or array in the message would bury the point: name its kind instead.
            let value = e.instance().to_string();
            let message = if value.len() > 80 {
                e.masked_with(value_kind(e.instance())).to_string()
            } else {
                e.to_string()
            };
            format!("{}: {message}", json_path(e.instance_path()))
        })
        .collect()
}

/// A JSON pointer location written as a JSONPath (`$.files[0].sha256`).
fn json_path(location: &jsonschema::paths::Location) -> String {
    let mut path = String::from("$");
    for segment in location.iter() {
        match segment {
            jsonschema::paths::LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
            jsonschema::paths::LocationSegment::Property(name) => {
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    path.push('.');
                    path.push_str(&name);
                } else {
                    path.push_str(&format!("[{}]", serde_json::Value::from(name.as_ref())));
                }
            }
        }
    }
    path
}

fn value_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Object(_) => "an object",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::String(_) => "a long string",
        _ => "the value",
    }
}

/// Read and check a manifest: JSON, this ditc's format and version, then the schema (every violation
/// listed). The bundle's files are checked separately ([`crate::integrity`]).
pub fn read(path: &Path) -> Result<Manifest> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("'{}' is not a ditc manifest: not JSON", path.display()))?;
    // A manifest of another version violates this version's schema everywhere; say that instead.
    let (format, version) = (&value["format"], &value["version"]);
    let other_version = version.is_u64() && *version != VERSION;
    if format.is_string() && (*format != FORMAT || other_version) {
        bail!(
            "'{}': format {format} version {version} (this ditc reads '{FORMAT}' version {VERSION})",
            path.display(),
        );
    }
    let violations = validate_schema(&value);
    if !violations.is_empty() {
        bail!(
            "'{}' is not a ditc manifest: {} violation(s) of its schema:\n  {}",
            path.display(),
            violations.len(),
            violations.join("\n  ")
        );
    }
    serde_json::from_value(value)
        .with_context(|| format!("'{}' is not a ditc manifest", path.display()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Precision {
    pub format: String,
    pub weights: String,
    pub activations: String,
    pub quantized: Vec<QuantizedLayer>,
    pub excluded: Vec<Excluded>,
    pub calibration: Option<crate::calibration::CalibrationInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizedLayer {
    pub node: String,
    pub block: Option<usize>,
    pub activation: String,
    pub activation_amax: f32,
    pub activation_scale: f32,
    pub weight: String,
    pub weight_axis: usize,
    pub weight_channels: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Excluded {
    pub node: String,
    pub reason: String,
}
