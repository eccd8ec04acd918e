//! Running graphs on CPU: the verifier every claim is measured with.

pub mod conditional;
mod fused_elementwise;
mod narrow_slice;
mod rewrite;
pub mod sampling;
mod short_softmax;
mod small_kernels;
mod tiled_matmul;
mod tract;

pub use self::tract::{default_threads, run_once, set_threads, TractRunner};
pub use conditional::{Plan, StateSet};
pub use sampling::{sample, Bundle, RunReport};
