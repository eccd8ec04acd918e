//! The deployment target of a bundle: the GPU generation and the TensorRT version (`--target`).
//!
//! The GPU decides W8A8's default number format: tensor cores run INT8 GEMMs on every generation, but
//! from Ada (compute capability 8.9) on they also run FP8 E4M3, and FP8 is the faster and more accurate
//! choice there (measured on an H100 at Wan's GEMM shapes: INT8 `torch._int_mm` 0.78-1.25x of BF16, FP8
//! `_scaled_mm` 1.48-1.86x; reference.md). So: INT8 before Ada, FP8 E4M3 from Ada on, unless the recipe
//! names a `format`. The TensorRT version decides which ONNX rules the lint applies.
//!
//! `--target` takes a GPU, a TensorRT version, or both separated by a comma (`hopper`, `trt11`,
//! `ampere,trt10`); what is not given keeps its default (`hopper`, `trt10`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::lint::Target as TensorRtVersion;

/// NVIDIA GPU generations with tensor cores that TensorRT 10 supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gpu {
    /// A100, A10, RTX 30xx: compute capability 8.0 / 8.6. No FP8.
    Ampere,
    /// L4, L40S, RTX 40xx: compute capability 8.9. FP8 tensor cores.
    Ada,
    /// H100, H200: compute capability 9.0.
    Hopper,
    /// B200, GB200, RTX 50xx: compute capability 10.0 / 12.0.
    Blackwell,
}

impl Gpu {
    pub const ALL: [Gpu; 4] = [Gpu::Ampere, Gpu::Ada, Gpu::Hopper, Gpu::Blackwell];

    pub fn name(self) -> &'static str {
        match self {
            Gpu::Ampere => "ampere",
            Gpu::Ada => "ada",
            Gpu::Hopper => "hopper",
            Gpu::Blackwell => "blackwell",
        }
    }

    /// The lowest compute capability of the generation.
    pub fn compute_capability(self) -> &'static str {
        match self {
            Gpu::Ampere => "8.0",
            Gpu::Ada => "8.9",
            Gpu::Hopper => "9.0",
            Gpu::Blackwell => "10.0",
        }
    }

    /// Whether its tensor cores run FP8 (E4M3) GEMMs.
    pub fn has_fp8(self) -> bool {
        !matches!(self, Gpu::Ampere)
    }

    /// W8A8's format when the recipe names none: `"int8"` or `"fp8"` (the recipe option's values).
    pub fn default_w8a8_format(self) -> &'static str {
        if self.has_fp8() {
            "fp8"
        } else {
            "int8"
        }
    }
}

/// What `--target` names: a GPU generation and a TensorRT version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployTarget {
    pub gpu: Gpu,
    pub tensorrt: TensorRtVersion,
}

impl Default for DeployTarget {
    fn default() -> Self {
        DeployTarget {
            gpu: Gpu::Hopper,
            tensorrt: TensorRtVersion::Trt10,
        }
    }
}

impl fmt::Display for DeployTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trt = match self.tensorrt {
            TensorRtVersion::Trt10 => "trt10",
            TensorRtVersion::Trt11 => "trt11",
        };
        write!(f, "{},{trt}", self.gpu.name())
    }
}

impl FromStr for DeployTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut target = DeployTarget::default();
        let (mut gpu_given, mut trt_given) = (false, false);
        for part in s.split(',').map(str::trim) {
            if let Some(gpu) = Gpu::ALL.iter().find(|g| g.name() == part) {
                if std::mem::replace(&mut gpu_given, true) {
                    return Err(format!("'{s}' names two GPUs"));
                }
                target.gpu = *gpu;
            } else if let Some(trt) = match part {
                "trt10" => Some(TensorRtVersion::Trt10),
                "trt11" => Some(TensorRtVersion::Trt11),
                _ => None,
            } {
                if std::mem::replace(&mut trt_given, true) {
                    return Err(format!("'{s}' names two TensorRT versions"));
                }
                target.tensorrt = trt;
            } else {
                return Err(format!(
                    "unknown target '{part}': expected a GPU (ampere, ada, hopper, blackwell), a TensorRT version (trt10, trt11), or both as 'hopper,trt10'"
                ));
            }
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpu_version_or_both() {
        let t: DeployTarget = "ampere".parse().unwrap();
        assert_eq!((t.gpu, t.tensorrt), (Gpu::Ampere, TensorRtVersion::Trt10));
        let t: DeployTarget = "trt11".parse().unwrap();
        assert_eq!((t.gpu, t.tensorrt), (Gpu::Hopper, TensorRtVersion::Trt11));
        let t: DeployTarget = "blackwell,trt11".parse().unwrap();
        assert_eq!(
            (t.gpu, t.tensorrt),
            (Gpu::Blackwell, TensorRtVersion::Trt11)
        );
        assert!("volta"
            .parse::<DeployTarget>()
            .unwrap_err()
            .contains("unknown target 'volta'"));
        assert!("ada,hopper".parse::<DeployTarget>().is_err());
    }

    #[test]
    fn fp8_from_ada_on() {
        let formats: Vec<&str> = Gpu::ALL.iter().map(|g| g.default_w8a8_format()).collect();
        assert_eq!(formats, ["int8", "fp8", "fp8", "fp8"]);
    }
}
