//! The conversion report: `report.json` (and `report.md`, the same for a person) in every bundle.
//!
//! `ditc convert` writes what each pass changed, the FLOPs its tables plan and the declared fidelity
//! budget (the recipe's `fidelity_budget`); `ditc run --compare-full` adds what was measured on the
//! given inputs: calls and FLOPs computed, attention kept, fidelity against the full model, whether
//! the budget is met, and the estimated H100 time per step, full vs this bundle, from the cost model:
//!
//! - attention score/value products: [`gpu_cost`] per site and call (dense at 602 TFLOP/s; a
//!   block-sparse site at its measured kept fraction through the measured sparsity curve), divided
//!   by the quantized-attention factor (1.6, an assumption from published peaks) where
//!   `quantize-attention` ran;
//! - everything else (projections, FFNs, norms): the call's FLOPs outside those products at
//!   [`GEMM_EFFECTIVE_TFLOPS`], divided by W8A8's factor ([`w8a8_factor`]);
//! - a call a cache skipped costs nothing (its few FLOPs outside the stack are counted as GEMMs).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::analysis::gpu_cost;
use crate::manifest::Manifest;
use crate::metrics::Fidelity;
use crate::runtime::RunReport;

pub const FORMAT: &str = "ditc-report";
pub const FILE: &str = "report.json";
pub const SUMMARY_FILE: &str = "report.md";

/// Effective H100 throughput of a Wan call outside attention (TFLOP/s of GEMM FLOPs, norms and
/// element-wise work included): Wan2.1-1.3B at 81x480x832 spends 625 - 353 = 272 ms of a call
/// outside self-attention (reference.md §3, measured) for 8.2e13 GEMM FLOPs (30 blocks x 32,760
/// tokens x 83.5 MFLOP: Q, K, V, O and cross Q, O projections, FFN 1536 -> 8960 -> 1536), ~300.
pub const GEMM_EFFECTIVE_TFLOPS: f64 = 300.0;

