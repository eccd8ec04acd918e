//! Pass `broadcast-adaptive`: a cache whose decisions the graph computes at run time, chosen by
//! `policy`. Policies: `first-block-cache` ([`crate::schedule::first_block_cache`]).

use anyhow::{bail, Context, Result};

use super::{Pass, PassContext};
use crate::ir::Model;
use crate::schedule::first_block_cache::{self, FbcOptions};

pub enum BroadcastAdaptive {
    FirstBlockCache(FbcOptions),
}

impl BroadcastAdaptive {
    /// `policy` picks the policy; the other keys are its options.
    pub fn from_options(options: &toml::Table) -> Result<Self> {
        let mut options = options.clone();
        let policy = options
            .remove("policy")
            .context("broadcast-adaptive needs a `policy` (first-block-cache)")?;
        match policy.as_str() {
            Some(first_block_cache::POLICY) => Ok(BroadcastAdaptive::FirstBlockCache(
                FbcOptions::from_table(&options)?,
            )),
            _ => bail!("broadcast-adaptive: unknown policy {policy} (known: first-block-cache)"),
        }
    }
}

impl Pass for BroadcastAdaptive {
    fn name(&self) -> &'static str {
        "broadcast-adaptive"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<()> {
        match self {
            BroadcastAdaptive::FirstBlockCache(o) => first_block_cache::bake(model, cx, o),
        }
    }
}
