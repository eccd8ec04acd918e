//! Progress bars on stderr for long work (hidden when stderr is not a terminal or when disabled).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting bytes, with throughput.
pub fn bytes_bar(total: u64, message: &str, enabled: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), draw_target(enabled));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A bar counting steps.
pub fn steps_bar(total: u64, message: &str, enabled: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), draw_target(enabled));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn draw_target(enabled: bool) -> ProgressDrawTarget {
    if enabled {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}
