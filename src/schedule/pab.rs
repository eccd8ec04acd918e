//! Pyramid Attention Broadcast: the static per-kind compute/reuse decision (reference.md §1).
//!
//! For a module called once per step, at step `i` with scheduler timestep `t`:
//! `compute = i == 0 || period == 1 || !(lo < t < hi) || i % period == 0`. The phase follows the global
//! step index, not the first step inside the window, exactly as diffusers' `PyramidAttentionBroadcastHook`.
//!
//! Explicit tables (`table = { full = "CCRC...", ... }`): a group's decision at every step written out,
//! one letter per step (`C` computes, `R` reuses), e.g. as `ditc tune` builds them from measured drift.
//! Per-block tables (`table = { blocks = { 3 = { cross = "CRRC..." } } }`, keys the DiT map's block
//! indices) drive one block's values of a group in place of the group's table.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::Group;
use crate::analysis::AttentionKind;

/// Broadcast settings of one attention kind.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSchedule {
    /// Compute every `period` steps inside the window (1 = never reuse).
    pub period: u32,
    /// Timestep window `(lo, hi)`, exclusive on both sides.
    pub window: [f64; 2],
}

/// MLP broadcast as PAB's Open-Sora/Latte configs describe it (VideoSys `mlp_*_skip_config`): at each
/// key timestep the MLPs of the listed blocks compute and are cached, then reused for the next `reuse`
/// steps. Block numbers count blocks of the same family (spatial blocks 0.., temporal blocks 0..).
/// Key timesteps that the sampler never visits are ignored, as in VideoSys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSchedule {
    pub timesteps: Vec<f64>,
    pub blocks: Vec<usize>,
    pub reuse: u32,
}

/// Compute (true) or reuse at each step for the MLPs of the listed blocks.
pub fn mlp_decisions(m: &MlpSchedule, timesteps: &[f64]) -> Vec<bool> {
    let mut compute = vec![true; timesteps.len()];
    for key in &m.timesteps {
        if let Some(j) = timesteps.iter().position(|t| (t - key).abs() < 1e-6) {
            for c in compute.iter_mut().skip(j + 1).take(m.reuse as usize) {
                *c = false;
            }
        }
    }
    compute
}

/// Options of the `broadcast-static` pass.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PabOptions {
    pub spatial: Option<KindSchedule>,
    pub temporal: Option<KindSchedule>,
    pub cross: Option<KindSchedule>,
    /// Full (joint) attention; uses the spatial settings when absent.
    pub full: Option<KindSchedule>,
    pub mlp: Option<MlpSchedule>,
    /// Explicit per-group tables, in place of a kind's `{ period, window }` (or of `mlp`).
    pub table: Option<ExplicitTables>,
}

/// Explicit decision tables: per group, one letter per sampling step, `C` (compute) or `R` (reuse the
/// value cached at the last computed step); the first step computes. `full` falls back to `spatial`
/// as the periodic settings do; `mlp` drives the MLP of every transformer block. `blocks`: per
/// transformer block (its DiT-map index as the key), tables of the same form for that block's values
/// alone, in place of the group's (a block table needs no group table).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitTables {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spatial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temporal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BTreeMap<String, ExplicitTables>>,
}

/// Per (block, group): the decision table of that block's values of the group.
pub type BlockTables = BTreeMap<(usize, Group), Vec<bool>>;

/// Block `block`'s table for values of `group` (`full` falling back to `spatial`).
pub fn block_table(tables: &BlockTables, block: usize, group: Group) -> Option<&Vec<bool>> {
    tables.get(&(block, group)).or_else(|| match group {
        Group::Full => tables.get(&(block, Group::Spatial)),
        _ => None,
    })
}

impl ExplicitTables {
    /// The table of `group`'s kind of values, `full` falling back to `spatial`.
    fn for_group(&self, group: Group) -> Option<(Group, &String)> {
        match (self.get(group), group) {
            (Some(t), _) => Some((group, t)),
            (None, Group::Full) => self.get(Group::Spatial).map(|t| (Group::Spatial, t)),
            _ => None,
        }
    }

