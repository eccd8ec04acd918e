//! Helpers shared by the benches (each bench is its own crate and includes this with `mod common;`):
//! command-line values, PASS/FAIL lines for bounds, running the ditc binary with its peak RSS, and
//! wan-small's shape flags.
#![allow(dead_code)]

use std::process::Command;

/// The value after `--name` on the bench's command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// `--reps N`, or `default`.
pub fn reps(default: usize) -> usize {
    arg("--reps").map_or(default, |s| s.parse().expect("--reps N"))
}

/// Print PASS or FAIL for one bound; returns whether it held.
pub fn check(pass: bool, bound: &str) -> bool {
    println!("{} {bound}", if pass { "PASS" } else { "FAIL" });
    pass
}

/// Run the ditc binary (it must succeed); returns its stdout, stderr and the peak RSS it reports
/// (`DITC_REPORT_PEAK_RSS`), e.g. "12345 kB".
pub fn ditc_with_peak_rss(args: &[&str]) -> (Vec<u8>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(args)
        .env("DITC_REPORT_PEAK_RSS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ditc {args:?}: {stderr}");
    let rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS: "))
        .unwrap_or("?")
        .to_string();
    (out.stdout, stderr, rss)
}

/// `VmHWM`'s "12345 kB" as a number (u64::MAX when unreadable, so a bound on it fails).
pub fn kilobytes(rss: &str) -> u64 {
    rss.trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(u64::MAX)
}

/// The `ditc convert` shape flags wan-small (examples/wan-small) is built at.
pub const WAN_SMALL_SHAPES: [&str; 8] = [
    "--frames",
    "8",
    "--height",
    "16",
    "--width",
    "16",
    "--text-len",
    "4",
];
