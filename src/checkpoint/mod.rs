//! Diffusers checkpoints: a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or
//! shards listed by `diffusion_pytorch_model.safetensors.index.json` (`weight_map`: tensor -> shard).
//!
//! Every file is memory-mapped; tensors are zero-copy slices that stay on disk until touched. Reading
//! checks what a hostile or broken checkpoint could get wrong, naming the file and tensor: header sizes
//! and offsets (a header beyond the file; per tensor an unknown dtype, offsets beyond the data, a length
//! that disagrees with dtype x shape, overlaps; then the safetensors parser refuses headers above 100 MB
//! and gaps), unsupported dtypes, missing
//! shards, an index naming a tensor twice, tensors in a shard that the index does not list, and tensors
//! the index lists but the shard lacks. The graph builders ([`crate::models`]) turn a checkpoint into a graph.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::ir::{DataType, Tensor};
use crate::onnx::external::map_file;

pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
pub const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

pub struct Checkpoint {
    pub dir: PathBuf,
    pub class_name: String,
    pub config: serde_json::Value,
    /// Shard files in the order they were read.
    pub files: Vec<PathBuf>,
    /// All tensors, sorted by name.
    pub tensors: Vec<Tensor>,
}

/// True when `dir` looks like a diffusers model folder.
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && (dir.join(WEIGHTS).is_file() || dir.join(INDEX).is_file())
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read '{}'", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("'{}' is not valid JSON", config_path.display()))?;
        let class_name = config["_class_name"]
            .as_str()
            .with_context(|| format!("'{}' has no \"_class_name\"", config_path.display()))?
            .to_string();
        let (files, tensors) = if dir.join(INDEX).is_file() {
            read_sharded(dir)?
        } else {
            read_single(dir)?
        };
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            class_name,
            config,
            files,
            tensors,
        })
    }

    pub fn parameters(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel()).sum()
    }
}

fn read_single(dir: &Path) -> Result<(Vec<PathBuf>, Vec<Tensor>)> {
    let path = dir.join(WEIGHTS);
    if !path.is_file() {
        bail!("'{}' has neither {WEIGHTS} nor {INDEX}", dir.display());
    }
    let mut tensors = read_shard(&path)?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((vec![path], tensors))
}

/// Tensors of one safetensors file (zero-copy), with errors naming the file and tensor.
pub fn read_shard(path: &Path) -> Result<Vec<Tensor>> {
    let file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let bytes = map_file(&file)?;
    check_header(&bytes).map_err(|e| {
        anyhow::anyhow!("'{}' is not a valid safetensors file: {e}", path.display())
    })?;
    let parsed = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!("'{}' is not a valid safetensors file: {e}", path.display())
    })?;
    let mut out = Vec::new();
    for (name, view) in parsed.tensors() {
        let Some(dtype) = DataType::from_safetensors(view.dtype()) else {
            bail!(
                "'{}': tensor '{name}' has unsupported dtype {:?}",
                path.display(),
                view.dtype()
            );
        };
        let dims = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::from_raw(&name, dtype, dims, bytes.slice_ref(view.data()))
            .with_context(|| format!("in '{}'", path.display()))?;
        out.push(t);
    }
    Ok(out)
}

/// One tensor's entry in a safetensors header.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// What the safetensors parser refuses without saying which tensor or by how much: a header size
/// beyond the file, and per tensor an unknown dtype, offsets reversed or beyond the data section, a
/// length that is not dtype x shape, and overlapping byte ranges. Malformed JSON and layouts that are
/// only unusual (gaps) are left to the parser.
fn check_header(bytes: &[u8]) -> Result<()> {
    let Some(size) = bytes.get(..8) else {
        bail!(
            "{} bytes, too short for the 8-byte header size",
            bytes.len()
        );
    };
    let header_len = u64::from_le_bytes(size.try_into().expect("8 bytes"));
    let after_size = bytes.len() as u64 - 8;
    if header_len > after_size {
        bail!(
            "the header size {header_len} bytes runs beyond the end of the file ({} bytes)",
            bytes.len()
        );
    }
    let header = &bytes[8..8 + header_len as usize];
    let Ok(entries) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return Ok(());
    };
    let data_len = after_size - header_len;
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, value) in entries.iter().filter(|(n, _)| *n != "__metadata__") {
        let Ok(e) = HeaderEntry::deserialize(value) else {
            bail!("tensor '{name}': header entry {value} is not {{dtype, shape, data_offsets}}");
        };
        let dtype: safetensors::Dtype =
            serde_json::from_value(serde_json::Value::String(e.dtype.clone()))
                .map_err(|_| anyhow::anyhow!("tensor '{name}' has unknown dtype '{}'", e.dtype))?;
        let [start, end] = e.data_offsets;
        if start > end {
            bail!("tensor '{name}': data_offsets [{start}, {end}] are reversed");
        }
        if end > data_len {
            bail!("tensor '{name}': data_offsets [{start}, {end}] run beyond the end of the data ({data_len} bytes)");
        }
        let needed = e
            .shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        if needed != Some(end - start) {
            let needs = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
            bail!(
                "tensor '{name}': data_offsets [{start}, {end}] hold {} bytes, but {} {:?} needs {needs}",
                end - start,
                e.dtype,
                e.shape
            );
        }
        spans.push((start, end, name));
    }
    spans.sort();
    for pair in spans.windows(2) {
        let ((s0, e0, a), (s1, e1, b)) = (pair[0], pair[1]);
        if s1 < e0 {
            bail!("tensor '{b}' (bytes {s1}..{e1}) overlaps tensor '{a}' (bytes {s0}..{e0})");
        }
    }
    Ok(())
}

fn read_sharded(dir: &Path) -> Result<(Vec<PathBuf>, Vec<Tensor>)> {
    let index_path = dir.join(INDEX);
    let text = std::fs::read_to_string(&index_path)
        .with_context(|| format!("cannot read '{}'", index_path.display()))?;
    let index: IndexFile = serde_json::from_str(&text)
        .with_context(|| format!("'{}' is not a valid shard index", index_path.display()))?;
    let mut wanted: HashMap<String, String> = HashMap::new();
    for (tensor, shard) in index.weight_map.0 {
        if let Some(first) = wanted.insert(tensor.clone(), shard.clone()) {
            bail!(
                "'{}' names tensor '{tensor}' twice (in '{first}' and '{shard}')",
                index_path.display()
            );
        }
    }
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in &wanted {
        shards
            .entry(shard.clone())
            .or_default()
            .push(tensor.clone());
    }
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    for (shard, listed) in shards {
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            bail!(
                "'{}': shard '{shard}' must be a file name in the checkpoint folder",
                index_path.display()
            );
        }
        let path = dir.join(&shard);
        if !path.is_file() {
            bail!(
                "shard '{shard}' listed by '{}' is missing",
                index_path.display()
            );
        }
        let found = read_shard(&path)?;
        for t in &found {
            if wanted.get(&t.name) != Some(&shard) {
                bail!(
                    "'{}': tensor '{}' is not listed for this shard in the index",
                    path.display(),
                    t.name
                );
            }
        }
        for name in &listed {
            if !found.iter().any(|t| &t.name == name) {
                bail!(
                    "'{}': the index lists tensor '{name}' here, but the shard does not have it",
                    path.display()
                );
            }
        }
        files.push(path);
        tensors.extend(found);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, tensors))
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: Pairs,
}

/// A JSON object read as a list of pairs, so duplicate keys stay visible.
struct Pairs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Pairs, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of tensor name -> shard file")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some((k, s)) = m.next_entry::<String, String>()? {
                    v.push((k, s));
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(V)
    }
}
