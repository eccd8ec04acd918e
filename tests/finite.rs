//! Non-finite weights are refused: hostile copies of the demo model (examples/latte-tiny) with one NaN,
//! +Inf or -Inf poked in at a known index, as an inline ONNX initializer (raw and typed data), in ONNX
//! external data, and in diffusers safetensors (f32, bf16, sharded). `convert`, `calibrate` and
//! `inspect --check` exit 2 naming the tensor, the file, the index and the value; `convert` leaves no
//! output. Clean models pass `inspect --check`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_refused, ditc_ok};
use ditc::ir::{DataType, Tensor};
use ditc::onnx::proto::{ModelProto, TensorProto};
use prost::Message;

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/latte-tiny")
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The element a test pokes: flat index 37 of a 2-D weight is `[37 / cols, 37 % cols]`.
const AT: usize = 37;

fn expected_index(dims: &[i64]) -> String {
    let cols = dims[1] as usize;
    format!("flat index {AT} (index [{}, {}])", AT / cols, AT % cols)
}

fn read_proto(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

/// Position of the first f32 initializer holding raw data that is 2-D (a linear weight) and at least
/// 4 KiB (so `convert` streams it), or 1-D and below the 1024-byte external threshold (kept inline).
fn pick(proto: &ModelProto, large: bool) -> usize {
    let g = proto.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .position(|t| {
            let n = t.raw_data.len();
            t.data_type == 1
                && if large {
                    t.dims.len() == 2 && n >= 4096
                } else {
                    t.dims.len() == 1 && n > 4 * AT && n < 1024
                }
        })
        .expect("the demo has such a weight")
}

fn set_f32(raw: &mut [u8], index: usize, v: f32) {
    raw[4 * index..4 * index + 4].copy_from_slice(&v.to_le_bytes());
}

/// A copy of the demo graph in `dir` with `v` at element AT of the chosen initializer (as typed
/// `float_data` when `typed`); returns the file, the tensor's name and dims.
fn poke_onnx(dir: &Path, v: f32, large: bool, typed: bool) -> (PathBuf, String, Vec<i64>) {
    let mut proto = read_proto(&demo().join("model.onnx"));
    let i = pick(&proto, large);
    let t: &mut TensorProto = &mut proto.graph.as_mut().unwrap().initializer[i];
    let mut raw = t.raw_data.to_vec();
    set_f32(&mut raw, AT, v);
    if typed {
        t.float_data = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        t.raw_data = Default::default();
    } else {
        t.raw_data = raw.into();
    }
    let (name, dims) = (t.name.clone(), t.dims.clone());
    let path = dir.join("model.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    (path, name, dims)
}

/// `convert`, `calibrate` and `inspect --check` of `model` all exit 2 with every string of `expect`,
/// and convert leaves no output folder.
fn assert_all_refuse(model: &Path, extra: &[&str], expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    let stats = tmp.path().join("stats.json");
    let m = s(model);
    let mut convert = vec!["convert", m, "-o", s(&out), "--no-progress"];
    convert.extend_from_slice(extra);
    assert_refused(&convert, expect);
    assert!(!out.exists(), "convert left {}", out.display());
    let inputs = demo().join("sampling.safetensors");
    let recipe = repo("passes/w8a8.toml");
    let mut calibrate = vec!["calibrate", m, "--recipe", &recipe, "--inputs", s(&inputs)];
    calibrate.extend_from_slice(&["--cases", "1", "-o", s(&stats), "--no-progress"]);
    calibrate.extend_from_slice(extra);
    assert_refused(&calibrate, expect);
    assert!(!stats.exists());
    // The full-run calibrations (drift profile, MagCache ratios) refuse it too.
    for mode in ["--profile", "--mag-ratios"] {
        let mut full = calibrate.clone();
        full.push(mode);
        assert_refused(&full, expect);
        assert!(!stats.exists() && !tmp.path().join("stats.drift.svg").exists());
    }
    let mut inspect = vec!["inspect", "--check", m];
    inspect.extend_from_slice(extra);
    assert_refused(&inspect, expect);
}

#[test]
fn inline_initializers_with_nan_or_inf_are_refused() {
    for (v, kind) in [
        (f32::NAN, "holds NaN"),
        (f32::INFINITY, "holds +Inf"),
        (f32::NEG_INFINITY, "holds -Inf"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (model, name, dims) = poke_onnx(tmp.path(), v, true, false);
        let tensor = format!("tensor '{name}'");
        let file = format!("in '{}'", model.display());
        assert_all_refuse(&model, &[], &[&tensor, &file, kind, &expected_index(&dims)]);
    }
}

/// Below the external-data threshold a weight stays in the graph file: convert checks it before the
/// write rather than while streaming.
#[test]
fn small_inline_tensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, name, _) = poke_onnx(tmp.path(), f32::NEG_INFINITY, false, false);
    let tensor = format!("tensor '{name}'");
    let at = format!("-Inf at flat index {AT} (index [{AT}])");
    assert_all_refuse(&model, &[], &[&tensor, &at]);
}

#[test]
fn typed_float_data_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, name, dims) = poke_onnx(tmp.path(), f32::NAN, true, true);
    let proto = read_proto(&model);
    let t = &proto.graph.as_ref().unwrap().initializer[pick_by_name(&proto, &name)];
    assert!(
        t.raw_data.is_empty() && !t.float_data.is_empty(),
        "typed data"
    );
    let tensor = format!("tensor '{name}'");
    assert_all_refuse(&model, &[], &[&tensor, "holds NaN", &expected_index(&dims)]);
}

