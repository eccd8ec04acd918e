//! `CogVideoXTransformer3DModel`: not built yet.

use anyhow::{bail, Result};

use super::graph_builder::GraphBuilder;
use super::{BuildOptions, Family};

pub struct CogVideoX;

impl Family for CogVideoX {
    const CLASS: &'static str = "CogVideoXTransformer3DModel";

    fn build(
        _config: &serde_json::Value,
        _opts: &BuildOptions,
        _b: &mut GraphBuilder,
    ) -> Result<()> {
        bail!("the CogVideoX graph builder is not implemented yet")
    }
}
