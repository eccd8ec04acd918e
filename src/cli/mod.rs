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

/// Input shapes for graphs built from diffusers checkpoints (ignored for .onnx files, which carry
/// their own shapes). All sizes are latent sizes: what the transformer sees after the VAE.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Shapes when MODEL is a diffusers checkpoint folder")]
pub struct ShapeArgs {
    /// Batch size [default: 1]; with --dynamic-batch, the largest batch of the TensorRT profile in the
    /// manifest's trtexec command [default: 2, as classifier-free guidance runs]
    #[arg(long)]
    pub batch: Option<i64>,
    /// Leave the batch axis symbolic ("batch"); the manifest's trtexec command then builds a profile
    /// for batches 1..=--batch
    #[arg(long)]
    pub dynamic_batch: bool,
    /// Latent frames [default: Latte: video_length; Wan: 21 (81 video frames); CogVideoX: 13]
    #[arg(long)]
    pub frames: Option<i64>,
    /// Latent height [default: sample_size; Wan: 60 (480 px); CogVideoX: sample_height]
    #[arg(long)]
    pub height: Option<i64>,
    /// Latent width [default: sample_size; Wan: 104 (832 px); CogVideoX: sample_width]
    #[arg(long)]
    pub width: Option<i64>,
    /// Text tokens of encoder_hidden_states [default: Latte/PixArt 120, Wan 512, CogVideoX max_text_seq_length]
    #[arg(long)]
    pub text_len: Option<i64>,
}

impl ShapeArgs {
    /// (min, opt, max) of a symbolic batch axis for TensorRT's optimisation profile.
    pub fn batch_range(&self) -> (i64, i64, i64) {
        let max = self.batch.unwrap_or(if self.dynamic_batch { 2 } else { 1 });
        (1, max, max)
    }

    pub fn options(&self) -> crate::build::BuildOptions {
        crate::build::BuildOptions {
            batch: self.batch,
            dynamic_batch: self.dynamic_batch,
            frames: self.frames,
            height: self.height,
            width: self.width,
            text_len: self.text_len,
        }
    }
}

/// Read a model given on the command line: an `.onnx` file, or a diffusers checkpoint folder whose
/// graph is built with the shapes in `shapes`.
pub fn read_model_arg(path: &Path, shapes: &ShapeArgs) -> Result<crate::ir::Model> {
    crate::build::read_model_or_checkpoint(path, &shapes.options())
}