/// W8A8's speedup of the GEMM part on an H100 (reference.md §3, measured at Wan's GEMM shapes): FP8
/// `_scaled_mm` 1.48-1.86x of BF16, the low end taken; INT8 `_int_mm` 0.78-1.25x, taken as no gain.
/// `format` is the manifest's precision format (`w8a8-fp8-e4m3`, `w8a8-int8`).
pub fn w8a8_factor(format: &str) -> f64 {
    match format.contains("fp8") {
        true => 1.48,
        false => 1.0,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub format: String,
    pub version: u32,
    pub recipe: Option<String>,
    /// The recipe's `fidelity_budget` (`rel-l2=X`, `psnr=DB`, `cosine=C`), final latent vs full.
    pub fidelity_budget: Option<String>,
    /// Per pass, in order: what it changed.
    pub passes: Vec<PassChange>,
    /// FLOPs over the run as planned at conversion (adaptive caches decide at run time: every
    /// call computing).
    pub planned: Planned,
    /// Added by `ditc run --compare-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassChange {
    pub name: String,
    pub changed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Planned {
    pub steps: usize,
    pub model_flops_full: u64,
    pub model_flops: u64,
    pub attention_flops_full: u64,
    pub attention_flops: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// The inputs file and tensor prefix sampled.
    pub inputs: String,
    pub prefix: Option<String>,
    pub steps: usize,
    pub calls_computed: usize,
    pub calls: usize,
    pub model_flops: u64,
    pub model_flops_full: u64,
    pub attention_flops_kept_fraction: f64,
    pub fidelity: Fidelity,
    pub budget_met: Option<bool>,
    pub h100_ms_per_step_full: f64,
    pub h100_ms_per_step: f64,
    pub h100_speedup: f64,
}

/// What each pass of `m` changed, from the manifest's records.
pub fn pass_changes(m: &Manifest) -> Vec<PassChange> {
    m.provenance
        .passes
        .iter()
        .map(|p| PassChange {
            name: p.name.clone(),
            changed: describe(m, &p.name, &p.options),
        })
        .collect()
}

fn describe(m: &Manifest, pass: &str, options: &serde_json::Value) -> String {
    let plugin_nodes = |op: &str| {
        m.tensorrt
            .plugins
            .iter()
            .filter(|p| p.name == op)
            .map(|p| p.nodes.len())
            .sum::<usize>()
    };
    match pass {
        "quantize-w8a8" => match &m.precision {
            Some(p) => format!(
                "{} GEMM layers to W8A8 {} ({} excluded)",
                p.quantized.len(),
                p.format,
                p.excluded.len()
            ),
            None => "nothing quantized".into(),
        },
        "sparse-linear-attention" => match &m.sparse_attention {
            Some(s) => format!(
                "{} attention sites block-sparse ({}), top-k {} of {}x{}-token blocks{}",
                s.sites.len(),
                s.op,
                options["topk"]
                    .as_f64()
                    .map_or("?".into(), |t| t.to_string()),
                options["block_q"].as_i64().unwrap_or(128),
                options["block_k"].as_i64().unwrap_or(64),
                match options["mass"].as_f64() {
                    Some(mass) => format!(" (cumulative mass {mass} instead)"),
                    None => String::new(),
                }
            ),
            None => "no site".into(),
        },
        "quantize-attention" => {
            let format = options["format"].as_str().unwrap_or("?");
            match format {
                "sage" => format!(
                    "SageAttention2 numerics ({}) on {} SageAttention and {} SageSLA sites",
                    options["granularity"].as_str().unwrap_or("per_thread"),
                    plugin_nodes(crate::passes::quantize_attention::OP),
                    plugin_nodes(crate::passes::sage_sparse_attention::OP)
                ),
                _ => "per-tensor FP8 Q/DQ on Q, K, P and V of the self-attention sites".into(),
            }
        }
        _ => match &m.schedule {
            Some(s) => {
                let calls: Vec<String> = s
                    .calls
                    .iter()
                    .map(|(g, c)| format!("{} {}/{}", g.as_str(), c.computed, c.total))
                    .collect();
                let calls = match calls.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", calls.join(", ")),
                };
                format!(
                    "'{}' schedule baked{}{}",
                    s.policy,
                    calls,
                    match &s.adaptive {
                        Some(_) => ", decided in the graph at every call",
                        None => "",
                    }
                )
            }
            None => "no schedule".into(),
        },
    }
}

/// The report `ditc convert` writes for bundle `m`.
pub fn at_conversion(m: &Manifest, fidelity_budget: Option<String>) -> Report {
    Report {
        format: FORMAT.into(),
        version: 1,
        recipe: m.provenance.recipe.clone(),
        fidelity_budget,
        passes: pass_changes(m),
        planned: Planned {
            steps: m.cost.steps,
            model_flops_full: m.cost.model_flops_full,
            model_flops: m.cost.model_flops_scheduled,
            attention_flops_full: m.cost.attention_flops_full,
            attention_flops: m.cost.attention_flops_scheduled,
        },
        measured: None,
    }
}

/// The quantization factors of bundle `m`: W8A8's on the GEMMs, and the quantized-attention factor
/// per site id.
fn factors(m: &Manifest) -> (f64, BTreeMap<usize, f64>) {
    let gemm = m.precision.as_ref().map_or(1.0, |p| w8a8_factor(&p.format));
    let mut attention = BTreeMap::new();
    let quantized = m
        .provenance
        .passes
        .iter()
        .find(|p| p.name == "quantize-attention");
    if let Some(p) = quantized {
        let factor = match p.options["format"].as_str() {
            Some("fp8") => gpu_cost::FP8_ATTENTION_FACTOR,
            _ => gpu_cost::SAGE_ATTENTION_FACTOR,
        };
        let kinds: Vec<String> = match p.options["kinds"].as_array() {
            Some(k) => k
                .iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect(),
            None => ["full", "spatial", "temporal"].map(String::from).to_vec(),
        };
        for site in m.dit_map["attention"].as_array().into_iter().flatten() {
            let (Some(id), Some(kind)) = (site["id"].as_u64(), site["kind"].as_str()) else {
                continue;
            };
            if kinds.iter().any(|k| k == kind) {
                attention.insert(id as usize, factor);
            }
        }
    }
    (gemm, attention)
}

/// Estimated H100 milliseconds per step of a run, with the quantization factors given.
fn h100_ms_per_step(run: &RunReport, gemm: f64, attention: &BTreeMap<usize, f64>) -> f64 {
    let gemm_ms = run.gemm_flops as f64 / (GEMM_EFFECTIVE_TFLOPS * 1e12) * 1e3 / gemm;
    let attention_ms: f64 = run
        .attention_h100_ms
        .iter()
        .map(|(id, ms)| ms / attention.get(id).copied().unwrap_or(1.0))
        .sum();
    (gemm_ms + attention_ms) / run.steps.max(1) as f64
}

/// The measured section from a `--compare-full` run of bundle `m`.
pub fn measured(
    m: &Manifest,
    run: &RunReport,
    full: &RunReport,
    fidelity: &Fidelity,
    budget: Option<&crate::cli::tune::Budget>,
    inputs: &Path,
    prefix: Option<&str>,
) -> Measured {
    let (gemm, attention) = factors(m);
    let optimized = h100_ms_per_step(run, gemm, &attention);
    let baseline = h100_ms_per_step(full, 1.0, &BTreeMap::new());
    let (computed, calls) = run.branches.values().fold((0, 0), |(c, t), b| {
        (
            c + b.model_calls.computed,
            t + b.model_calls.computed + b.model_calls.skipped,
        )
    });
    Measured {
        inputs: inputs.display().to_string(),
        prefix: prefix.map(String::from),
        steps: run.steps,
        calls_computed: computed,
        calls,
        model_flops: run.model_flops,
        model_flops_full: run.model_flops_full,
        attention_flops_kept_fraction: run.attention_flops_kept_fraction,
        fidelity: fidelity.clone(),
        budget_met: budget.map(|b| b.meets(fidelity)),
        h100_ms_per_step_full: baseline,
        h100_ms_per_step: optimized,
        h100_speedup: baseline / optimized.max(1e-12),
    }
}

/// The report of the bundle whose manifest is `manifest` (None: an older bundle without one).
pub fn read(manifest: &Path) -> Result<Option<Report>> {
    let path = bundle_dir(manifest).join(FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a ditc report", path.display()))?;
    Ok(Some(report))
}

/// Write `report.json` and `report.md` beside `manifest` (each atomically).
pub fn write(manifest: &Path, report: &Report) -> Result<()> {
    let dir = bundle_dir(manifest);
    crate::output::write_file_atomically(
        &dir.join(FILE),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    crate::output::write_file_atomically(&dir.join(SUMMARY_FILE), summary(report).as_bytes())
}

fn bundle_dir(manifest: &Path) -> &Path {
    manifest.parent().unwrap_or(Path::new("."))
}

/// The report for a person (Markdown).
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "# ditc conversion report\n\nrecipe: {}\nfidelity budget: {}\n\n## Passes\n\n",
        r.recipe.as_deref().unwrap_or("(none)"),
        r.fidelity_budget.as_deref().unwrap_or("(none declared)")
    );
    for p in &r.passes {
        s += &format!("- `{}`: {}\n", p.name, p.changed);
    }
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    s += &format!(
        "\n## Planned at conversion\n\nmodel FLOPs {:.1}% of full, attention FLOPs {:.1}% of full over {} steps (adaptive caches: every call counted as computing)\n",
        pct(r.planned.model_flops, r.planned.model_flops_full),
        pct(r.planned.attention_flops, r.planned.attention_flops_full),
        r.planned.steps
    );
    match &r.measured {
        Some(m) => {
            s += &format!(
                "\n## Measured (`ditc run --compare-full`)\n\n{}\n{}\n",
                table_header(),
                table_row(m)
            )
        }
        None => s +=
            "\n## Measured\n\nnot yet: run `ditc run MANIFEST --inputs IN -o OUT --compare-full`\n",
    }
    s
}

/// The header of the README's turbo table, as `ditc run` prints it.
pub fn table_header() -> String {
    "| calls computed | model FLOPs | attention kept | est. H100 ms/step (full) | est. H100 speedup | PSNR (dB) | cosine | rel-L2 | budget |\n|---|---|---|---|---|---|---|---|---|".into()
}

/// One row of that table.
pub fn table_row(m: &Measured) -> String {
    format!(
        "| {}/{} | {:.1}% | {:.1}% | {:.4} ({:.4}) | {:.2}x | {:.2} | {:.5} | {:.4} | {} |",
        m.calls_computed,
        m.calls,
        100.0 * m.model_flops as f64 / m.model_flops_full.max(1) as f64,
        100.0 * m.attention_flops_kept_fraction,
        m.h100_ms_per_step,
        m.h100_ms_per_step_full,
        m.h100_speedup,
        m.fidelity.psnr_db,
        m.fidelity.cosine,
        m.fidelity.rel_l2,
        match m.budget_met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "-",
        }
    )
}
