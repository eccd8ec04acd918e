//! Running graphs on CPU: the verifier every claim is measured with.

mod tract;

pub use self::tract::{run_once, TractRunner};
