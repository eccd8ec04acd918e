//! Running graphs on CPU: the verifier every claim is measured with.

pub mod conditional;
pub mod sampling;
mod tract;

pub use self::tract::{run_once, TractRunner};
pub use conditional::{Plan, StateSet};
pub use sampling::{sample, Bundle, RunReport};
