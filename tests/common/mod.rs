//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ditc::ir::Tensor;

pub mod hunyuan_video_layout;

/// The shared PyTorch fixtures (`../shared/fixtures`, or `$DITC_FIXTURES` at build time), where the
/// build script (`build.rs`) found them. Every test that calls this carries
/// `#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]`, so without the folder it is
/// reported as ignored; run anyway (`--ignored`), it fails here instead of passing without checking.
pub fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("DITC_FIXTURES_DIR"));
    assert!(
        dir.is_dir(),
        "this test needs the fixtures folder {}, which is absent (if it was removed after the build: `touch build.rs`)",
        dir.display()
    );
    dir
}

/// The demo model in the repository, `examples/latte-tiny`: a copy of the latte-tiny fixture
/// (model.onnx, io.safetensors, ckpt/, sampling.json, sampling.safetensors), so tests of latte-tiny
/// run without `../shared/fixtures`.
pub fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/latte-tiny")
}

/// `../shared/fixtures/<name>` (see [`fixtures`]: the calling test carries the `ditc_fixtures` ignore).
pub fn fixture(name: &str) -> PathBuf {
    let dir = fixtures().join(name);
    assert!(dir.is_dir(), "the fixture {} is absent", dir.display());
    dir
}

pub const MODELS: [&str; 3] = ["latte-tiny", "dit-tiny", "wan-tiny"];
pub const GRAPH_FILES: [&str; 2] = ["model.onnx", "model.dynamo.onnx"];

/// Every fixture graph `(model, file)` except latte-tiny's `model.onnx`, which the demo model is a copy
/// of (tests run that one from [`demo`]).
pub fn fixture_graphs_beyond_the_demo() -> Vec<(&'static str, &'static str)> {
    MODELS
        .iter()
        .flat_map(|&m| GRAPH_FILES.iter().map(move |&f| (m, f)))
        .filter(|&g| g != ("latte-tiny", "model.onnx"))
        .collect()
}

pub fn ditc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ditc"))
        .args(args)
        .output()
        .expect("the ditc binary runs")
}

/// Run ditc, assert it succeeded (showing its stderr otherwise), return its stdout.
pub fn ditc_ok(args: &[&str]) -> Vec<u8> {
    let r = ditc(args);
    assert!(
        r.status.success(),
        "ditc {args:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    r.stdout
}

/// Tensors of one fixture case (`{case}.name`), with the prefix stripped.
pub fn case(io: &[Tensor], case: usize) -> Vec<Tensor> {
    let prefix = format!("{case}.");
    io.iter()
        .filter_map(|t| {
            let mut t = t.clone();
            t.name = t.name.strip_prefix(&prefix)?.to_string();
            Some(t)
        })
        .collect()
}

pub fn named<'a>(tensors: &'a [Tensor], name: &str) -> &'a Tensor {
    tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor '{name}'"))
}

/// Run ditc expecting a clean refusal: exit status 2, an `error: ...` message containing every string
/// of `expect`, no panic. Returns stderr.
pub fn assert_refused(args: &[&str], expect: &[&str]) -> String {
    let r = ditc(args);
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert_eq!(
        r.status.code(),
        Some(2),
        "{args:?} exited {:?}: {err}",
        r.status
    );
    assert!(!err.contains("panicked"), "{args:?}: panic: {err}");
    assert!(err.starts_with("error:"), "{args:?}: {err}");
    for e in expect {
        assert!(err.contains(e), "{args:?}: expected '{e}' in: {err}");
    }
    err
}

/// `tensors` with each graph input in the type `model` declares for it: a fixture's int64 timesteps
/// become float32 for a float32 timestep input (exact: they are integers below 2^24). Any other
/// difference of type is a test bug and panics.
pub fn in_input_dtypes(model: &ditc::ir::Model, tensors: &[Tensor]) -> Vec<Tensor> {
    use ditc::ir::DataType;
    tensors
        .iter()
        .map(|t| {
            let declared = model.graph.inputs.iter().find(|i| i.name == t.name);
            match declared.and_then(|i| i.dtype()) {
                Some(DataType::F32) if t.dtype == DataType::I64 => {
                    let values = t.to_i64_vec().unwrap();
                    assert!(values.iter().all(|v| v.abs() <= 1 << 24), "{}", t.name);
                    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
                    Tensor::from_f32(&t.name, t.dims.clone(), &values)
                }
                Some(d) if d != t.dtype => {
                    panic!("'{}' is {} but the graph wants {d}", t.name, t.dtype)
                }
                _ => t.clone(),
            }
        })
        .collect()
}

