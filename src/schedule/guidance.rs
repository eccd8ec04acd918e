//! Classifier-free guidance: two model calls per step, combined as diffusers' `WanPipeline` does.
//!
//! Per step the runtime calls the model on the conditional inputs (branch `cond`), then on the
//! unconditional ones (branch `uncond`: the conditional input replaced by zeros of its shape or by a
//! named tensor of the inputs file), both at the same timestep, and feeds the sampler
//! `u + scale * (c - u)`, each operation rounded to f32 as torch computes it on f32 tensors. Every
//! cached value has its own state per branch, so no branch ever reads the other's cache.

use std::fmt;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// `[sampler.guidance]` of a recipe, and `sampler.guidance` of a manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guidance {
    /// Guidance scale `g` of `u + g * (c - u)`.
    pub scale: f64,
    /// Where the unconditional branch's input comes from: `"zeros"` (zeros of the conditional input's
    /// shape and type) or the name of a tensor in the `--inputs` file (under the same `--prefix`).
    pub negative: String,
    /// The model input the negative replaces. In a recipe it may be left out: the model's
    /// `encoder_hidden_states`, or its only condition input. The manifest always names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

/// The value the recipe's `negative` takes for zeros.
pub const ZEROS: &str = "zeros";

/// One of the model calls of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Branch {
    Cond,
    Uncond,
}

impl Branch {
    pub fn as_str(self) -> &'static str {
        match self {
            Branch::Cond => "cond",
            Branch::Uncond => "uncond",
        }
    }

    /// The value of a graph's `ditc.branch` input for this branch.
    pub fn index(self) -> i64 {
        match self {
            Branch::Cond => 0,
            Branch::Uncond => 1,
        }
    }
}

impl fmt::Display for Branch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The branches run per step: `cond` alone without guidance, `cond` then `uncond` with it.
pub fn branches(guidance: Option<&Guidance>) -> &'static [Branch] {
    match guidance {
        Some(_) => &[Branch::Cond, Branch::Uncond],
        None => &[Branch::Cond],
    }
}

impl Guidance {
    pub fn validate(&self) -> Result<()> {
        if !self.scale.is_finite() {
            bail!(
                "sampler.guidance.scale = {}: must be a finite number",
                self.scale
            );
        }
        if self.negative.trim().is_empty() {
            bail!("sampler.guidance.negative is empty: give \"zeros\" or the name of a tensor of the inputs file");
        }
        if self.input.as_deref().is_some_and(|i| i.trim().is_empty()) {
            bail!("sampler.guidance.input is empty: name the model input the negative replaces");
        }
        Ok(())
    }

    /// The input the negative replaces, chosen among the model's condition inputs (its runtime
    /// inputs other than latent, timestep, step and state): the one named in the recipe, else
    /// `encoder_hidden_states`, else the only one.
    pub fn resolve_input(&self, candidates: &[String]) -> Result<String> {
        if let Some(name) = &self.input {
            if !candidates.contains(name) {
                bail!("sampler.guidance.input = '{name}' is not a condition input of the model (it has: {candidates:?})");
            }
            return Ok(name.clone());
        }
        if candidates.iter().any(|c| c == "encoder_hidden_states") {
            return Ok("encoder_hidden_states".into());
        }
        match candidates {
            [only] => Ok(only.clone()),
            [] => bail!("classifier-free guidance needs a condition input to replace, and the model has none besides the latent and the timestep"),
            _ => bail!("the model has several condition inputs ({candidates:?}): name the one the negative replaces with sampler.guidance.input"),
        }
    }
}

/// `u + scale * (c - u)` elementwise in f32, each operation rounded as torch rounds it on f32 tensors
/// (the Python float scale becomes an f32 scalar; no fused multiply-add).
pub fn combine(scale: f64, cond: &[f32], uncond: &[f32]) -> Vec<f32> {
    let g = scale as f32;
    cond.iter()
        .zip(uncond)
        .map(|(&c, &u)| {
            let difference = c - u;
            let scaled = g * difference;
            u + scaled
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guidance(negative: &str, input: Option<&str>) -> Guidance {
        Guidance {
            scale: 5.0,
            negative: negative.into(),
            input: input.map(str::to_string),
        }
    }

    /// The f32 order of `u + g * (c - u)`: with c = 1 + 2^-23 and u = 1 (both exact), c - u = 2^-23
    /// exactly, times 3.1 then plus 1 rounds to 1 + 3 * 2^-23; the algebraically equal
    /// `g * c + (1 - g) * u` in f32 gives 1 + 4 * 2^-23.
    #[test]
    fn combination_rounds_like_torch() {
        let (c, u) = (1.0f32 + f32::EPSILON, 1.0f32);
        let got = combine(3.1, &[c], &[u])[0];
        assert_eq!(got, 1.0 + 3.0 * f32::EPSILON);
        let g = 3.1f32;
        assert_ne!(got, g * c + (1.0 - g) * u);
        // Scale 1: u + (c - u), equal to c here (c - u is exact).
        assert_eq!(combine(1.0, &[c], &[u])[0], c);
    }

    #[test]
    fn the_replaced_input_is_found_or_refused() {
        let text = vec!["encoder_hidden_states".to_string(), "mask".to_string()];
        assert_eq!(
            guidance("zeros", None).resolve_input(&text).unwrap(),
            "encoder_hidden_states"
        );
        assert_eq!(
            guidance("zeros", Some("mask"))
                .resolve_input(&text)
                .unwrap(),
            "mask"
        );
        assert!(guidance("zeros", Some("nope"))
            .resolve_input(&text)
            .unwrap_err()
            .to_string()
            .contains("not a condition input"));
        let two = vec!["a".to_string(), "b".to_string()];
        assert!(guidance("zeros", None)
            .resolve_input(&two)
            .unwrap_err()
            .to_string()
            .contains("several"));
        assert_eq!(
            guidance("zeros", None)
                .resolve_input(&["y".to_string()])
                .unwrap(),
            "y"
        );
        assert!(guidance("zeros", None).resolve_input(&[]).is_err());
        for bad in [f64::NAN, f64::INFINITY] {
            let g = Guidance {
                scale: bad,
                ..guidance("zeros", None)
            };
            assert!(g.validate().is_err());
        }
        assert!(guidance(" ", None).validate().is_err());
        assert!(guidance("zeros", None).validate().is_ok());
    }
}
