//! The bundle manifest (`manifest.json`): everything a runtime needs to drive the emitted graph.
//!
//! This is the first version (`"version": 0`): source and output files with hashes, graph inputs and
//! outputs, and the DiT map. The sampler, schedule and state bindings come with the schedule passes.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::analysis::DitMap;
use crate::ir::{Dim, Model, ValueInfo};
use crate::onnx::WrittenFile;
use crate::output::sha256_file;

pub const FORMAT: &str = "ditc-manifest";
pub const VERSION: u32 = 0;

#[derive(Debug, Serialize)]
pub struct Manifest {
    pub format: &'static str,
    pub version: u32,
    pub ditc_version: &'static str,
    pub source: Source,
    /// Files of the bundle, relative to the manifest's folder; the first is the graph.
    pub files: Vec<WrittenFile>,
    pub ir_version: i64,
    pub opset: i64,
    pub inputs: Vec<Binding>,
    pub outputs: Vec<Binding>,
    /// Passes applied, in order (none for a plain conversion).
    pub passes: Vec<String>,
    pub dit_map: DitMap,
}

#[derive(Debug, Serialize)]
pub struct Source {
    pub path: String,
    pub files: Vec<WrittenFile>,
}

/// A graph input or output: name, dtype and shape (numbers, or names for dynamic axes).
#[derive(Debug, Serialize)]
pub struct Binding {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<serde_json::Value>,
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

/// Hash the source model file and the external data files it read.
pub fn describe_source(path: &Path, model: &Model) -> Result<Source> {
    let mut files = vec![hashed(path)?];
    for f in &model.external_files {
        files.push(hashed(f)?);
    }
    Ok(Source {
        path: path.display().to_string(),
        files,
    })
}

fn hashed(path: &Path) -> Result<WrittenFile> {
    Ok(WrittenFile {
        path: path.display().to_string(),
        bytes: std::fs::metadata(path)?.len(),
        sha256: sha256_file(path)?,
    })
}

pub fn build(model: &Model, source: Source, files: Vec<WrittenFile>, dit_map: DitMap) -> Manifest {
    Manifest {
        format: FORMAT,
        version: VERSION,
        ditc_version: env!("CARGO_PKG_VERSION"),
        source,
        files,
        ir_version: model.ir_version,
        opset: model.default_opset(),
        inputs: model.graph.runtime_inputs().map(binding).collect(),
        outputs: model.graph.outputs.iter().map(binding).collect(),
        passes: Vec::new(),
        dit_map,
    }
}