/// `model` under tract reproduces PyTorch's `sample` on all five cases of a fixture's io.safetensors
/// to relative error 1e-4 (printing each case's error under `label`). Inputs are given in the types
/// the graph declares ([`in_input_dtypes`]).
pub fn assert_matches_reference(model: &ditc::ir::Model, io: &[Tensor], label: &str) {
    let runner =
        ditc::runtime::TractRunner::new(model, &in_input_dtypes(model, &case(io, 0))).unwrap();
    for c in 0..5 {
        let inputs = in_input_dtypes(model, &case(io, c));
        let out = runner.run(&inputs).unwrap();
        let got = named(&out, "sample").to_f32_vec().unwrap();
        let want = named(&inputs, "sample").to_f32_vec().unwrap();
        let f = ditc::metrics::compare(&got, &want);
        eprintln!(
            "{label} case {c}: max_rel {:.2e} rel_l2 {:.2e}",
            f.max_rel, f.rel_l2
        );
        assert!(
            f.max_rel <= 1e-4,
            "{label} case {c}: relative error {}",
            f.max_rel
        );
    }
}

/// The repository path of `p`.
pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The shapes wan-small's sampling runs use: 8 frames of 16 x 16 latents, 4 caption tokens.
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

/// The `ditc convert` arguments for the wan-small checkpoint of `fixture` with `recipe` and `--set`
/// overrides into `out` (for a conversion expected to be refused, too).
pub fn convert_wan_small_args(
    fixture: &Path,
    recipe: &Path,
    sets: &[&str],
    out: &Path,
) -> Vec<String> {
    let ckpt = fixture.join("ckpt");
    let mut args: Vec<String> = [
        "convert",
        ckpt.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    args.extend(WAN_SMALL_SHAPES.map(String::from));
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args
}

/// `args` as the `&str`s `ditc`, `ditc_ok` and `assert_refused` take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Convert the wan-small checkpoint with `recipe` and `--set` overrides into `out`; returns the
/// manifest as JSON.
pub fn convert_wan_small(
    fixture: &Path,
    recipe: &Path,
    sets: &[&str],
    out: &Path,
) -> serde_json::Value {
    ditc_ok(&strs(&convert_wan_small_args(fixture, recipe, sets, out)));
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

/// The `ditc run` arguments sampling the bundle of `manifest` on the tensors `PREFIX<name>` of
/// `inputs` into `out`, without progress bars, followed by `extra`.
pub fn run_args(
    manifest: &Path,
    inputs: &Path,
    prefix: &str,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        manifest.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--prefix",
        prefix,
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Sample a bundle as `ditc run` does, on the inputs named `PREFIX<name>` of `inputs`.
pub fn run_bundle(
    manifest: &Path,
    inputs: &Path,
    prefix: &str,
    compare_full: bool,
) -> (Vec<f32>, ditc::cli::run::Report) {
    let args = ditc::cli::run::Args {
        model: manifest.to_path_buf(),
        inputs: inputs.to_path_buf(),
        prefix: Some(prefix.to_string()),
        output: manifest.with_file_name("unused.safetensors"),
        compare_full,
        json: true,
        trace: None,
        plot: None,
        no_progress: true,
        no_verify: false,
        shapes: Default::default(),
        threads: Default::default(),
    };
    let (latent, report) = ditc::cli::run::sample_bundle(&args).unwrap();
    (latent.to_f32_vec().unwrap(), report)
}

/// The f32 tensor `name` of `tensors`.
pub fn f32_named(tensors: &[Tensor], name: &str) -> Vec<f32> {
    named(tensors, name).to_f32_vec().unwrap()
}

/// Tensor names and shapes of a checkpoint.
pub type Shapes = Vec<(String, Vec<i64>)>;

/// Deterministic values in about [-0.5, 0.5) (xorshift, seeded per tensor name).
pub fn pseudo_random(name: &str, n: usize) -> Vec<f32> {
    let mut s = name.bytes().fold(0x9e3779b97f4a7c15u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    }) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// A float32 checkpoint folder: `config` and `shapes` filled by [`pseudo_random`].
pub fn write_f32_checkpoint(dir: &Path, config: &serde_json::Value, shapes: &Shapes) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .iter()
        .map(|(name, dims)| {
            let n = dims.iter().product::<i64>() as usize;
            let bytes = pseudo_random(name, n)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let dims = dims.iter().map(|&d| d as usize).collect();
            (name.clone(), dims, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    std::fs::write(
        dir.join(ditc::checkpoint::WEIGHTS),
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// A BF16 checkpoint of real layout and size whose weights are slices of one sparse file: its zero
/// pages take neither disk nor memory until read (building a graph never reads them), so a 14B layout
/// costs nothing.
pub fn sparse_bf16_checkpoint(
    class: &str,
    config: &serde_json::Value,
    shapes: &Shapes,
) -> ditc::checkpoint::Checkpoint {
    let total: usize = shapes
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<i64>() as usize)
        .sum();
    let sparse = tempfile::tempfile().unwrap();
    sparse.set_len(total as u64).unwrap();
    let zeros = ditc::onnx::external::map_file(&sparse).unwrap();
    let mut offset = 0;
    let tensors = shapes
        .iter()
        .map(|(name, dims)| {
            let n = 2 * dims.iter().product::<i64>() as usize;
            offset += n;
            let raw = zeros.slice(offset - n..offset);
            Tensor::from_raw(name, ditc::ir::DataType::BF16, dims.clone(), raw).unwrap()
        })
        .collect();
    let mut config = config.clone();
    config["_class_name"] = class.into();
    ditc::checkpoint::Checkpoint {
        dir: std::env::temp_dir(),
        class_name: class.to_string(),
        config,
        files: Vec::new(),
        tensors,
    }
}

/// Run `model` under tract with extra graph outputs `probes` (intermediate values); all outputs by name.
pub fn run_with_probes(
    model: &ditc::ir::Model,
    inputs: &[Tensor],
    probes: &[&str],
) -> std::collections::BTreeMap<String, Vec<f32>> {
    use ditc::ir::{DataType, ValueInfo, ValueType};
    let mut model = model.clone();
    for p in probes {
        model.graph.outputs.push(ValueInfo {
            name: p.to_string(),
            ty: ValueType::Tensor {
                dtype: Some(DataType::F32),
                shape: None,
            },
            doc_string: String::new(),
        });
    }
    let runner = ditc::runtime::TractRunner::new(&model, inputs).unwrap();
    runner
        .run(inputs)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.to_f32_vec().unwrap()))
        .collect()
}

/// A Wan graph built by ditc, run two ways for the step-cache hand loops of the tests: whole, with the
/// block stack's input and output (and `probes`) as extra outputs; and from the stack's output on
/// (the output layer) for skipped calls, fed the stack's output as the cache makes it.
pub struct StackProbe {
    pub probe: ditc::runtime::TractRunner,
    pub rest: ditc::runtime::TractRunner,
    pub stack_in: String,
    pub stack_out: String,
    pub dims: Vec<i64>,
}

impl StackProbe {
    /// For `plain`, the Wan builder's graph (its node names: `blocks.0.attn1/residual`, the last
    /// block's `ffn/residual`), planned for inputs like `example`.
    pub fn new(plain: &ditc::ir::Model, example: &[Tensor], probes: &[&str]) -> StackProbe {
        let first = plain
            .graph
            .nodes
            .iter()
            .find(|n| n.name == "blocks.0.attn1/residual")
            .expect("the Wan builder names block 0's first residual add");
        let stack_in = first.inputs[0].clone();
        let last = plain
            .graph
            .nodes
            .iter()
            .rfind(|n| n.name.ends_with(".ffn/residual"))
            .expect("the Wan builder names each block's last residual add");
        let stack_out = last.outputs[0].clone();
        StackProbe::at(plain, example, &stack_in, &stack_out, probes)
    }

    /// For any graph whose block stack enters at `stack_in` and leaves at `stack_out`.
    pub fn at(
        plain: &ditc::ir::Model,
        example: &[Tensor],
        stack_in: &str,
        stack_out: &str,
        probes: &[&str],
    ) -> StackProbe {
        use ditc::ir::{
            infer_types, remove_dead_nodes, remove_unused_inputs, DataType, Dim, ValueInfo,
        };
        let (stack_in, stack_out) = (stack_in.to_string(), stack_out.to_string());
        let types = infer_types(&plain.graph, plain.default_opset());
        let dims = types[&stack_out].shape.clone().unwrap();
        let shape: Vec<Dim> = dims.iter().map(|&d| Dim::Value(d)).collect();
        let mut probe = plain.clone();
        for v in [stack_in.as_str(), stack_out.as_str()].iter().chain(probes) {
            probe
                .graph
                .outputs
                .push(ValueInfo::tensor(v, DataType::F32, shape.clone()));
        }
        let mut rest = plain.clone();
        rest.graph.nodes.retain(|n| !n.outputs.contains(&stack_out));
        rest.graph
            .inputs
            .push(ValueInfo::tensor(&stack_out, DataType::F32, shape));
        remove_dead_nodes(&mut rest.graph);
        remove_unused_inputs(&mut rest.graph);
        let mut rest_example = example.to_vec();
        let numel = dims.iter().product::<i64>() as usize;
        rest_example.push(Tensor::from_f32(
            &stack_out,
            dims.clone(),
            &vec![0.0; numel],
        ));
        StackProbe {
            probe: ditc::runtime::TractRunner::new(&probe, example).unwrap(),
            rest: ditc::runtime::TractRunner::new(&rest, &rest_example).unwrap(),
            stack_in,
            stack_out,
            dims,
        }
    }

    /// The prediction of a skipped call: the output layer fed `stack_in + residual`.
    pub fn reuse(&self, inputs: &[Tensor], stack_in: &[f32], residual: &[f32]) -> Vec<f32> {
        let reused: Vec<f32> = stack_in.iter().zip(residual).map(|(a, r)| a + r).collect();
        let mut rest_inputs = inputs.to_vec();
        rest_inputs.push(Tensor::from_f32(
            &self.stack_out,
            self.dims.clone(),
            &reused,
        ));
        f32_named(&self.rest.run(&rest_inputs).unwrap(), "sample")
    }
}

/// The shapes wan-small is built at (`WAN_SMALL_SHAPES` as build options).
pub fn wan_small_build_options() -> ditc::models::BuildOptions {
    ditc::models::BuildOptions {
        frames: Some(8),
        height: Some(16),
        width: Some(16),
        text_len: Some(4),
        ..Default::default()
    }
}

/// `mean(|a - b|)` in f64.
pub fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// `mean(|a|)` in f64.
pub fn mean_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).abs()).sum::<f64>() / a.len() as f64
}

/// Case 0 of wan-small's `inputs.safetensors` in `example`: noise, text and negative text.
pub fn wan_small_case0(example: &Path) -> (Tensor, Tensor, Tensor) {
    let tensors = ditc::tensors::read_safetensors(&example.join("inputs.safetensors")).unwrap();
    let get = |name: &str| named(&tensors, &format!("0.{name}")).clone();
    (
        get("noise"),
        get("encoder_hidden_states"),
        get("negative_encoder_hidden_states"),
    )
}

/// `ditc run --trace --compare-full --json` of the bundle `manifest` on case 0 of `example`'s
/// inputs, files in `dir`: the run's JSON report and the trace's steps.
pub fn run_traced_case0(
    manifest: &Path,
    example: &Path,
    dir: &Path,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let trace = dir.join("trace.json");
    let sample = dir.join("s.safetensors");
    let stdout = ditc_ok(&strs(&run_args(
        manifest,
        &example.join("inputs.safetensors"),
        "0.",
        &sample,
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--compare-full",
            "--json",
        ],
    )));
    let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    (report, t["steps"].as_array().unwrap().clone())
}

