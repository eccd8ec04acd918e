//! `ditc inspect MODEL [--json] [--check]`: what a model is, and where its attention is. It reads only
//! the graph, unless `--check` asks it to read every weight too and refuse non-finite ones.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::analysis::{analyse, DitMap};
use crate::ir::{Model, TensorData};
use crate::manifest::{binding, Binding};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model: an .onnx file (external data is read from beside it) or a diffusers checkpoint folder
    /// (config.json + safetensors; its graph is built, see the shape options).
    pub model: PathBuf,
    /// Print the report as JSON (shape documented in the README).
    #[arg(long)]
    pub json: bool,
    /// Also read every weight and refuse the model if one holds a NaN or an infinity (naming the
    /// tensor, its file and the first bad index). Without it only the graph is read.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub shapes: crate::models::BuildOptions,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub version: u32,
    pub model: ModelInfo,
    pub inputs: Vec<Binding>,
    pub outputs: Vec<Binding>,
    pub parameters: Parameters,
    pub ops: BTreeMap<String, usize>,
    pub blocks: Vec<crate::analysis::Block>,
    pub attention: Vec<crate::analysis::AttentionSite>,
    pub flops: crate::analysis::FlopSummary,
    /// Cost model (README "Cost model"): estimated H100 time of each attention site per call.
    pub h100_estimate: Vec<SiteEstimate>,
}

/// Estimated H100 milliseconds of one attention site per call: dense, and for a block-sparse site
/// (`ai.ditc` `SparseLinearAttention`, top-k mode) at its kept fraction.
#[derive(Debug, Serialize)]
pub struct SiteEstimate {
    /// The DiT map's site id (for an `ai.ditc` attention op, which the map of a bundle's graph does
    /// not re-find: the source graph's id in its node name).
    pub id: usize,
    pub node: String,
    pub dense_ms: f64,
    /// Kept fraction of the score blocks (top-k: keep_blocks / key_blocks), null for dense sites
    /// and for mass mode (value dependent: `ditc run` measures it).
    pub kept_fraction: Option<f64>,
    pub estimated_ms: f64,
    /// Quantized attention at the site (`fp8` or `sage`, null: BF16) and the factor applied.
    pub quantized: Option<String>,
    pub quantized_factor: f64,
}

#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub ir_version: i64,
    pub opsets: BTreeMap<String, i64>,
    pub producer: String,
    pub nodes: usize,
}

#[derive(Debug, Serialize, Default)]
pub struct Parameters {
    pub count: u64,
    pub bytes: u64,
    pub by_dtype: BTreeMap<String, DtypeTotals>,
}

#[derive(Debug, Serialize, Default)]
pub struct DtypeTotals {
    pub count: u64,
    pub bytes: u64,
}

pub fn report(path: &str, model: &Model, map: DitMap) -> Report {
    let known: Vec<String> = map.attention.iter().map(|s| s.anchor.clone()).collect();
    let mut ops = BTreeMap::new();
    for n in &model.graph.nodes {
        let key = if n.is_onnx() {
            n.op_type.clone()
        } else {
            format!("{}:{}", n.domain, n.op_type)
        };
        *ops.entry(key).or_insert(0) += 1;
    }
    let mut parameters = Parameters::default();
    for t in &model.graph.initializers {
        let entry = parameters.by_dtype.entry(t.dtype.to_string()).or_default();
        let bytes = match &t.data {
            TensorData::Raw(b) => b.len() as u64,
            TensorData::Strings(_) => t.byte_len(),
        };
        entry.count += t.numel();
        entry.bytes += bytes;
        parameters.count += t.numel();
        parameters.bytes += bytes;
    }
    Report {
        format: "ditc-inspect",
        version: 1,
        model: ModelInfo {
            path: path.to_string(),
            ir_version: model.ir_version,
            opsets: model
                .opsets
                .iter()
                .map(|(d, v)| {
                    (
                        if d.is_empty() {
                            "ai.onnx".to_string()
                        } else {
                            d.clone()
                        },
                        *v,
                    )
                })
                .collect(),
            producer: format!("{} {}", model.producer_name, model.producer_version)
                .trim()
                .to_string(),
            nodes: model.graph.nodes.len(),
        },
        inputs: model.graph.runtime_inputs().map(binding).collect(),
        outputs: model.graph.outputs.iter().map(binding).collect(),
        parameters,
        ops,
        blocks: map.blocks,
        h100_estimate: crate::analysis::gpu_cost::site_costs(model, &map.attention)
            .into_iter()
            .chain(crate::analysis::gpu_cost::ditc_op_costs(model, &known))
            .chain(crate::analysis::gpu_cost::fp8_site_costs(
                model,
                &known,
                map.attention.len(),
            ))
            .map(|c| SiteEstimate {
                id: c.site,
                node: c.node,
                dense_ms: c.h100_ms_dense,
                kept_fraction: c.kept_fraction,
                estimated_ms: c.h100_ms_estimated,
                quantized: c.quantized,
                quantized_factor: c.quantized_factor,
            })
            .collect(),
        attention: map.attention,
        flops: map.flops,
    }
}