    /// The per-block tables at `steps` steps (checked: letters, first step, length, block keys).
    pub fn block_tables(&self, steps: Option<usize>) -> Result<BlockTables> {
        let mut out = BTreeMap::new();
        for (key, tables) in self.blocks.iter().flatten() {
            let block: usize = key.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "broadcast-static.table.blocks.{key}: expected a transformer block's index (as `ditc inspect` lists them), e.g. blocks = {{ 3 = {{ cross = \"CRRC\" }} }}"
                )
            })?;
            if tables.blocks.is_some() {
                bail!("broadcast-static.table.blocks.{key}.blocks: block tables do not nest");
            }
            for (group, text) in tables.iter() {
                let what = format!("blocks.{key}.{}", group.as_str());
                out.insert((block, group), parse_table_named(&what, text, steps)?);
            }
            if tables.iter().next().is_none() {
                bail!("broadcast-static.table.blocks.{key} gives no table (expected spatial, temporal, cross, full or mlp)");
            }
        }
        Ok(out)
    }

    fn get(&self, group: Group) -> Option<&String> {
        match group {
            Group::Spatial => self.spatial.as_ref(),
            Group::Temporal => self.temporal.as_ref(),
            Group::Cross => self.cross.as_ref(),
            Group::Full => self.full.as_ref(),
            Group::Mlp => self.mlp.as_ref(),
            Group::Stack | Group::Blocks => None,
        }
    }

    /// The given tables, in group order.
    pub fn iter(&self) -> impl Iterator<Item = (Group, &String)> {
        [
            Group::Spatial,
            Group::Temporal,
            Group::Full,
            Group::Cross,
            Group::Mlp,
        ]
        .into_iter()
        .filter_map(|g| Some((g, self.get(g)?)))
    }

    /// One table from a decision list (`C` where true).
    pub fn pattern(decisions: &[bool]) -> String {
        decisions
            .iter()
            .map(|&c| if c { 'C' } else { 'R' })
            .collect()
    }
}

/// Parse `broadcast-static.table.<group>`: only `C` and `R`, starting with `C`; with `steps`, exactly
/// that many letters.
pub fn parse_table(group: Group, text: &str, steps: Option<usize>) -> Result<Vec<bool>> {
    parse_table_named(group.as_str(), text, steps)
}

/// [`parse_table`] of `broadcast-static.table.<what>`.
fn parse_table_named(what: &str, text: &str, steps: Option<usize>) -> Result<Vec<bool>> {
    let what = format!("broadcast-static.table.{what}");
    let mut out = Vec::with_capacity(text.len());
    for (i, c) in text.chars().enumerate() {
        match c {
            'C' => out.push(true),
            'R' => out.push(false),
            other => bail!(
                "{what}: '{other}' at step {i} (expected one letter per sampling step, C to compute or R to reuse, e.g. \"CCRCRC\")"
            ),
        }
    }
    if out.first() != Some(&true) {
        bail!(
            "{what} \"{text}\": the first step must compute (C): there is nothing cached to reuse before it"
        );
    }
    if let Some(steps) = steps.filter(|&s| s != out.len()) {
        bail!(
            "{what} has {} entries for a sampler of {steps} steps (one letter per step)",
            out.len()
        );
    }
    Ok(out)
}

impl PabOptions {
    /// Settings for a kind; `None` means the kind is never broadcast.
    pub fn for_kind(&self, kind: AttentionKind) -> Option<KindSchedule> {
        match kind {
            AttentionKind::Spatial => self.spatial,
            AttentionKind::Temporal => self.temporal,
            AttentionKind::Cross => self.cross,
            AttentionKind::Full => self.full.or(self.spatial),
        }
    }

    pub fn validate(&self) -> Result<()> {
        for kind in AttentionKind::ALL {
            let Some(s) = self.for_kind(kind) else {
                continue;
            };
            if s.period < 1 {
                bail!(
                    "broadcast-static.{}.period must be at least 1 (got {})",
                    kind.as_str(),
                    s.period
                );
            }
            let [lo, hi] = s.window;
            if lo.is_nan() || hi.is_nan() || lo >= hi {
                bail!(
                    "broadcast-static.{}.window [{lo}, {hi}] is inverted or empty",
                    kind.as_str()
                );
            }
        }
        if let Some(m) = &self.mlp {
            if m.blocks.is_empty() || m.timesteps.is_empty() {
                bail!("broadcast-static.mlp needs at least one block and one timestep");
            }
        }
        if let Some(t) = &self.table {
            for (group, text) in t.iter() {
                let periodic = match group {
                    Group::Spatial => self.spatial.is_some(),
                    Group::Temporal => self.temporal.is_some(),
                    Group::Cross => self.cross.is_some(),
                    Group::Full => self.full.is_some(),
                    _ => self.mlp.is_some(),
                };
                if periodic {
                    let g = group.as_str();
                    bail!(
                        "broadcast-static: both `{g}` and `table.{g}` are given; give one schedule per group"
                    );
                }
                parse_table(group, text, None)?;
            }
            t.block_tables(None)?;
        }
        Ok(())
    }

    /// The decision table of attention kind `kind` at `timesteps` (`None`: never broadcast); an
    /// explicit table's length is checked against the steps here.
    pub fn kind_table(&self, kind: AttentionKind, timesteps: &[f64]) -> Result<Option<Vec<bool>>> {
        let group = Group::from(kind);
        let explicit = self.table.as_ref().and_then(|t| t.for_group(group));
        match explicit {
            // `full` follows an explicit `spatial` table only when it has no periodic settings.
            Some((g, _)) if g != group && self.full.is_some() => {}
            Some((g, text)) => return parse_table(g, text, Some(timesteps.len())).map(Some),
            None => {}
        }
        Ok(self
            .for_kind(kind)
            .filter(|s| s.period > 1)
            .map(|s| decisions(&s, timesteps)))
    }
}