/// Decisions as a line of `C` (computed) and `-` (reused), for test logs.
pub fn show_decisions(d: &[bool]) -> String {
    d.iter().map(|&c| if c { 'C' } else { '-' }).collect()
}

/// Check a `--trace`'s steps against a hand loop's per-branch (cond, uncond) decisions and metrics:
/// every decision equal, a metric traced exactly where the hand loop measured one. Returns the
/// worst relative difference of the traced metrics.
pub fn traced_metrics_worst(
    label: &str,
    steps: &[serde_json::Value],
    decisions: &[Vec<bool>; 2],
    metrics: &[Vec<Option<f64>>; 2],
) -> f64 {
    let mut worst = 0.0f64;
    for (k, branch) in ["cond", "uncond"].iter().enumerate() {
        let traced: Vec<bool> = steps
            .iter()
            .map(|s| s[branch]["computed"].as_bool().unwrap())
            .collect();
        eprintln!("{label} {branch}: ditc {}", show_decisions(&traced));
        eprintln!("{label} {branch}: hand {}", show_decisions(&decisions[k]));
        assert_eq!(traced, decisions[k], "{label} {branch}: decisions per step");
        for (n, (s, want)) in steps.iter().zip(&metrics[k]).enumerate() {
            let got = s[branch]["metric"].as_f64();
            match want {
                None => assert!(
                    got.is_none(),
                    "{label} {branch} step {n}: traced metric {got:?}, the rule measured none"
                ),
                Some(want) => {
                    let got = got.unwrap_or_else(|| panic!("{label} {branch} step {n}: no metric"));
                    worst = worst.max((got - want).abs() / want.abs().max(1e-30));
                }
            }
        }
    }
    worst
}

