//! Schedules: samplers (timesteps and updates) and the policies that decide, per step, what to compute.

pub mod ada_cache;
pub mod easy_cache;
pub mod emitter;
pub mod first_block_cache;
pub mod forecast;
pub mod guidance;
pub mod mag_cache;
pub mod pab;
pub mod sampler;
pub mod specialize;
pub mod split;
pub mod tea_cache;

pub use sampler::{Sampler, SamplerConfig};

use serde::{Deserialize, Serialize};

use crate::analysis::AttentionKind;

/// What one decision table drives: the attention sites of one kind, the MLPs of chosen blocks, or the
/// whole stack of transformer blocks (step caches such as MagCache); or, for caches decided inside the
/// graph, the cached transformer blocks (`blocks`: first-block-cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Spatial,
    Temporal,
    Full,
    Cross,
    Mlp,
    Stack,
    Blocks,
}

impl Group {
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Spatial => "spatial",
            Group::Temporal => "temporal",
            Group::Full => "full",
            Group::Cross => "cross",
            Group::Mlp => "mlp",
            Group::Stack => "stack",
            Group::Blocks => "blocks",
        }
    }
}

impl From<AttentionKind> for Group {
    fn from(k: AttentionKind) -> Group {
        match k {
            AttentionKind::Spatial => Group::Spatial,
            AttentionKind::Temporal => Group::Temporal,
            AttentionKind::Full => Group::Full,
            AttentionKind::Cross => Group::Cross,
        }
    }
}

/// What one `If` of a baked schedule is decided by: its group's table (`block: None`), or the table
/// of its group in one transformer block (per-block tables, `broadcast-static`'s `table.blocks`).
/// Written `cross` or `cross.block3` (the DiT map's block index) in traces and condition names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Decider {
    pub group: Group,
    pub block: Option<usize>,
}

impl Decider {
    /// The table of `group` in `block`.
    pub fn in_block(group: Group, block: usize) -> Decider {
        Decider {
            group,
            block: Some(block),
        }
    }

    pub fn name(&self) -> String {
        match self.block {
            None => self.group.as_str().to_string(),
            Some(b) => format!("{}.block{b}", self.group.as_str()),
        }
    }
}

impl From<Group> for Decider {
    fn from(group: Group) -> Decider {
        Decider { group, block: None }
    }
}

impl std::fmt::Display for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for Decider {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Decider> {
        let (group, block) = match s.split_once(".block") {
            Some((g, b)) => (g, Some(b.parse::<usize>()?)),
            None => (s, None),
        };
        let group: Group = serde_json::from_value(serde_json::Value::String(group.into()))?;
        Ok(Decider { group, block })
    }
}

impl Serialize for Decider {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Decider {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Decider, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e| {
            serde::de::Error::custom(format!(
                "'{text}' is not a table name (e.g. cross, cross.block3): {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decider_names_round_trip() {
        for d in [
            Decider::from(Group::Cross),
            Decider::in_block(Group::Mlp, 12),
        ] {
            assert_eq!(d.name().parse::<Decider>().unwrap(), d);
        }
        assert_eq!(Decider::in_block(Group::Full, 3).name(), "full.block3");
        assert!("cross.blockx".parse::<Decider>().is_err());
        assert!("nothing".parse::<Decider>().is_err());
    }
}