/// The compute decision of every step for one kind.
pub fn decisions(s: &KindSchedule, timesteps: &[f64]) -> Vec<bool> {
    let [lo, hi] = s.window;
    timesteps
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let in_window = lo < t && t < hi;
            i == 0 || s.period == 1 || !in_window || i % s.period as usize == 0
        })
        .collect()
}

/// Decision tables for every attention kind that is broadcast (period > 1, or an explicit table that
/// reuses at some step), and for the MLPs. Refused: an explicit table whose length is not the number
/// of steps.
pub fn tables(options: &PabOptions, timesteps: &[f64]) -> Result<BTreeMap<Group, Vec<bool>>> {
    let mut out = BTreeMap::new();
    for &k in &AttentionKind::ALL {
        // An explicit table that computes at every step is no broadcast (as period 1).
        if let Some(t) = options.kind_table(k, timesteps)? {
            if t.contains(&false) || options.for_kind(k).is_some_and(|s| s.period > 1) {
                out.insert(Group::from(k), t);
            }
        }
    }
    let mlp = match (
        &options.mlp,
        options.table.as_ref().and_then(|t| t.mlp.as_ref()),
    ) {
        (Some(m), _) => Some(mlp_decisions(m, timesteps)),
        (None, Some(text)) => Some(parse_table(Group::Mlp, text, Some(timesteps.len()))?),
        (None, None) => None,
    };
    if let Some(table) = mlp.filter(|t| t.contains(&false)) {
        out.insert(Group::Mlp, table);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_tables_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_table(Group::Spatial, "CRRC", Some(4)).unwrap(),
            [true, false, false, true]
        );
        for (text, steps, says) in [
            ("CRXC", Some(4), "'X' at step 2"),
            ("RCCC", Some(4), "the first step must compute"),
            ("CRC", Some(4), "has 3 entries for a sampler of 4 steps"),
            ("", None, "the first step must compute"),
        ] {
            let e = parse_table(Group::Cross, text, steps)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(says) && e.contains("broadcast-static.table.cross"),
                "{text}: {e}"
            );
        }
    }

    fn pattern(period: u32, window: [f64; 2]) -> String {
        let timesteps: Vec<f64> = (0..50).map(|i| 999.0 - 20.0 * i as f64).collect();
        decisions(&KindSchedule { period, window }, &timesteps)
            .iter()
            .map(|&c| if c { 'C' } else { 'R' })
            .collect()
    }

    #[test]
    fn worked_examples_from_the_reference() {
        assert_eq!(
            pattern(2, [100.0, 800.0]),
            "CCCCCCCCCCCRCRCRCRCRCRCRCRCRCRCRCRCRCRCRCRCRCCCCCC"
        );
        assert_eq!(
            pattern(3, [100.0, 800.0]),
            "CCCCCCCCCCRRCRRCRRCRRCRRCRRCRRCRRCRRCRRCRRCRRCCCCC"
        );
        assert_eq!(pattern(1, [100.0, 800.0]).matches('R').count(), 0);
    }

    #[test]
    fn mlp_reuse_follows_key_timesteps() {
        // Latte's config over 50 leading DDIM steps (980, 960, ..., 0): 720 is step 13.
        let timesteps: Vec<f64> = (0..50).map(|i| 980.0 - 20.0 * i as f64).collect();
        let m = MlpSchedule {
            timesteps: vec![720.0, 640.0, 555.0],
            blocks: vec![0],
            reuse: 2,
        };
        let d = mlp_decisions(&m, &timesteps);
        let reused: Vec<usize> = (0..50).filter(|&i| !d[i]).collect();
        assert_eq!(
            reused,
            vec![14, 15, 18, 19],
            "555 is never visited and is ignored"
        );
    }

    #[test]
    fn bad_options_are_rejected() {
        let bad = PabOptions {
            spatial: Some(KindSchedule {
                period: 0,
                window: [1.0, 2.0],
            }),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("period"));
        let inverted = PabOptions {
            cross: Some(KindSchedule {
                period: 2,
                window: [800.0, 100.0],
            }),
            ..Default::default()
        };
        assert!(inverted
            .validate()
            .unwrap_err()
            .to_string()
            .contains("inverted"));
        let full = PabOptions {
            spatial: Some(KindSchedule {
                period: 2,
                window: [1.0, 2.0],
            }),
            ..Default::default()
        };
        assert_eq!(full.for_kind(AttentionKind::Full).unwrap().period, 2);
    }
}