/// A hand loop's cached residual with TaylorSeer forecasting (or plain reuse without one), per
/// guidance branch: the last `order + 1` computed residuals (newest first) and the branch's decisions
/// so far; the weights of a skipped call come from `forecast::coefficients` (the static-table
/// function, tested on closed forms) over those decisions, summed in f32 as the graph sums them.
#[derive(Clone, Debug, Default)]
pub struct Forecaster {
    pub taylor: Option<ditc::schedule::forecast::Taylor>,
    stored: Vec<Vec<f32>>,
    history: Vec<bool>,
}

impl Forecaster {
    pub fn new(taylor: Option<ditc::schedule::forecast::Taylor>) -> Forecaster {
        Forecaster {
            taylor,
            ..Default::default()
        }
    }

    /// A computed call and the residual it cached.
    pub fn computed(&mut self, residual: &[f32]) {
        self.stored.insert(0, residual.to_vec());
        self.stored.truncate(self.taylor.map_or(1, |t| t.order + 1));
        self.history.push(true);
    }

    /// A skipped call at `step` (the branch's `step`-th call): the residual it adds.
    pub fn skipped(&mut self, step: usize) -> Vec<f32> {
        self.history.push(false);
        assert_eq!(self.history.len(), step + 1, "one decision per step");
        let Some(t) = self.taylor else {
            return self.stored[0].clone();
        };
        let w = &ditc::schedule::forecast::coefficients(&self.history, t)[step];
        let mut sum = vec![0f32; self.stored[0].len()];
        for (j, r) in self.stored.iter().enumerate() {
            for (s, v) in sum.iter_mut().zip(r) {
                let term = v * w[j] as f32;
                *s = if j == 0 { term } else { *s + term };
            }
        }
        sum
    }
}

/// `ditc calibrate` of wan-small (passes/wan-cfg.toml, case 0, the example's shapes) with
/// `--profile -o out`, plus `extra`.
pub fn calibrate_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let example = repo_path("examples/wan-small");
    let mut args: Vec<String> = [
        "calibrate",
        example.join("ckpt").to_str().unwrap(),
        "--recipe",
        repo_path("passes/wan-cfg.toml").to_str().unwrap(),
        "--inputs",
        example.join("inputs.safetensors").to_str().unwrap(),
        "--cases",
        "0",
        "--profile",
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    args.extend(WAN_SMALL_SHAPES.map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