fn pick_by_name(proto: &ModelProto, name: &str) -> usize {
    let g = proto.graph.as_ref().unwrap();
    g.initializer.iter().position(|t| t.name == name).unwrap()
}

/// Convert the clean demo once to get external data, then poke the data file at the tensor's offset.
#[test]
fn external_data_is_checked_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    let demo_model = demo().join("model.onnx");
    ditc_ok(&["convert", s(&demo_model), "-o", s(&bundle), "--no-progress"]);
    let graph = bundle.join("model.onnx");
    let proto = read_proto(&graph);
    let t = &proto.graph.as_ref().unwrap().initializer[pick(&read_proto(&demo_model), true)];
    let offset: usize = t
        .external_data
        .iter()
        .find(|e| e.key == "offset")
        .expect("the weight went to external data")
        .value
        .parse()
        .unwrap();
    let data = bundle.join("model.onnx.data");
    let mut bytes = std::fs::read(&data).unwrap();
    set_f32(&mut bytes[offset..], AT, f32::INFINITY);
    std::fs::write(&data, bytes).unwrap();
    let tensor = format!("tensor '{}'", t.name);
    let file = format!("in '{}'", data.display());
    assert_all_refuse(
        &graph,
        &[],
        &[&tensor, &file, "holds +Inf", &expected_index(&t.dims)],
    );
}

