//! The `ditc` command line: one file per subcommand.

pub mod calibrate;
pub mod convert;
pub mod inspect;
pub mod lint;
pub mod run;
pub mod verify;

use std::path::Path;

use anyhow::{bail, Result};

use crate::ir::Tensor;
use crate::tensors::read_safetensors;

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