pub fn run(args: &Args) -> Result<()> {
    let model = crate::models::read_model_or_checkpoint(&args.model, &args.shapes)?;
    if args.check {
        check_weights(args, &model)?;
    }
    let map = analyse(&model);
    let report = report(&args.model.display().to_string(), &model, map);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

/// Scan every float weight (see [`crate::finite`]) and say on stderr what was checked.
fn check_weights(args: &Args, model: &Model) -> Result<()> {
    let start = std::time::Instant::now();
    let checked = crate::finite::check_model(&args.model, model, true)?;
    eprintln!(
        "checked {} float tensors ({}) in {:.2}s: all finite",
        checked.tensors,
        human_bytes(checked.bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn shape_text(b: &Binding) -> String {
    let dims: Vec<String> = b
        .shape
        .iter()
        .map(|d| d.to_string().trim_matches('"').to_string())
        .collect();
    format!("{} {} [{}]", b.name, b.dtype, dims.join(", "))
}

fn print_text(r: &Report) {
    let opsets: Vec<String> = r
        .model
        .opsets
        .iter()
        .map(|(d, v)| format!("{d} {v}"))
        .collect();
    println!("model      {}", r.model.path);
    println!(
        "format     ONNX IR {}, opset {}, {} nodes{}",
        r.model.ir_version,
        opsets.join(", "),
        r.model.nodes,
        if r.model.producer.is_empty() {
            String::new()
        } else {
            format!(", from {}", r.model.producer)
        }
    );
    for i in &r.inputs {
        println!("input      {}", shape_text(i));
    }
    for o in &r.outputs {
        println!("output     {}", shape_text(o));
    }
    let by: Vec<String> = r
        .parameters
        .by_dtype
        .iter()
        .map(|(d, t)| format!("{d}: {} ({})", t.count, human_bytes(t.bytes)))
        .collect();
    println!(
        "parameters {} ({}; {})",
        r.parameters.count,
        human_bytes(r.parameters.bytes),
        by.join(", ")
    );
    let mut ops: Vec<(&String, &usize)> = r.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let ops: Vec<String> = ops.iter().map(|(o, n)| format!("{o} {n}")).collect();
    println!("ops        {}", ops.join(", "));
    println!(
        "flops      {} per call ({} in attention)",
        human_flops(r.flops.total),
        human_flops(r.flops.attention)
    );
    println!();
    println!(
        "{} blocks, {} attention sites",
        r.blocks.len(),
        r.attention.len()
    );
    for b in &r.blocks {
        let kinds: Vec<&str> = b.kinds.iter().map(|k| k.as_str()).collect();
        println!(
            "  block {:>2}  {:<40} {}{}",
            b.index,
            b.name,
            kinds.join(" + "),
            if b.ffn.is_some() { " + ffn" } else { "" }
        );
    }
    println!();
    println!(
        "  {:>3} {:<9} {:>5} {:>4} {:>6} {:>6} {:>6} {:>10} {:>11}  anchor",
        "id", "kind", "heads", "dim", "batch", "q_len", "k_len", "flops", "H100 µs"
    );
    for (s, e) in r.attention.iter().zip(&r.h100_estimate) {
        let time = estimate_text(e);
        println!(
            "  {:>3} {:<9} {:>5} {:>4} {:>6} {:>6} {:>6} {:>10} {:>11}  {}{}",
            s.id,
            s.kind.as_str(),
            s.heads,
            s.head_dim,
            s.batch,
            s.query_len,
            s.key_len,
            human_flops(s.flops),
            time,
            s.anchor,
            if s.traced {
                ""
            } else {
                "  (axes not traced; kind guessed)"
            }
        );
    }
    let fused = &r.h100_estimate[r.attention.len().min(r.h100_estimate.len())..];
    if !fused.is_empty() {
        println!("  attention a ditc pass fused (ai.ditc ops) or quantized (FP8 Q/DQ):");
    }
    for e in fused {
        let time = estimate_text(e);
        println!(
            "  {:>3} H100 µs {} (dense {:.2})  {}",
            e.id,
            time,
            1e3 * e.dense_ms,
            e.node
        );
    }
}

/// A site's estimated H100 time in µs, with its kept fraction and quantization factor when it has them.
fn estimate_text(e: &SiteEstimate) -> String {
    let mut time = match e.kept_fraction {
        Some(k) => format!("{:.2} ({:.0}% kept)", 1e3 * e.estimated_ms, 100.0 * k),
        None => format!("{:.2}", 1e3 * e.estimated_ms),
    };
    if let Some(q) = &e.quantized {
        time.push_str(&format!(" ({q} /{})", e.quantized_factor));
    }
    time
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub fn human_flops(f: u64) -> String {
    let units = ["", "K", "M", "G", "T", "P"];
    let mut v = f as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{f}")
    } else {
        format!("{v:.2}{}", units[u])
    }
}
