//! Schedules: samplers (timesteps and updates) and the policies that decide, per step, what to compute.

pub mod pab;
pub mod sampler;
pub mod specialize;

pub use sampler::{Sampler, SamplerConfig};