/// The demo checkpoint's tensors, with `v` at element AT of its first 2-D weight, as `dtype`.
fn poked_checkpoint(v: f32, dtype: DataType) -> (Vec<Tensor>, String, Vec<i64>) {
    let ckpt = ditc::checkpoint::Checkpoint::open(&demo().join("ckpt")).unwrap();
    let target = ckpt
        .tensors
        .iter()
        .find(|t| t.dims.len() == 2 && t.numel() > AT as u64)
        .unwrap()
        .name
        .clone();
    let mut dims = Vec::new();
    let tensors = ckpt
        .tensors
        .iter()
        .map(|t| {
            let mut values = t.to_f32_vec().unwrap();
            if t.name == target {
                values[AT] = v;
                dims = t.dims.clone();
            }
            let raw: Vec<u8> = match dtype {
                DataType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => values
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            Tensor::from_raw(&t.name, dtype, t.dims.clone(), raw.into()).unwrap()
        })
        .collect();
    (tensors, target, dims)
}

fn checkpoint_dir(root: &Path) -> PathBuf {
    let dir = root.join("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(demo().join("ckpt/config.json"), dir.join("config.json")).unwrap();
    dir
}

#[test]
fn safetensors_f32_and_bf16_are_checked() {
    for (dtype, v, kind) in [
        (DataType::F32, f32::NAN, "holds NaN"),
        (DataType::BF16, f32::NEG_INFINITY, "holds -Inf"),
        (DataType::BF16, f32::NAN, "holds NaN"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = checkpoint_dir(tmp.path());
        let (tensors, name, dims) = poked_checkpoint(v, dtype);
        let weights = dir.join(ditc::checkpoint::WEIGHTS);
        ditc::tensors::write_safetensors(&weights, &tensors).unwrap();
        let tensor = format!("tensor '{name}' ({dtype} ");
        let file = format!("in '{}'", weights.display());
        assert_all_refuse(
            &dir,
            &["--text-len", "4"],
            &[&tensor, &file, kind, &expected_index(&dims)],
        );
    }
}

#[test]
fn sharded_checkpoints_name_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(tmp.path());
    let (tensors, name, dims) = poked_checkpoint(f32::INFINITY, DataType::BF16);
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("a.safetensors", first), ("b.safetensors", second)] {
        ditc::tensors::write_safetensors(&dir.join(file), part).unwrap();
        for t in part {
            weight_map.insert(t.name.clone(), file.into());
        }
    }
    let shard = if first.iter().any(|t| t.name == name) {
        "a.safetensors"
    } else {
        "b.safetensors"
    };
    let index = serde_json::json!({ "weight_map": weight_map });
    std::fs::write(dir.join(ditc::checkpoint::INDEX), index.to_string()).unwrap();
    let tensor = format!("tensor '{name}'");
    let file = format!("in '{}'", dir.join(shard).display());
    assert_all_refuse(
        &dir,
        &["--text-len", "4"],
        &[&tensor, &file, "holds +Inf", &expected_index(&dims)],
    );
}

/// `quantize-w8a8` consumes the weights it quantizes (absmax skips a NaN, which then rounds to 0): the
/// source weight is checked before the pass's output is linted or written.
#[test]
fn weights_consumed_by_quantization_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let recipe = repo("passes/w8a8.toml");
    let demo_model = demo().join("model.onnx");
    let inputs = demo().join("sampling.safetensors");
    ditc_ok(&[
        "calibrate",
        s(&demo_model),
        "--recipe",
        &recipe,
        "--inputs",
        s(&inputs),
        "--cases",
        "1",
        "--set",
        "sampler.steps=2",
        "-o",
        s(&stats),
        "--no-progress",
    ]);
    let (model, name, dims) = poke_onnx(tmp.path(), f32::NAN, true, false);
    let out = tmp.path().join("bundle");
    let tensor = format!("tensor '{name}'");
    assert_refused(
        &[
            "convert",
            s(&model),
            "--recipe",
            &recipe,
            "--calibration-stats",
            s(&stats),
            "-o",
            s(&out),
            "--no-progress",
        ],
        &[&tensor, "holds NaN", &expected_index(&dims)],
    );
    assert!(!out.exists());
}

#[test]
fn clean_models_pass_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    let demo_model = demo().join("model.onnx");
    ditc_ok(&["convert", s(&demo_model), "-o", s(&bundle), "--no-progress"]);
    let ckpt = demo().join("ckpt");
    let graph = bundle.join("model.onnx");
    for args in [
        vec!["inspect", "--check", s(&demo_model)],
        vec!["inspect", "--check", s(&ckpt), "--text-len", "4"],
        vec!["inspect", "--check", s(&graph)],
    ] {
        let r = common::ditc(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("float tensors") && err.contains("all finite"),
            "{err}"
        );
    }
}

/// Every fixture export (both exporters) and every checkpoint with a builder passes the check too.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn clean_fixture_models_pass_the_check() {
    let fixtures = common::fixtures();
    for m in common::MODELS {
        for g in common::GRAPH_FILES {
            ditc_ok(&["inspect", "--check", s(&fixtures.join(m).join(g))]);
        }
        ditc_ok(&["inspect", "--check", s(&fixtures.join(m).join("ckpt"))]);
    }
}
