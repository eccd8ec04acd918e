//! Static attention broadcast end to end on the trained latte-tiny (the demo copy in `examples/`): the
//! runtime's DDIM trajectories against diffusers' (full and with diffusers' PyramidAttentionBroadcast),
//! decision by decision; and MLP broadcast, which diffusers lacks, on a one-block graph against the
//! same sampling loop computed by hand. README command 2 (the Latte PAB preset) runs as the README
//! writes it, its fidelity and FLOPs saved checked against the README's Measured row.

mod common;

use std::path::Path;

use common::{demo, ditc_ok};
use ditc::cli::run::{sample_bundle, Args};
use ditc::metrics::compare;
use ditc::schedule::guidance::Branch;
use ditc::tensors::read_safetensors;

/// passes/pab.toml's sampler with a bare broadcast-static pass (no preset: the test sets every kind).
fn bare_recipe(dir: &Path) -> std::path::PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("passes/pab.toml"))
            .unwrap();
    let sampler = &text[..text.find("[[passes]]").unwrap()];
    let path = dir.join("bare.toml");
    std::fs::write(
        &path,
        format!("{sampler}[[passes]]\nname = \"broadcast-static\"\n"),
    )
    .unwrap();
    path
}

/// Convert the demo model (latte-tiny) with the bare recipe and `--set` overrides.
fn convert(out: &Path, sets: &[String]) {
    let model = demo().join("model.onnx");
    let recipe = bare_recipe(out.parent().unwrap());
    let mut args = vec![
        "convert",
        model.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    ditc_ok(&args);
}

fn run(manifest: &Path, inputs: &Path, case: usize) -> (Vec<f32>, ditc::cli::run::Report) {
    let args = Args {
        model: manifest.to_path_buf(),
        inputs: inputs.to_path_buf(),
        prefix: Some(format!("{case}.")),
        output: manifest.with_file_name("unused.safetensors"),
        compare_full: false,
        json: true,
        trace: None,
        plot: None,
        no_progress: true,
        no_verify: false,
        shapes: Default::default(),
        threads: Default::default(),
    };
    let (latent, report) = sample_bundle(&args).unwrap();
    (latent.to_f32_vec().unwrap(), report)
}

fn kind_setting(period: u64, window: &serde_json::Value) -> String {
    format!(
        "{{ period = {period}, window = [{}, {}] }}",
        window[0], window[1]
    )
}

/// diffusers module name of a site, from the TorchScript export's node names (test-side mapping only).
fn module_name(anchor: &str) -> String {
    anchor
        .trim_start_matches("/m/")
        .trim_end_matches("/Softmax")
        .replace('/', ".")
}

#[test]
fn ddim_trajectories_match_diffusers_full_and_pab() {
    let dir = demo();
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sampling.json")).unwrap()).unwrap();
    let inputs = dir.join("sampling.safetensors");
    let reference = read_safetensors(&inputs).unwrap();
    let final_of = |case: usize, config: &str| {
        reference
            .iter()
            .find(|t| t.name == format!("{case}.{config}.final"))
            .unwrap()
            .to_f32_vec()
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();

    // No broadcast: every period 1.
    let full = tmp.path().join("full");
    let ones: Vec<String> = ["spatial", "temporal", "cross"]
        .iter()
        .map(|k| format!("broadcast-static.{k}={{ period = 1, window = [100, 800] }}"))
        .collect();
    convert(&full, &ones);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("manifest.json")).unwrap()).unwrap();
    let timesteps: Vec<f64> = manifest["sampler"]["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let want: Vec<f64> = sampling["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(timesteps, want, "DDIM leading timesteps");
    assert!(
        manifest["state"].as_array().unwrap().is_empty(),
        "period 1 bakes nothing"
    );
    for case in 0..3 {
        let (latent, _) = run(&full.join("manifest.json"), &inputs, case);
        let f = compare(&latent, &final_of(case, "full"));
        eprintln!("case {case} full: rel L2 {:.2e}", f.rel_l2);
        assert!(
            f.rel_l2 <= 1e-4,
            "case {case}: full trajectory rel L2 {}",
            f.rel_l2
        );
    }

    for (config, c) in sampling["configs"].as_object().unwrap() {
        let out = tmp.path().join(config);
        let sets: Vec<String> = ["spatial", "temporal", "cross"]
            .iter()
            .map(|k| {
                format!(
                    "broadcast-static.{k}={}",
                    kind_setting(c[*k].as_u64().unwrap(), &c["window"])
                )
            })
            .collect();
        convert(&out, &sets);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        let anchors: Vec<String> = manifest["dit_map"]["attention"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["anchor"].as_str().unwrap().to_string())
            .collect();
        for case in 0..3 {
            let (latent, report) = run(&out.join("manifest.json"), &inputs, case);
            let cond = &report.scheduled.branches[&Branch::Cond];
            for (id, executed) in &cond.decisions {
                let module = module_name(&anchors[*id]);
                let expected: Vec<bool> = sampling["decisions"][config][&module]
                    .as_array()
                    .unwrap_or_else(|| panic!("no diffusers decisions for {module}"))
                    .iter()
                    .map(|b| b.as_bool().unwrap())
                    .collect();
                assert_eq!(
                    executed, &expected,
                    "{config} case {case}: decisions of {module}"
                );
            }
            assert_eq!(cond.decisions.len(), 12);
            let reference = final_of(case, config);
            let f = compare(&latent, &reference);
            let moved = compare(&final_of(case, "full"), &reference).rel_l2;
            eprintln!("{config} case {case}: rel L2 {:.2e} vs diffusers PAB (PAB itself moves the latent {:.1}%)", f.rel_l2, 100.0 * moved);
            assert!(
                f.rel_l2 <= 1e-3,
                "{config} case {case}: rel L2 {}",
                f.rel_l2
            );
            // The bound means something only if PAB moves the latent much further than it.
            assert!(
                moved >= 1e-2,
                "{config} case {case}: PAB moves the latent only {moved}"
            );
        }
    }
}

/// README command 2 exactly as README.md writes it (its `cargo run -q --` invocations of ditc, with
/// `out/` moved into `tmp`), the run given `--json`. Returns the run's report.
fn run_readme_command_2(tmp: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run -q -- convert examples/latte-tiny/model.onnx"))
        .expect("README command 2 (convert of the demo model) is in README.md");
    let mut stdout = Vec::new();
    for (i, command) in line.split(" && ").enumerate() {
        let args = command
            .strip_prefix("cargo run -q -- ")
            .unwrap_or_else(|| panic!("README command 2 part {i} is not a ditc run: {command}"));
        let mut args: Vec<String> = args
            .split_whitespace()
            .map(|a| match a.strip_prefix("out/") {
                Some(rest) => tmp.join(rest).to_str().unwrap().to_string(),
                None => a.to_string(),
            })
            .collect();
        if args[0] == "run" {
            args.push("--json".into());
        }
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_ditc"))
            .args(&args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "ditc {args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        stdout = r.stdout;
    }
    serde_json::from_slice(&stdout).expect("the run's --json report")
}

/// Calls that compute under PAB's rule (diffusers' PyramidAttentionBroadcast): a site computes at
/// step i unless lo < t_i < hi and i is not a multiple of the period.
fn pab_computes(timesteps: &[i64], period: usize, (lo, hi): (i64, i64)) -> Vec<bool> {
    timesteps
        .iter()
        .enumerate()
        .map(|(i, &t)| !(lo < t && t < hi) || i % period == 0)
        .collect()
}

/// README command 2 (Latte's PAB preset, schedules/pab/latte.toml: spatial 2, temporal 3, cross 6 in
/// (100, 800), MLP reused for 2 steps after 720, 640, 560, 480, 400) on case 0 of the demo model:
/// fidelity against the full computation within the README row's bounds; calls per kind as PAB's rule
/// gives over diffusers' recorded timesteps; FLOPs saved equal to the closed form from latte-tiny's
/// config, and the percentages the README row states.
#[test]
fn readme_command_2_latte_pab_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let report = run_readme_command_2(tmp.path());
    let f = &report["fidelity"];
    let (psnr, cosine, rel_l2) = (
        f["psnr_db"].as_f64().unwrap(),
        f["cosine"].as_f64().unwrap(),
        f["rel_l2"].as_f64().unwrap(),
    );
    eprintln!(
        "README command 2: PSNR {psnr:.2} dB, cosine {cosine:.5}, rel-L2 {rel_l2:.2e} vs full"
    );
    assert!(
        psnr >= 50.0 && cosine >= 0.997 && rel_l2 <= 0.08,
        "fidelity {f} (bounds PSNR >= 50, cosine >= 0.997, rel-L2 <= 0.08)"
    );
    assert!(rel_l2 > 1e-3, "PAB changed nothing: {f}");

    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(demo().join("sampling.json")).unwrap()).unwrap();
    let timesteps: Vec<i64> = sampling["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(timesteps.len(), 50);
    let computed = |c: &[bool]| c.iter().filter(|&&b| b).count();
    let window = (100, 800);
    let sites_per_kind = 4;
    let cross_computes = pab_computes(&timesteps, 6, window);
    let mut mlp_computes = vec![true; 50];
    for key in [720, 640, 560, 480, 400] {
        let j = timesteps.iter().position(|&t| t == key).unwrap();
        mlp_computes[j + 1..=j + 2].fill(false);
    }
    // (kind, calls that compute over 50 steps, sites or MLPs of that kind).
    let expected = [
        (
            "spatial",
            computed(&pab_computes(&timesteps, 2, window)),
            sites_per_kind,
        ),
        (
            "temporal",
            computed(&pab_computes(&timesteps, 3, window)),
            sites_per_kind,
        ),
        ("cross", computed(&cross_computes), sites_per_kind),
        ("mlp", computed(&mlp_computes), 8), // spatial and temporal blocks 0-3
    ];
    let calls = &report["scheduled"]["calls"];
    for (kind, per_site, sites) in expected {
        let (c, s) = (
            calls[kind]["computed"].as_u64().unwrap() as usize,
            calls[kind]["skipped"].as_u64().unwrap() as usize,
        );
        eprintln!("{kind}: {c} of {} calls computed", c + s);
        assert_eq!((c, c + s), (per_site * sites, 50 * sites), "{kind} calls");
    }

    // Closed-form FLOPs (2 per multiply-add) from examples/latte-tiny/ckpt/config.json: 8 frames of
    // 8 x 8 patches, width 64 (4 heads x 16), 4 caption tokens projected 32 -> 64 -> 64, FFN 64 -> 256.
    let (frames, patches, dim, text) = (8u64, 64u64, 64u64, 4u64);
    let tokens = frames * patches;
    let linear = |rows: u64, i: u64, o: u64| 2 * rows * i * o;
    let qk_pv = |batch: u64, q: u64, k: u64| 2 * 2 * batch * q * k * dim;
    let spatial = 4 * linear(tokens, dim, dim) + qk_pv(frames, patches, patches);
    let temporal = 4 * linear(tokens, dim, dim) + qk_pv(patches, frames, frames);
    // Q and out over the video tokens, K and V over the caption repeated per frame.
    let cross = 2 * linear(tokens, dim, dim)
        + 2 * linear(frames * text, dim, dim)
        + qk_pv(frames, patches, text);
    let mlp = linear(tokens, dim, 4 * dim) + linear(tokens, 4 * dim, dim);
    // The caption projection serves only cross-attention: it is skipped on the steps all four skip.
    let caption = linear(text, 32, dim) + linear(text, dim, dim);
    let skipped = |kind: &str| calls[kind]["skipped"].as_u64().unwrap();
    let attention_full = 50 * sites_per_kind as u64 * (spatial + temporal + cross);
    let attention_saved =
        skipped("spatial") * spatial + skipped("temporal") * temporal + skipped("cross") * cross;
    let cross_skipped_steps = (50 - computed(&cross_computes)) as u64;
    let model_saved = attention_saved + skipped("mlp") * mlp + cross_skipped_steps * caption;
    let s = &report["scheduled"];
    let field = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(field("attention_flops_full"), attention_full);
    assert_eq!(
        field("attention_flops_full") - field("attention_flops"),
        attention_saved
    );
    assert_eq!(
        field("model_flops_full") - field("model_flops"),
        model_saved
    );
    let attention_pct = 100.0 * attention_saved as f64 / attention_full as f64;
    let model_pct = 100.0 * model_saved as f64 / field("model_flops_full") as f64;
    eprintln!("FLOPs saved: attention {attention_pct:.2}%, model {model_pct:.2}%");
    assert!(
        (attention_pct - 42.0).abs() <= 0.5 && (model_pct - 29.5).abs() <= 0.5,
        "FLOPs saved: attention {attention_pct}% (README: 42.0), model {model_pct}% (README: 29.5)"
    );
}

/// MLP broadcast (PAB's Latte config): at each key timestep the listed blocks' MLPs compute, then
/// are reused for the next `reuse` steps. diffusers has no MLP broadcast, so the reference here is the
/// rule itself, written out over the recorded timesteps, plus the full trajectory for the forced run.
#[test]
fn mlp_broadcast_reuses_after_key_timesteps() {
    let dir = demo();
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sampling.json")).unwrap()).unwrap();
    let timesteps: Vec<i64> = sampling["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    let inputs = dir.join("sampling.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlp");
    convert(&out, &["broadcast-static.mlp={ timesteps = [720, 640, 560, 480, 400], blocks = [0, 1], reuse = 2 }".to_string()]);
    let mut expected = vec![true; 50];
    for key in [720, 640, 560, 480, 400] {
        let j = timesteps.iter().position(|&t| t == key).unwrap();
        expected[j + 1] = false;
        expected[j + 2] = false;
    }
    let args = Args {
        model: out.join("manifest.json"),
        inputs: inputs.clone(),
        prefix: Some("0.".into()),
        output: out.join("unused.safetensors"),
        compare_full: true,
        json: true,
        trace: None,
        plot: None,
        no_progress: true,
        no_verify: false,
        shapes: Default::default(),
        threads: Default::default(),
    };
    let (latent, report) = sample_bundle(&args).unwrap();
    // Spatial and temporal blocks 0 and 1: four MLPs.
    let cond = &report.scheduled.branches[&Branch::Cond];
    assert_eq!(cond.mlp_decisions.len(), 4);
    for d in cond.mlp_decisions.values() {
        assert_eq!(d, &expected);
    }
    let full_ref = read_safetensors(&inputs)
        .unwrap()
        .into_iter()
        .find(|t| t.name == "0.full.final")
        .unwrap();
    let full_ref = full_ref.to_f32_vec().unwrap();
    let moved = compare(&latent.to_f32_vec().unwrap(), &full_ref).rel_l2;
    assert!(
        moved > 1e-4,
        "reusing MLP outputs must change the result (moved {moved})"
    );
    let fidelity = report.fidelity.unwrap();
    assert!(
        (fidelity.rel_l2 - moved).abs() < 1e-5,
        "--compare-full runs the full computation"
    );
}

// --- MLP broadcast against a sampling loop computed by hand ------------------------------------------

/// A one-block DiT small enough to compute by hand: latent [1, C, 2, 2] -> 4 tokens of C channels,
/// plus sin(t * freqs); softmax self-attention (2 heads) with residual; FFN (tanh) with residual;
/// back to [1, C, 2, 2]. Weights are f32 (as in the graph), used in f64 by the hand loop.
struct TinyDit {
    freqs: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    bo: Vec<f32>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

const C: usize = 8;
const TOKENS: usize = 4;
const HEADS: usize = 2;
const HIDDEN: usize = 2 * C;

/// Deterministic values in [-scale/2, scale/2) (xorshift).
fn pseudo_random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            scale * ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect()
}

impl TinyDit {
    fn new() -> TinyDit {
        let w = |seed, n| pseudo_random(seed, n, 1.0);
        TinyDit {
            freqs: (0..C).map(|c| 0.001 * (c + 1) as f32).collect(),
            wq: w(1, C * C),
            wk: w(2, C * C),
            wv: w(3, C * C),
            wo: w(4, C * C),
            bo: w(5, C),
            w1: w(6, C * HIDDEN),
            b1: w(7, HIDDEN),
            w2: w(8, HIDDEN * C),
            b2: w(9, C),
        }
    }

    /// The graph: inputs `latent` [1, C, 2, 2] and `t` [1] (f32), output `sample`.
    fn graph(&self) -> ditc::ir::Model {
        use ditc::ir::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
        let dims = |v: &[i64]| v.iter().map(|&d| Dim::Value(d)).collect();
        let c = C as i64;
        let mut g = Graph {
            name: "tiny-dit".into(),
            inputs: vec![
                ValueInfo::tensor("latent", DataType::F32, dims(&[1, c, 2, 2])),
                ValueInfo::tensor("t", DataType::F32, dims(&[1])),
            ],
            outputs: vec![ValueInfo::tensor(
                "sample",
                DataType::F32,
                dims(&[1, c, 2, 2]),
            )],
            ..Graph::default()
        };
        let mut init = |name: &str, d: Vec<i64>, v: &[f32]| {
            g.initializers.push(Tensor::from_f32(name, d, v));
        };
        init("freqs", vec![c], &self.freqs);
        for (name, v) in [
            ("wq", &self.wq),
            ("wk", &self.wk),
            ("wv", &self.wv),
            ("wo", &self.wo),
        ] {
            init(name, vec![c, c], v);
        }
        init("bo", vec![c], &self.bo);
        init("w1", vec![c, HIDDEN as i64], &self.w1);
        init("b1", vec![HIDDEN as i64], &self.b1);
        init("w2", vec![HIDDEN as i64, c], &self.w2);
        init("b2", vec![c], &self.b2);
        init("scale", vec![], &[0.5]); // 1 / sqrt(head dim 4)
        let d = (C / HEADS) as i64;
        for (name, shape) in [
            ("tokens_shape", vec![1, 4, c]),
            ("heads_shape", vec![1, 4, HEADS as i64, d]),
            ("grid_shape", vec![1, 2, 2, c]),
        ] {
            let n = shape.len() as i64;
            g.initializers.push(Tensor::from_i64(name, vec![n], &shape));
        }
        let perm = |p: &[i64]| ("perm", AttrValue::Ints(p.to_vec()));
        // (op, inputs, attribute); node i's output is `n{i}`, the last one's `sample`.
        type Spec<'a> = (&'a str, &'a [&'a str], Option<(&'a str, AttrValue)>);
        let nodes: Vec<Spec> = vec![
            ("Transpose", &["latent"], Some(perm(&[0, 2, 3, 1]))),
            ("Reshape", &["n0", "tokens_shape"], None),
            ("Mul", &["t", "freqs"], None),
            ("Sin", &["n2"], None),
            ("Add", &["n1", "n3"], None), // n4: h0
            ("MatMul", &["n4", "wq"], None),
            ("MatMul", &["n4", "wk"], None),
            ("MatMul", &["n4", "wv"], None),
            ("Reshape", &["n5", "heads_shape"], None),
            ("Transpose", &["n8"], Some(perm(&[0, 2, 1, 3]))), // n9: q
            ("Reshape", &["n6", "heads_shape"], None),
            ("Transpose", &["n10"], Some(perm(&[0, 2, 3, 1]))), // n11: k^T
            ("Reshape", &["n7", "heads_shape"], None),
            ("Transpose", &["n12"], Some(perm(&[0, 2, 1, 3]))), // n13: v
            ("MatMul", &["n9", "n11"], None),
            ("Mul", &["n14", "scale"], None),
            ("Softmax", &["n15"], Some(("axis", AttrValue::Int(-1)))),
            ("MatMul", &["n16", "n13"], None),
            ("Transpose", &["n17"], Some(perm(&[0, 2, 1, 3]))),
            ("Reshape", &["n18", "tokens_shape"], None),
            ("MatMul", &["n19", "wo"], None),
            ("Add", &["n20", "bo"], None),
            ("Add", &["n4", "n21"], None), // n22: h1
            ("MatMul", &["n22", "w1"], None),
            ("Add", &["n23", "b1"], None),
            ("Tanh", &["n24"], None),
            ("MatMul", &["n25", "w2"], None),
            ("Add", &["n26", "b2"], None), // n27: the FFN's output, cached by the MLP broadcast
            ("Add", &["n22", "n27"], None),
            ("Reshape", &["n28", "grid_shape"], None),
            ("Transpose", &["n29"], Some(perm(&[0, 3, 1, 2]))),
        ];
        let last = nodes.len() - 1;
        for (i, (op, inputs, attr)) in nodes.into_iter().enumerate() {
            let out = if i == last {
                "sample".to_string()
            } else {
                format!("n{i}")
            };
            let mut node = Node::new(&format!("node{i}"), op, inputs, &[&out]);
            if let Some((k, v)) = attr {
                node = node.with_attr(k, v);
            }
            g.nodes.push(node);
        }
        Model::new(g, 17)
    }
}

/// `x` [rows][k] times the row-major [k, n] matrix `w`, plus `bias` (or none).
fn matmul(x: &[Vec<f64>], w: &[f32], bias: Option<&[f32]>) -> Vec<Vec<f64>> {
    let n = w.len() / x[0].len();
    x.iter()
        .map(|r| {
            (0..n)
                .map(|j| {
                    let b = bias.map_or(0.0, |b| b[j] as f64);
                    b + r
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v * w[i * n + j] as f64)
                        .sum::<f64>()
                })
                .collect()
        })
        .collect()
}

fn add_rows(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
        .collect()
}

impl TinyDit {
    /// The residual stream after self-attention (h1) for `latent` at timestep `t`: the FFN's input.
    fn attention_half(&self, latent: &[f64], t: f64) -> Vec<Vec<f64>> {
        // Token s (row-major over the 2 x 2 grid), channel c is latent[c * 4 + s].
        let h0: Vec<Vec<f64>> = (0..TOKENS)
            .map(|s| {
                (0..C)
                    .map(|c| latent[c * TOKENS + s] + (t * self.freqs[c] as f64).sin())
                    .collect()
            })
            .collect();
        let (q, k, v) = (
            matmul(&h0, &self.wq, None),
            matmul(&h0, &self.wk, None),
            matmul(&h0, &self.wv, None),
        );
        let d = C / HEADS;
        let mut o = vec![vec![0.0; C]; TOKENS];
        for h in 0..HEADS {
            let r = h * d..(h + 1) * d;
            for (s, os) in o.iter_mut().enumerate() {
                let scores: Vec<f64> = k
                    .iter()
                    .map(|kj| {
                        let dot: f64 = r.clone().map(|c| q[s][c] * kj[c]).sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (ej, vj) in e.iter().zip(&v) {
                    for c in r.clone() {
                        os[c] += ej / z * vj[c];
                    }
                }
            }
        }
        add_rows(&h0, &matmul(&o, &self.wo, Some(&self.bo)))
    }

    /// The FFN's output (what the MLP broadcast caches).
    fn ffn(&self, h1: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let u: Vec<Vec<f64>> = matmul(h1, &self.w1, Some(&self.b1))
            .into_iter()
            .map(|r| r.into_iter().map(f64::tanh).collect())
            .collect();
        matmul(&u, &self.w2, Some(&self.b2))
    }

    /// Flow-matching Euler over `timesteps` (sigma = t / 1000, then 0) from `noise`; at step i the FFN
    /// output is computed and cached when `computes(i)`, else the cached one is used.
    fn sample_by_hand(
        &self,
        noise: &[f32],
        timesteps: &[f64],
        computes: impl Fn(usize) -> bool,
    ) -> Vec<f64> {
        let mut x: Vec<f64> = noise.iter().map(|&v| v as f64).collect();
        let mut cache = vec![vec![0.0; C]; TOKENS];
        for (i, &t) in timesteps.iter().enumerate() {
            let h1 = self.attention_half(&x, t as f32 as f64);
            if computes(i) {
                cache = self.ffn(&h1);
            }
            let h2 = add_rows(&h1, &cache);
            let sigma = |j: usize| timesteps.get(j).map_or(0.0, |t| t / 1000.0);
            let dt = sigma(i + 1) - sigma(i);
            for c in 0..C {
                for (s, row) in h2.iter().enumerate() {
                    x[c * TOKENS + s] += dt * row[c];
                }
            }
        }
        x
    }
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// MLP broadcast end to end on a graph whose every value is known: `ditc convert` bakes VideoSys's
/// rule (`mlp = { timesteps, blocks, reuse }`) into the graph, `ditc run`'s sampling loop carries the
/// cached FFN output between steps, and the final latent equals the same loop computed by hand in f64,
/// which reuses the FFN output exactly on the steps the rule names. The wrong rules (no reuse, reuse
/// shifted by one step, a cache never refreshed after step 0) land far from it.
#[test]
fn mlp_broadcast_matches_a_loop_computed_by_hand() {
    let dit = TinyDit::new();
    let tmp = tempfile::tempdir().unwrap();
    let model_path = tmp.path().join("tiny.onnx");
    std::fs::write(
        &model_path,
        ditc::onnx::model_to_bytes_inline(&dit.graph()).unwrap(),
    )
    .unwrap();
    let recipe = tmp.path().join("mlp.toml");
    std::fs::write(
        &recipe,
        "name = \"mlp\"\nversion = 1\n[sampler]\nkind = \"flow_euler\"\nsteps = 10\nshift = 1.0\n\
         [[passes]]\nname = \"broadcast-static\"\n[passes.options]\n\
         mlp = { timesteps = [889, 700, 556], blocks = [0], reuse = 2 }\n",
    )
    .unwrap();
    let out = tmp.path().join("bundle");
    ditc_ok(&[
        "convert",
        model_path.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    // Flow matching without shift: sigmas linspace(1, 1/1000, 10), timesteps 1000, 889, ..., 112, 1.
    let timesteps: Vec<f64> = manifest["sampler"]["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let want: Vec<f64> = (0..10).map(|i| 1000.0 - 111.0 * i as f64).collect();
    assert!(
        timesteps
            .iter()
            .zip(&want)
            .all(|(a, b)| (a - b).abs() < 1e-9)
            && timesteps.len() == 10,
        "{timesteps:?}"
    );
    assert_eq!(manifest["schedule"]["blocks"], serde_json::json!([0]));
    assert_eq!(manifest["state"].as_array().unwrap().len(), 1);

    // VideoSys's rule: the MLP computes at a key timestep and reuses its output for the next `reuse`
    // steps. 889 is step 1 and 556 step 4; 700 is never visited.
    let reused = [2, 3, 5, 6];
    let rule = |i: usize| !reused.contains(&i);

    let noise = pseudo_random(42, C * TOKENS, 2.0);
    let inputs = tmp.path().join("noise.safetensors");
    ditc::tensors::write_safetensors(
        &inputs,
        &[ditc::ir::Tensor::from_f32(
            "noise",
            vec![1, C as i64, 2, 2],
            &noise,
        )],
    )
    .unwrap();
    let args = Args {
        model: out.join("manifest.json"),
        inputs,
        prefix: None,
        output: out.join("unused.safetensors"),
        compare_full: false,
        json: true,
        no_progress: true,
        no_verify: false,
        trace: None,
        plot: None,
        shapes: Default::default(),
        threads: Default::default(),
    };
    let (latent, report) = sample_bundle(&args).unwrap();
    let decisions: Vec<bool> = (0..10).map(rule).collect();
    assert_eq!(
        report.scheduled.branches[&Branch::Cond].mlp_decisions[&0],
        decisions
    );
    let got: Vec<f64> = latent
        .to_f32_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();

    let by_hand = dit.sample_by_hand(&noise, &timesteps, rule);
    let err = rel_l2(&got, &by_hand);
    eprintln!("MLP broadcast: bundle vs the loop by hand, rel L2 {err:.2e}");
    assert!(err < 1e-5, "rel L2 {err}");
    type Rule = Box<dyn Fn(usize) -> bool>;
    let wrong: [(&str, Rule); 3] = [
        ("no reuse", Box::new(|_| true)),
        (
            "reuse shifted by one step",
            Box::new(|i| ![1, 2, 4, 5].contains(&i)),
        ),
        ("cache never refreshed", Box::new(|i| i == 0)),
    ];
    for (what, computes) in wrong {
        let moved = rel_l2(&dit.sample_by_hand(&noise, &timesteps, computes), &by_hand);
        eprintln!("{what}: rel L2 {moved:.2e} from the rule's result");
        assert!(moved > 1e-3, "{what} is indistinguishable ({moved})");
    }
}

/// `broadcast-static.table.<group>`: an explicit table per group is baked as it is written, and the
/// sampling run decides exactly as it says (spatial sites; the others compute every step).
#[test]
fn explicit_tables_are_baked_and_followed_step_by_step() {
    let tmp = tempfile::tempdir().unwrap();
    let table = "CRRCRCCRRC";
    let recipe = tmp.path().join("table.toml");
    std::fs::write(
        &recipe,
        format!("name = \"t\"\n[sampler]\nkind = \"ddim\"\nsteps = 10\nnum_train_timesteps = 1000\nbeta_schedule = \"linear\"\nbeta_start = 0.0001\nbeta_end = 0.02\n[[passes]]\nname = \"broadcast-static\"\n[passes.options]\ntable = {{ spatial = \"{table}\" }}\n"),
    )
    .unwrap();
    let out = tmp.path().join("bundle");
    let model = common::demo().join("model.onnx");
    let args = [
        "convert",
        model.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ];
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(args)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let want: Vec<bool> = table.chars().map(|c| c == 'C').collect();
    let baked: Vec<bool> =
        serde_json::from_value(m["schedule"]["tables"]["spatial"].clone()).unwrap();
    assert_eq!(baked, want);
    let (_, report) = common::run_bundle(
        &out.join("manifest.json"),
        &common::demo().join("sampling.safetensors"),
        "0.",
        false,
    );
    let decisions = &report.scheduled.branches.values().next().unwrap().decisions;
    for site in m["dit_map"]["attention"].as_array().unwrap() {
        let id = site["id"].as_u64().unwrap() as usize;
        let got = &decisions[&id];
        match site["kind"].as_str().unwrap() {
            "spatial" => assert_eq!(got, &want, "site {id}"),
            _ => assert!(got.iter().all(|&c| c), "site {id}"),
        }
    }
    // A bad table is refused before any work, naming the option.
    std::fs::write(
        &recipe,
        std::fs::read_to_string(&recipe)
            .unwrap()
            .replace(table, "CRRC"),
    )
    .unwrap();
    let out2 = tmp.path().join("bad");
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args([
            "convert",
            model.to_str().unwrap(),
            "--recipe",
            recipe.to_str().unwrap(),
            "-o",
            out2.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success()
            && err
                .contains("broadcast-static.table.spatial has 4 entries for a sampler of 10 steps"),
        "{err}"
    );
    assert!(!out2.exists());
}

/// Converts the latte-tiny demo with 10 DDIM steps and `broadcast-static`'s `table = {table}` (TOML
/// inline-table text) into `dir/name`; the manifest, or convert's error text.
fn convert_with_table(dir: &Path, name: &str, table: &str) -> Result<serde_json::Value, String> {
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(
        &recipe,
        format!("name = \"t\"\n[sampler]\nkind = \"ddim\"\nsteps = 10\nnum_train_timesteps = 1000\nbeta_schedule = \"linear\"\nbeta_start = 0.0001\nbeta_end = 0.02\n[[passes]]\nname = \"broadcast-static\"\n[passes.options]\ntable = {table}\n"),
    )
    .unwrap();
    let out = dir.join(name);
    let model = demo().join("model.onnx");
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(["convert", model.to_str().unwrap(), "--recipe"])
        .arg(&recipe)
        .arg("-o")
        .arg(&out)
        .arg("--no-progress")
        .output()
        .unwrap();
    if !r.status.success() {
        assert!(!out.exists(), "a refused conversion left {}", out.display());
        return Err(String::from_utf8_lossy(&r.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap())
}

/// `broadcast-static.table.blocks`: (1) every block given its group's table as its own computes the
/// same final latent as the group tables (two different graphs: one `If` condition per block vs one
/// per group); (2) a table given to one block's spatial attention and another block's MLP drives
/// exactly those values, step by step, and nothing else is cached; (3) bad block tables are refused
/// before any work, naming the option.
#[test]
fn per_block_tables_drive_one_blocks_values() {
    let tmp = tempfile::tempdir().unwrap();
    let (spatial, mlp) = ("CRRCRCCRRC", "CCRRCRRCCR");
    let inputs = demo().join("sampling.safetensors");
    let grouped = convert_with_table(
        tmp.path(),
        "grouped",
        &format!("{{ spatial = \"{spatial}\", mlp = \"{mlp}\" }}"),
    )
    .unwrap();
    // The blocks with a spatial site, and those with an MLP, from the DiT map.
    let sites = grouped["dit_map"]["attention"].as_array().unwrap().clone();
    let kind_of = |id: u64| {
        sites.iter().find(|s| s["id"].as_u64() == Some(id)).unwrap()["kind"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut per_block = Vec::new();
    let (mut spatial_block, mut mlp_blocks) = (None, Vec::new());
    for b in grouped["dit_map"]["blocks"].as_array().unwrap() {
        let index = b["index"].as_u64().unwrap();
        let spatial_sites: Vec<u64> = b["attention"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .filter(|&id| kind_of(id) == "spatial")
            .collect();
        let has_mlp = b["ffn_output"].is_string();
        let mut t = Vec::new();
        if !spatial_sites.is_empty() {
            t.push(format!("spatial = \"{spatial}\""));
            spatial_block = spatial_block.or(Some((index, spatial_sites[0])));
        }
        if has_mlp {
            t.push(format!("mlp = \"{mlp}\""));
            mlp_blocks.push(index);
        }
        if !t.is_empty() {
            per_block.push(format!("{index} = {{ {} }}", t.join(", ")));
        }
    }
    let blocks = convert_with_table(
        tmp.path(),
        "blocks",
        &format!("{{ blocks = {{ {} }} }}", per_block.join(", ")),
    )
    .unwrap();
    assert!(blocks["schedule"]["tables"].as_object().unwrap().is_empty());
    assert_eq!(
        blocks["schedule"]["block_tables"].as_array().unwrap().len(),
        per_block
            .iter()
            .map(|b| b.matches(" = \"").count())
            .sum::<usize>()
    );
    let (a, ra) = common::run_bundle(
        &tmp.path().join("grouped/manifest.json"),
        &inputs,
        "0.",
        false,
    );
    let (b, rb) = common::run_bundle(
        &tmp.path().join("blocks/manifest.json"),
        &inputs,
        "0.",
        false,
    );
    let same = compare(&b, &a);
    eprintln!("per-block = group tables: rel-L2 {:.3e}", same.rel_l2);
    assert!(same.rel_l2 <= 1e-6, "rel-L2 {}", same.rel_l2);
    assert_eq!(ra.scheduled.model_flops, rb.scheduled.model_flops);
    assert!(ra.scheduled.model_flops < ra.scheduled.model_flops_full);

    // One block's spatial site, another block's MLP: only they follow their tables.
    let (sb, site) = spatial_block.unwrap();
    let mb = *mlp_blocks.iter().find(|&&b| b != sb).unwrap();
    let one = convert_with_table(
        tmp.path(),
        "one",
        &format!("{{ blocks = {{ {sb} = {{ spatial = \"{spatial}\" }}, {mb} = {{ mlp = \"{mlp}\" }} }} }}"),
    )
    .unwrap();
    let own: Vec<(u64, String, Vec<u64>)> = one["schedule"]["block_tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["block"].as_u64().unwrap(),
                t["group"].as_str().unwrap().to_string(),
                serde_json::from_value(t["sites"].clone()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        own,
        vec![
            (sb, "spatial".into(), vec![site]),
            (mb, "mlp".into(), vec![])
        ]
    );
    let (_, r) = common::run_bundle(&tmp.path().join("one/manifest.json"), &inputs, "0.", false);
    let branch = r.scheduled.branches.values().next().unwrap();
    let want = |t: &str| -> Vec<bool> { t.chars().map(|c| c == 'C').collect() };
    for (&id, got) in &branch.decisions {
        match id as u64 == site {
            true => assert_eq!(got, &want(spatial), "site {id}"),
            false => assert!(got.iter().all(|&c| c), "site {id} is not scheduled"),
        }
    }
    assert_eq!(branch.mlp_decisions.len(), 1);
    assert_eq!(branch.mlp_decisions[&(mb as usize)], want(mlp));
    let traced: Vec<bool> = r
        .scheduled
        .trace
        .iter()
        .map(|s| {
            s.branches.values().next().unwrap().groups
                [&format!("spatial.block{sb}").parse().unwrap()]
        })
        .collect();
    assert_eq!(traced, want(spatial));

    // Refusals.
    let blocks_count = grouped["dit_map"]["blocks"].as_array().unwrap().len();
    for (table, says) in [
        (
            format!("{{ blocks = {{ {blocks_count} = {{ spatial = \"{spatial}\" }} }} }}"),
            format!("broadcast-static.table.blocks.{blocks_count}.spatial: the model has {blocks_count} transformer blocks"),
        ),
        (
            format!("{{ blocks = {{ {sb} = {{ temporal = \"{spatial}\" }} }} }}"),
            format!("broadcast-static.table.blocks.{sb}.temporal: block {sb}"),
        ),
        (
            format!("{{ blocks = {{ {sb} = {{ spatial = \"CRR\" }} }} }}"),
            format!("broadcast-static.table.blocks.{sb}.spatial has 3 entries for a sampler of 10 steps"),
        ),
        (
            "{ blocks = { x = { spatial = \"CR\" } } }".to_string(),
            "broadcast-static.table.blocks.x: expected a transformer block's index".to_string(),
        ),
        (
            format!("{{ blocks = {{ {sb} = {{ blocks = {{ 0 = {{ mlp = \"C\" }} }} }} }} }}"),
            "block tables do not nest".to_string(),
        ),
    ] {
        let err = convert_with_table(tmp.path(), "bad", &table).unwrap_err();
        assert!(err.contains(&says), "{table}: {err}");
    }
}
