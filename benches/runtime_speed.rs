//! Per-call time of ditc's CPU runtime against onnxruntime, side by side on the same graphs.
//!
//! `cargo bench --profile dev --bench runtime_speed [-- --calls N --rounds R --threads 1,2
//! --models wan-small,latte-tiny --profile]`
//!
//! For each model (wan-small as the Wan builder writes it, 512 tokens; latte-tiny's demo graph) it
//! writes the graph and one set of inputs to a temporary folder, then measures at each thread count:
//! - ditc: the fixed cost (for wan-small's bundle: reading and verifying the manifest and its files,
//!   reading the graph; then tract's optimisation and planning, as `ditc run` does them once per
//!   bundle) and the median per-call time over N calls (default 30) of the runtime's plan;
//! - onnxruntime (CPU provider, `intra_op_num_threads` = the same count, sequential execution, full
//!   graph optimisation) on the same file and inputs, through `benches/ort_per_call.py`. It needs
//!   Python with `onnxruntime`, `numpy` and `safetensors` on the developer's machine (not a test
//!   dependency); without them only ditc's numbers are printed. The two alternate over R rounds
//!   (default 3) and the ratio reported is the median of the rounds' ratios, so that a change of
//!   machine load during the run hits both executors.
//!
//! Bounds (PASS/FAIL lines, exit status 1 on a miss): ditc's per-call time within 2.0x of
//! onnxruntime's at every thread count, and ditc's fixed cost on wan-small under 0.5 s.
//! `--profile` also prints where one ditc call spends its time, per tract operator (and, with
//! `--profile-nodes FILE`, writes every node's time per call to FILE).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ditc::ir::{DataType, Model, Tensor};
use ditc::runtime::{Bundle, TractRunner};

mod common;

struct Case {
    name: &'static str,
    /// The ONNX file both executors run.
    graph: PathBuf,
    /// What `ditc run` does before its first call, up to the graph: for a bundle, reading and
    /// verifying the manifest and its files (sizes, SHA-256) and reading the graph.
    open: Box<dyn Fn() -> Model>,
    inputs: Vec<Tensor>,
}

