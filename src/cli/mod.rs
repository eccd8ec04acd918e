//! The `ditc` command line: one file per subcommand.

pub mod calibrate;
pub mod convert;
pub mod inspect;
pub mod lint;
pub mod run;
pub mod tune;
pub mod verify;

use std::path::Path;

use anyhow::{bail, Result};

use crate::ir::Tensor;
use crate::tensors::read_safetensors;

/// `--threads`, shared by the commands that run models on the CPU runtime.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Threads {
    /// Threads for the CPU runtime's kernels (matrix products, element-wise and row-wise ops).
    /// Default: the cores this process may use. The results do not depend on it: work is split
    /// on output tiles and rows, never inside a sum.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl Threads {
    /// Start the runtime's threads (or run on the calling thread for 1).
    pub fn apply(&self) -> Result<()> {
        crate::runtime::set_threads(self.threads.unwrap_or_else(crate::runtime::default_threads))
    }
}

/// Load the tensors of a safetensors file, optionally selecting those named `PREFIX<name>` and
/// stripping the prefix (fixtures store several cases as `0.hidden_states`, `1.hidden_states`, ...).
pub fn load_inputs(path: &Path, prefix: Option<&str>) -> Result<Vec<Tensor>> {
    let all = read_safetensors(path)?;
    let Some(prefix) = prefix else { return Ok(all) };
    let selected = select_prefixed(&all, prefix);
    if selected.is_empty() {
        bail!("'{}' has no tensor named '{prefix}...'", path.display());
    }
    Ok(selected)
}

/// The tensors named `PREFIX<name>`, renamed `<name>`.
pub fn select_prefixed(all: &[Tensor], prefix: &str) -> Vec<Tensor> {
    all.iter()
        .filter_map(|t| {
            let name = t.name.strip_prefix(prefix)?.to_string();
            Some(Tensor { name, ..t.clone() })
        })
        .collect()
}
