//! Recipes: which passes to run, with which options, and the sampler the bundle is driven with.
//!
//! A recipe is a TOML file (see `passes/*.toml`):
//!
//! ```toml
//! name = "pab"
//! [sampler]            # optional; needed by schedule passes
//! kind = "ddim"
//! steps = 50
//! [sampler.guidance]   # optional: classifier-free guidance, two calls per step
//! scale = 5.0
//! negative = "zeros"   # or the name of a tensor of the --inputs file
//! [[passes]]
//! name = "broadcast-static"
//! preset = "../schedules/pab/latte.toml"   # options from a preset, relative to this file
//! [passes.options]                         # options given here override the preset's
//! cross = { period = 8, window = [100, 800] }
//! ```
//!
//! `--set key=value` overrides any option: `sampler.steps=30`, `broadcast-static.spatial.period=3`.
//! Values are TOML (`3`, `[100, 800]`, `"text"`); a bare word is taken as a string.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::schedule::guidance::Guidance;
use crate::schedule::SamplerConfig;

#[derive(Debug, Clone)]
pub struct Recipe {
    pub path: Option<PathBuf>,
    pub name: String,
    pub sampler: Option<SamplerConfig>,
    /// `[sampler.guidance]`: classifier-free guidance (validated).
    pub guidance: Option<Guidance>,
    pub passes: Vec<PassSpec>,
    pub overrides: Vec<String>,
    /// `fidelity_budget = "rel-l2=0.3"` (or `psnr=DB`, `cosine=C`): the final-latent fidelity vs the
    /// full model the recipe promises; `ditc run --compare-full` reports whether a run meets it.
    pub fidelity_budget: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PassSpec {
    pub name: String,
    pub options: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: Option<String>,
    description: Option<String>,
    version: Option<u32>,
    fidelity_budget: Option<String>,
    sampler: Option<toml::Table>,
    #[serde(default)]
    passes: Vec<PassFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassFile {
    name: String,
    preset: Option<String>,
    #[serde(default)]
    options: toml::Table,
}

impl Recipe {
    /// No passes, no sampler: a plain conversion (overrides may still add a sampler).
    pub fn empty(overrides: &[String]) -> Result<Recipe> {
        Self::build(
            None,
            RecipeFile {
                name: None,
                description: None,
                version: None,
                fidelity_budget: None,
                sampler: None,
                passes: vec![],
            },
            overrides,
        )
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe '{}'", path.display()))?;
        let file: RecipeFile =
            toml::from_str(&text).with_context(|| format!("recipe '{}'", path.display()))?;
        Self::build(Some(path), file, overrides)
            .with_context(|| format!("recipe '{}'", path.display()))
    }

    fn build(path: Option<&Path>, file: RecipeFile, overrides: &[String]) -> Result<Recipe> {
        let _ = (file.description, file.version);
        let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
        let mut passes = Vec::new();
        for p in file.passes {
            let mut options = match &p.preset {
                Some(preset) => load_preset(&base.join(preset))?,
                None => toml::Table::new(),
            };
            merge(&mut options, p.options);
            passes.push(PassSpec {
                name: p.name,
                options,
            });
        }
        let mut sampler = file.sampler;
        for o in overrides {
            apply_override(o, &mut sampler, &mut passes)?;
        }
        let guidance = sampler
            .as_mut()
            .and_then(|t| t.remove("guidance"))
            .map(|g| g.try_into::<Guidance>())
            .transpose()
            .context("invalid [sampler.guidance] (scale = 5.0, negative = \"zeros\" or an input name, optional input = the model input it replaces)")?;
        if let Some(g) = &guidance {
            g.validate()?;
        }
        let sampler = sampler
            .map(|t| toml::Value::Table(t).try_into::<SamplerConfig>())
            .transpose()
            .context("invalid [sampler] (kind = \"ddim\" or \"flow_euler\", steps = N, ...)")?;
        if guidance.is_some() && sampler.is_none() {
            bail!("[sampler.guidance] needs a [sampler] (kind and steps)");
        }
        Ok(Recipe {
            path: path.map(Path::to_path_buf),
            name: file.name.unwrap_or_else(|| "none".into()),
            sampler,
            guidance,
            passes,
            overrides: overrides.to_vec(),
            fidelity_budget: file.fidelity_budget,
        })
    }
}

fn load_preset(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read preset '{}'", path.display()))?;
    toml::from_str(&text).with_context(|| format!("preset '{}'", path.display()))
}

/// Deep-merge `over` into `base` (tables merge, other values replace).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn apply_override(
    o: &str,
    sampler: &mut Option<toml::Table>,
    passes: &mut [PassSpec],
) -> Result<()> {
    let Some((key, raw)) = o.split_once('=') else {
        bail!("--set '{o}': expected key=value");
    };
    let value = parse_value(raw.trim());
    let mut path: Vec<&str> = key.trim().split('.').collect();
    // `quantize.x` is accepted for `quantize-w8a8.x`.
    let root = match path.remove(0) {
        "quantize" => "quantize-w8a8",
        other => other,
    };
    if path.is_empty() {
        bail!("--set '{o}': name an option under '{root}', e.g. {root}.steps");
    }
    let table = if root == "sampler" {
        sampler.get_or_insert_with(toml::Table::new)
    } else if let Some(p) = passes.iter_mut().find(|p| p.name == root) {
        &mut p.options
    } else {
        let roots: Vec<&str> = std::iter::once("sampler")
            .chain(passes.iter().map(|p| p.name.as_str()))
            .collect();
        bail!(
            "--set '{o}': unknown option root '{root}' (this recipe has: {})",
            roots.join(", ")
        );
    };
    let (last, parents) = path.split_last().expect("non-empty");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(next) = entry else {
            bail!("--set '{o}': '{p}' is not a table");
        };
        t = next;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_merge_and_overrides_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("preset.toml"), "spatial = { period = 2, window = [100, 800] }\ncross = { period = 6, window = [100, 800] }\n").unwrap();
        std::fs::write(
            dir.path().join("r.toml"),
            "name = \"t\"\n[sampler]\nkind = \"ddim\"\nsteps = 50\n[[passes]]\nname = \"broadcast-static\"\npreset = \"preset.toml\"\n[passes.options]\ncross = { period = 8, window = [100, 800] }\n",
        )
        .unwrap();
        let sets = vec![
            "broadcast-static.spatial.period=3".to_string(),
            "sampler.steps=20".to_string(),
        ];
        let r = Recipe::load(&dir.path().join("r.toml"), &sets).unwrap();
        assert_eq!(r.sampler.unwrap().steps(), 20);
        let o = &r.passes[0].options;
        assert_eq!(o["spatial"]["period"].as_integer(), Some(3));
        assert_eq!(o["cross"]["period"].as_integer(), Some(8));
        assert!(Recipe::load(&dir.path().join("r.toml"), &["nope.x=1".into()]).is_err());
        // `quantize.` is short for `quantize-w8a8.`.
        std::fs::write(
            dir.path().join("q.toml"),
            "[[passes]]\nname = \"quantize-w8a8\"\n",
        )
        .unwrap();
        let q = Recipe::load(
            &dir.path().join("q.toml"),
            &["quantize.skip_blocks=[0, 27]".into()],
        )
        .unwrap();
        assert_eq!(
            q.passes[0].options["skip_blocks"].as_array().unwrap().len(),
            2
        );
        assert!(Recipe::load(&dir.path().join("r.toml"), &["sampler.bogus=1".into()]).is_err());
    }

    #[test]
    fn guidance_is_read_from_the_sampler_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "[sampler]\nkind = \"flow_euler\"\nsteps = 50\n[sampler.guidance]\nscale = 5.0\nnegative = \"negative_encoder_hidden_states\"\n",
        )
        .unwrap();
        let r = Recipe::load(&path, &[]).unwrap();
        let g = r.guidance.unwrap();
        assert_eq!(g.scale, 5.0);
        assert_eq!(g.negative, "negative_encoder_hidden_states");
        assert_eq!(g.input, None);
        assert_eq!(r.sampler.unwrap().steps(), 50);
        let r = Recipe::load(&path, &["sampler.guidance.scale=1.0".into()]).unwrap();
        assert_eq!(r.guidance.unwrap().scale, 1.0);
        let err = |set: &str| format!("{:#}", Recipe::load(&path, &[set.into()]).unwrap_err());
        assert!(err("sampler.guidance.scale=nan").contains("finite"));
        assert!(err("sampler.guidance.weight=2").contains("unknown field"));
        assert!(err("sampler.guidance.negative=\"\"").contains("empty"));
        let plain =
            Recipe::empty(&["sampler.guidance={ scale = 2.0, negative = \"zeros\" }".into()]);
        assert!(format!("{:#}", plain.unwrap_err()).contains("kind"));
    }
}