fn main() {
    let calls = common::arg("--calls").map_or(30, |s| s.parse().expect("--calls N"));
    let rounds = common::arg("--rounds").map_or(3, |s| s.parse().expect("--rounds N"));
    let threads: Vec<usize> = common::arg("--threads")
        .unwrap_or_else(|| "1,2".into())
        .split(',')
        .map(|s| s.parse().expect("--threads 1,2"))
        .collect();
    let profile = std::env::args().any(|a| a == "--profile");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = std::env::temp_dir().join(format!("ditc-runtime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let models = common::arg("--models").unwrap_or_else(|| "wan-small,latte-tiny".into());
    let mut cases = Vec::new();
    for name in models.split(',') {
        cases.push(match name {
            "wan-small" => wan_small(root, &tmp),
            "latte-tiny" => latte_tiny(root),
            other => panic!("--models: unknown model '{other}' (wan-small, latte-tiny)"),
        });
    }
    let ort = root.join("benches/ort_per_call.py");

    let mut ok = true;
    println!(
        "| model | threads | ditc fixed (s) | ditc per call (ms) | onnxruntime per call (ms) | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for case in &cases {
        let feeds = tmp.join(format!("{}-inputs.safetensors", case.name));
        ditc::tensors::write_safetensors(&feeds, &case.inputs).unwrap();
        for &n in &threads {
            ditc::runtime::set_threads(n).unwrap();
            let start = Instant::now();
            let model = (case.open)();
            let runner = TractRunner::new(&model, &case.inputs).unwrap();
            let fixed = start.elapsed().as_secs_f64();
            runner.run(&case.inputs).unwrap();
            // Rounds alternate the two executors so that a change of machine load hits both.
            let (mut ditc_ms, mut ort_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let mut times: Vec<f64> = (0..calls)
                    .map(|_| {
                        let t = Instant::now();
                        runner.run(&case.inputs).unwrap();
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                let d = median(&mut times) * 1e3;
                ditc_ms.push(d);
                if let Some(o) = onnxruntime_ms(&ort, &case.graph, &feeds, n, calls) {
                    ort_ms.push(o);
                    ratios.push(d / o);
                }
            }
            let ratio = (!ratios.is_empty()).then(|| median(&mut ratios));
            let ort = (!ort_ms.is_empty()).then(|| median(&mut ort_ms));
            println!(
                "| {} | {n} | {fixed:.3} | {:.2} | {} | {} |",
                case.name,
                median(&mut ditc_ms),
                ort.map_or("n/a".into(), |o| format!("{o:.2}")),
                ratio.map_or("n/a".into(), |r| format!("{r:.2}x")),
            );
            if let Some(r) = ratio {
                ok &= common::check(
                    r <= 2.0,
                    &format!(
                        "{} at {n} threads: ditc within 2.0x of onnxruntime",
                        case.name
                    ),
                );
            }
            if case.name == "wan-small" {
                ok &= common::check(
                    fixed < 0.5,
                    &format!("wan-small at {n} threads: fixed cost {fixed:.3} s under 0.5 s"),
                );
            }
            if profile {
                print_profile(&runner, &case.inputs, calls.min(10));
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
    if !ok {
        std::process::exit(1);
    }
}

/// wan-small as the Wan builder writes it (8x16x16 latent, 512 tokens, 4 caption tokens), as a
/// bundle with Wan's sampler and guidance (passes/wan-cfg.toml).
fn wan_small(root: &Path, tmp: &Path) -> Case {
    let out = tmp.join("wan-small");
    let ckpt = root.join("examples/wan-small/ckpt");
    let status = Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(["convert", ckpt.to_str().unwrap()])
        .args(common::WAN_SMALL_SHAPES)
        .arg("--recipe")
        .arg(root.join("passes/wan-cfg.toml"))
        .arg("-o")
        .arg(&out)
        .arg("--no-progress")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ditc convert wan-small failed");
    let graph = out.join("model.onnx");
    let model = ditc::onnx::read_model(&graph).unwrap();
    let inputs = example_inputs(&model, 500.0);
    let manifest = out.join("manifest.json");
    Case {
        name: "wan-small",
        graph,
        open: Box::new(move || Bundle::open(&manifest).unwrap().model),
        inputs,
    }
}

/// latte-tiny's demo graph as it is in `examples/`.
fn latte_tiny(root: &Path) -> Case {
    let graph = root.join("examples/latte-tiny/model.onnx");
    let model = ditc::onnx::read_model(&graph).unwrap();
    let inputs = example_inputs(&model, 500.0);
    let path = graph.clone();
    Case {
        name: "latte-tiny",
        graph,
        open: Box::new(move || ditc::onnx::read_model(&path).unwrap()),
        inputs,
    }
}

/// A tensor for every runtime input: deterministic pseudo-random floats, `timestep` for the
/// timestep, zeros for other integer inputs.
fn example_inputs(model: &Model, timestep: f64) -> Vec<Tensor> {
    let mut seed = 0x9e37_79b9_u32;
    model
        .graph
        .runtime_inputs()
        .map(|i| {
            let dims: Vec<i64> = i
                .shape()
                .unwrap()
                .iter()
                .map(|d| d.value().unwrap_or(1))
                .collect();
            let len: i64 = dims.iter().product();
            match (i.name.as_str(), i.dtype()) {
                ("timestep", Some(DataType::I64)) => {
                    Tensor::from_i64(&i.name, dims, &vec![timestep as i64; len as usize])
                }
                ("timestep", _) => {
                    Tensor::from_f32(&i.name, dims, &vec![timestep as f32; len as usize])
                }
                (_, Some(DataType::I64)) => Tensor::from_i64(&i.name, dims, &vec![0; len as usize]),
                _ => {
                    let values: Vec<f32> = (0..len)
                        .map(|_| {
                            seed ^= seed << 13;
                            seed ^= seed >> 17;
                            seed ^= seed << 5;
                            (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
                        })
                        .collect();
                    Tensor::from_f32(&i.name, dims, &values)
                }
            }
        })
        .collect()
}

/// onnxruntime's median per-call milliseconds, or None when Python or onnxruntime is missing.
fn onnxruntime_ms(
    script: &Path,
    graph: &Path,
    feeds: &Path,
    threads: usize,
    calls: usize,
) -> Option<f64> {
    let out = Command::new("python3")
        .arg(script)
        .arg(graph)
        .arg(feeds)
        .args([
            "--threads",
            &threads.to_string(),
            "--calls",
            &calls.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "onnxruntime not measured: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("?")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    json["per_call_ms"].as_f64()
}

fn print_profile(runner: &TractRunner, inputs: &[Tensor], reps: usize) {
    let rows = runner.profile(inputs, reps, false).unwrap();
    let total: f64 = rows.iter().map(|r| r.1).sum();
    println!(
        "  profile over {reps} calls ({:.2} ms per call):",
        total / reps as f64 * 1e3
    );
    for (op, seconds, n) in rows.iter().take(15) {
        println!(
            "    {op:<28} {:>7.2} ms/call {:>5.1}% ({} evals/call)",
            seconds / reps as f64 * 1e3,
            seconds / total * 100.0,
            n / reps
        );
    }
    let nodes = runner.profile(inputs, reps, true).unwrap();
    if let Some(path) = common::arg("--profile-nodes") {
        let text: String = nodes
            .iter()
            .map(|(n, s, _)| format!("{:.4}\t{n}\n", s / reps as f64 * 1e3))
            .collect();
        std::fs::write(path, text).unwrap();
    }
    println!("  slowest nodes:");
    let generic = nodes
        .iter()
        .filter(|n| n.0.starts_with("Mul ") || n.0.starts_with("Add "));
    for (node, seconds, _) in nodes.iter().take(8).chain(generic.take(4)) {
        println!("    {:>7.3} ms/call {node}", seconds / reps as f64 * 1e3);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
