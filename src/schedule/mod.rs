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
