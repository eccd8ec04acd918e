//! Graphs built from diffusers checkpoints (config.json + safetensors), against PyTorch's outputs and
//! against the attention map of torch's own ONNX export of the same model.

mod common;

use std::path::{Path, PathBuf};

use common::{case, demo, ditc_ok, fixtures, named};
use ditc::checkpoint::Checkpoint;
use ditc::metrics::compare;
use ditc::models::{build_model, BuildOptions, TimestepDtype};
use ditc::runtime::TractRunner;
use ditc::tensors::read_safetensors;

/// The fixtures other than latte-tiny, whose copy is the demo model (`examples/latte-tiny`).
const BEYOND_THE_DEMO: [&str; 2] = ["dit-tiny", "wan-tiny"];

/// The folder of fixture `m`: the demo copy for latte-tiny (no need for `../shared/fixtures`).
fn model_dir(m: &str) -> PathBuf {
    match m {
        "latte-tiny" => demo(),
        _ => fixtures().join(m),
    }
}

/// Shape options matching fixture `m`'s io.safetensors.
fn fixture_shapes(m: &str) -> BuildOptions {
    match m {
        "latte-tiny" => BuildOptions {
            text_len: Some(4),
            ..Default::default()
        },
        "wan-tiny" => BuildOptions {
            frames: Some(5),
            height: Some(16),
            width: Some(16),
            text_len: Some(8),
            ..Default::default()
        },
        "hunyuanvideo-tiny" => BuildOptions {
            frames: Some(3),
            height: Some(8),
            width: Some(12),
            text_len: Some(5),
            ..Default::default()
        },
        _ => BuildOptions::default(),
    }
}

/// The graph built from fixture `m`'s checkpoint reproduces PyTorch's outputs on all five cases to
/// relative error 1e-4, with the family's default timestep type (int64 for Latte and DiT, float32 for
/// Wan) and with the other one.
fn assert_built_graph_matches_pytorch(m: &str) {
    let dir = model_dir(m);
    let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let default = if m == "wan-tiny" {
        TimestepDtype::Float32
    } else {
        TimestepDtype::Int64
    };
    let other = match default {
        TimestepDtype::Int64 => TimestepDtype::Float32,
        TimestepDtype::Float32 => TimestepDtype::Int64,
    };
    for (dtype, given) in [(default, None), (other, Some(other))] {
        let opts = BuildOptions {
            timestep_dtype: given,
            ..fixture_shapes(m)
        };
        let model = build_model(&ckpt, &opts).unwrap();
        let timestep = model.graph.inputs.iter().find(|i| i.name == "timestep");
        assert_eq!(
            timestep.unwrap().dtype(),
            Some(dtype.into()),
            "{m} {given:?}"
        );
        let label = format!("{m} built from ckpt, timestep {dtype:?}");
        common::assert_matches_reference(&model, &io, &label);
    }
}

#[test]
fn built_latte_graph_matches_pytorch_reference_outputs() {
    assert_built_graph_matches_pytorch("latte-tiny");
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn built_graphs_match_pytorch_reference_outputs() {
    for m in BEYOND_THE_DEMO {
        assert_built_graph_matches_pytorch(m);
    }
}

/// CLI shape flags matching each fixture's io.safetensors.
fn shape_flags(m: &str) -> Vec<&'static str> {
    match m {
        "latte-tiny" => vec!["--text-len", "4"],
        "wan-tiny" => vec![
            "--frames",
            "5",
            "--height",
            "16",
            "--width",
            "16",
            "--text-len",
            "8",
        ],
        _ => vec![],
    }
}

fn inspect_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["inspect", "--json"];
    all.extend_from_slice(args);
    serde_json::from_slice(&ditc_ok(&all)).unwrap()
}

/// (kind, batch, query_len, key_len, heads, head_dim) of every site, in order.
fn sites(report: &serde_json::Value) -> Vec<String> {
    report["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} b{} q{} k{} h{}x{}",
                s["kind"], s["batch"], s["query_len"], s["key_len"], s["heads"], s["head_dim"]
            )
        })
        .collect()
}

/// `ditc inspect DIR` finds the same attention sites, kinds and blocks as in torch's ONNX export.
fn assert_attention_map_of_the_onnx_export(m: &str) {
    let dir = model_dir(m);
    let ckpt = dir.join("ckpt");
    let mut args = vec![ckpt.to_str().unwrap()];
    args.extend(shape_flags(m));
    let built = inspect_json(&args);
    let exported = inspect_json(&[dir.join("model.onnx").to_str().unwrap()]);
    assert_eq!(sites(&built), sites(&exported), "{m}");
    assert!(!sites(&built).is_empty());
    eprintln!(
        "{m}: built graph has the {} attention sites of torch's export",
        sites(&built).len()
    );
    let blocks = |r: &serde_json::Value| r["blocks"].as_array().unwrap().len();
    assert_eq!(blocks(&built), blocks(&exported), "{m} blocks");
    // Sites are named by module path.
    let anchor = built["attention"][0]["anchor"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(anchor.contains(".attn1"), "{m}: {anchor}");
}

#[test]
fn built_latte_graph_has_the_attention_map_of_the_onnx_export() {
    assert_attention_map_of_the_onnx_export("latte-tiny");
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn built_graphs_have_the_attention_map_of_the_onnx_export() {
    for m in BEYOND_THE_DEMO {
        assert_attention_map_of_the_onnx_export(m);
    }
}

/// `ditc convert DIR` writes a bundle that a second graph (torch's export) agrees with under `verify`,
/// and whose parameters are exactly the checkpoint's tensors.
fn assert_converted_checkpoint_agrees_with_the_exported_graph(m: &str, tmp: &Path) {
    let dir = model_dir(m);
    let out = tmp.join(m);
    let ckpt = dir.join("ckpt");
    let mut args = vec![
        "convert",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ];
    args.extend(shape_flags(m));
    if m == "wan-tiny" {
        // The exported graph's timestep is int64, and verify feeds both graphs the same tensors.
        args.extend(["--timestep-dtype", "int64"]);
    }
    ditc_ok(&args);
    let io = dir.join("io.safetensors");
    let rows: serde_json::Value = serde_json::from_slice(&ditc_ok(&[
        "verify",
        out.join("model.onnx").to_str().unwrap(),
        dir.join("model.onnx").to_str().unwrap(),
        "--inputs",
        io.to_str().unwrap(),
        "--prefix",
        "3.",
        "--tolerance",
        "1e-4",
        "--json",
    ]))
    .unwrap();
    let max_rel = rows[0]["max_rel"].as_f64().unwrap();
    eprintln!("{m}: converted checkpoint vs the exported graph (verify), max_rel {max_rel:.2e}");
    assert!(max_rel <= 1e-4, "{m}: {rows}");
    // The manifest names the checkpoint and the shapes it was built with, and passes the schema.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        ditc::manifest::validate_schema(&manifest),
        Vec::<String>::new(),
        "{m}"
    );
    assert_eq!(manifest["source"]["weights"].as_array().unwrap().len(), 1);
    assert!(manifest["source"]["build"].is_object());
    // Every checkpoint tensor is in the output under its own name, bytes unchanged.
    let model = ditc::onnx::read_model(&out.join("model.onnx")).unwrap();
    let source = Checkpoint::open(&ckpt).unwrap();
    for t in &source.tensors {
        let got = model
            .graph
            .initializer(&t.name)
            .unwrap_or_else(|| panic!("{m}: no {}", t.name));
        assert_eq!(got.raw(), t.raw(), "{m}: {}", t.name);
    }
}

#[test]
fn convert_latte_checkpoint_folder_agrees_with_the_exported_graph() {
    let tmp = tempfile::tempdir().unwrap();
    assert_converted_checkpoint_agrees_with_the_exported_graph("latte-tiny", tmp.path());
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn convert_checkpoint_folder_agrees_with_the_exported_graph() {
    let tmp = tempfile::tempdir().unwrap();
    for m in BEYOND_THE_DEMO {
        assert_converted_checkpoint_agrees_with_the_exported_graph(m, tmp.path());
    }
}

/// Write `tensors` as one safetensors file.
fn write_safetensors(path: &std::path::Path, tensors: &[&ditc::ir::Tensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let shape = t.dims.iter().map(|&d| d as usize).collect();
            let view = safetensors::tensor::TensorView::new(
                t.dtype.to_safetensors().unwrap(),
                shape,
                t.raw().unwrap(),
            )
            .unwrap();
            (t.name.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// A copy of the latte-tiny checkpoint (the demo's) split into three shards with an index.
fn sharded_latte(into: &std::path::Path) {
    let src = demo().join("ckpt");
    let ckpt = Checkpoint::open(&src).unwrap();
    std::fs::create_dir_all(into).unwrap();
    std::fs::copy(src.join("config.json"), into.join("config.json")).unwrap();
    let mut weight_map = serde_json::Map::new();
    // Reverse order across shards, so shard order differs from name order.
    for (i, chunk) in ckpt.tensors.rchunks(60).enumerate() {
        let name = format!("diffusion_pytorch_model-{:05}-of-00003.safetensors", i + 1);
        write_safetensors(&into.join(&name), &chunk.iter().collect::<Vec<_>>());
        for t in chunk {
            weight_map.insert(t.name.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(into.join(ditc::checkpoint::INDEX), index.to_string()).unwrap();
}

/// Sharded and single-file checkpoints with the same tensors give byte-identical graphs and weights,
/// and so do two runs.
#[test]
fn sharded_single_and_repeated_conversions_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let sharded = tmp.path().join("sharded");
    sharded_latte(&sharded);
    assert_eq!(Checkpoint::open(&sharded).unwrap().files.len(), 3);
    let single = demo().join("ckpt");
    let mut outs = Vec::new();
    for (i, src) in [&single, &single, &sharded].iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        ditc_ok(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-progress",
            "--text-len",
            "4",
        ]);
        outs.push(out);
    }
    for f in ["model.onnx", "model.onnx.data"] {
        let first = std::fs::read(outs[0].join(f)).unwrap();
        for out in &outs[1..] {
            assert!(
                first == std::fs::read(out.join(f)).unwrap(),
                "{f} differs: {}",
                out.display()
            );
        }
    }
}

/// A clean refusal (see `common::assert_refused`) that wrote nothing at `out`.
fn assert_refused(args: &[&str], out: &std::path::Path, expect: &[&str]) {
    common::assert_refused(args, expect);
    assert!(!out.exists(), "{} was written", out.display());
}

/// Unknown classes, unknown config keys, and tensors missing, misshapen or unexpected are refused
/// with one error listing them all.
#[test]
fn checkpoints_that_do_not_match_their_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = demo().join("ckpt");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&src).unwrap();
    let out = tmp.path().join("out");
    let convert = |d: &std::path::Path| {
        vec![
            "convert".to_string(),
            d.display().to_string(),
            "-o".into(),
            out.display().to_string(),
            "--text-len".into(),
            "4".into(),
        ]
    };
    let variant = |name: &str, config: &serde_json::Value, drop: &[&str], extra: bool| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        let mut kept: Vec<&ditc::ir::Tensor> = ckpt
            .tensors
            .iter()
            .filter(|t| !drop.contains(&t.name.as_str()))
            .collect();
        let mut stray = ckpt.tensors[0].clone();
        stray.name = "stray.weight".into();
        if extra {
            kept.push(&stray);
        }
        write_safetensors(&d.join(ditc::checkpoint::WEIGHTS), &kept);
        d
    };

    let mut c = config.clone();
    c["_class_name"] = "MochiTransformer3DModel".into();
    let d = variant("class", &c, &[], false);
    let args = convert(&d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(
        &args,
        &out,
        &[
            "MochiTransformer3DModel",
            "LatteTransformer3DModel",
            "WanTransformer3DModel",
        ],
    );

    let mut c = config.clone();
    c["use_rope"] = true.into();
    c["frobnicate"] = 3.into();
    let d = variant("keys", &c, &[], false);
    let args = convert(&d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&args, &out, &["use_rope", "frobnicate"]);

    let d = variant(
        "tensors",
        &config,
        &["transformer_blocks.1.attn1.to_q.weight", "proj_out.bias"],
        true,
    );
    let args = convert(&d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(
        &args,
        &out,
        &[
            "missing tensors (2)",
            "transformer_blocks.1.attn1.to_q.weight",
            "proj_out.bias",
            "unexpected tensors (1)",
            "stray.weight",
        ],
    );

    // A config that disagrees with the weights: 40 caption channels instead of 32.
    let mut c = config.clone();
    c["caption_channels"] = 40.into();
    let d = variant("shapes", &c, &[], false);
    let args = convert(&d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&args, &out, &["tensors of the wrong shape", "caption_projection.linear_1.weight: checkpoint has [64, 32], the config implies [64, 40]"]);

    // A pre-quantized (INT8) tensor where a float weight belongs.
    let d = tmp.path().join("int8");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let int8: Vec<ditc::ir::Tensor> = ckpt
        .tensors
        .iter()
        .map(|t| match t.name.as_str() {
            "proj_out.weight" => {
                let n = t.numel() as usize;
                ditc::ir::Tensor::from_raw(
                    &t.name,
                    ditc::ir::DataType::I8,
                    t.dims.clone(),
                    vec![0u8; n].into(),
                )
                .unwrap()
            }
            _ => t.clone(),
        })
        .collect();
    write_safetensors(
        &d.join(ditc::checkpoint::WEIGHTS),
        &int8.iter().collect::<Vec<_>>(),
    );
    let args = [
        "convert",
        d.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--text-len",
        "4",
    ];
    assert_refused(
        &args,
        &out,
        &[
            "proj_out.weight: dtype",
            "pre-quantized checkpoints are not supported",
        ],
    );

    // Shape options out of range, and Latte's fixed temporal table.
    for (flag, value, expect) in [
        ("--frames", "3", "--frames must be 8"),
        ("--height", "0", "--height 0 is out of range"),
        (
            "--height",
            "15",
            "height 15 is not a multiple of 2 (the patch size)",
        ),
    ] {
        let args = [
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            flag,
            value,
        ];
        assert_refused(&args, &out, &[expect]);
    }
}

/// Two tensors joined along axis 0 (a batch of two cases).
fn stack(a: &ditc::ir::Tensor, b: &ditc::ir::Tensor) -> ditc::ir::Tensor {
    let mut dims = a.dims.clone();
    dims[0] += b.dims[0];
    let mut raw = a.raw().unwrap().to_vec();
    raw.extend_from_slice(b.raw().unwrap());
    ditc::ir::Tensor::from_raw(&a.name, a.dtype, dims, raw.into()).unwrap()
}

/// `--dynamic-batch` leaves the batch axis symbolic; a batch of two cases of fixture `m` gives each
/// case's PyTorch output.
fn assert_dynamic_batch_graph_runs_any_batch(m: &str) {
    let dir = model_dir(m);
    let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let opts = BuildOptions {
        dynamic_batch: true,
        ..fixture_shapes(m)
    };
    let model = build_model(&ckpt, &opts).unwrap();
    let batch = &model.graph.inputs[0].shape().unwrap()[0];
    assert_eq!(batch.to_string(), "batch", "{m}");
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let (a, b) = (case(&io, 1), case(&io, 4));
    let inputs: Vec<ditc::ir::Tensor> = model
        .graph
        .inputs
        .iter()
        .map(|i| stack(named(&a, &i.name), named(&b, &i.name)))
        .collect();
    let inputs = common::in_input_dtypes(&model, &inputs);
    let out = TractRunner::new(&model, &inputs)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let got = named(&out, "sample").to_f32_vec().unwrap();
    let mut want = named(&a, "sample").to_f32_vec().unwrap();
    want.extend(named(&b, "sample").to_f32_vec().unwrap());
    let f = compare(&got, &want);
    eprintln!("{m} dynamic batch of 2: max_rel {:.2e}", f.max_rel);
    assert!(f.max_rel <= 1e-4, "{m}: {}", f.max_rel);
}

#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn dynamic_batch_graphs_run_any_batch() {
    for m in BEYOND_THE_DEMO {
        assert_dynamic_batch_graph_runs_any_batch(m);
    }
}

/// The same for latte-tiny; its bundle's trtexec command profiles the batch range, and static
/// broadcast refuses a dynamic batch.
#[test]
fn dynamic_batch_latte_graph_runs_any_batch_and_profiles_it() {
    assert_dynamic_batch_graph_runs_any_batch("latte-tiny");
    // The manifest's trtexec command builds a profile for batches 1..=4.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dyn");
    let ckpt = demo().join("ckpt");
    ditc_ok(&[
        "convert",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
        "--text-len",
        "4",
        "--dynamic-batch",
        "--batch",
        "4",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let cmd = manifest["tensorrt"]["build_command"].as_str().unwrap();
    assert!(
        cmd.contains(
            "--minShapes='hidden_states':1x4x8x16x16,'timestep':1,'encoder_hidden_states':1x4x32"
        ),
        "{cmd}"
    );
    assert!(
        cmd.contains(
            "--maxShapes='hidden_states':4x4x8x16x16,'timestep':4,'encoder_hidden_states':4x4x32"
        ),
        "{cmd}"
    );
    assert_eq!(manifest["inputs"][0]["shape"][0], "batch");
    // The analysis reads a dynamic-batch graph per batch row; static broadcast needs static shapes.
    assert_eq!(
        manifest["dit_map"]["attention"].as_array().unwrap().len(),
        12
    );
    let pab = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("passes/pab.toml");
    let out = tmp.path().join("dyn-pab");
    let args = [
        "convert",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--text-len",
        "4",
        "--dynamic-batch",
        "--recipe",
        pab.to_str().unwrap(),
    ];
    assert_refused(&args, &out, &["needs static input shapes"]);
}

/// A checkpoint bigger than the free disk space (a sparse file: a patch-embedding conv of 16384 input
/// channels and 1024 x 1024 patches is 4 TiB of holes, taking no disk) is refused before anything is
/// written, with the sizes in the message.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn conversion_that_cannot_fit_on_disk_is_refused_before_writing() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(&dir.join("dit-tiny/ckpt")).unwrap();
    let mut config = src.config.clone();
    config["in_channels"] = 16384.into();
    config["patch_size"] = 1024.into();
    config["sample_size"] = 1024.into();
    let huge: [(&str, Vec<i64>); 3] = [
        ("pos_embed.proj.weight", vec![64, 16384, 1024, 1024]),
        ("proj_out_2.weight", vec![8 << 20, 64]),
        ("proj_out_2.bias", vec![8 << 20]),
    ];
    let ckpt = tmp.path().join("huge");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("config.json"), config.to_string()).unwrap();
    // Small tensors first (their bytes), then the huge ones as holes at the end of the file.
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in src
        .tensors
        .iter()
        .filter(|t| !huge.iter().any(|(n, _)| *n == t.name))
    {
        let raw = t.raw().unwrap();
        header.insert(t.name.clone(), serde_json::json!({"dtype": "F32", "shape": t.dims, "data_offsets": [data.len(), data.len() + raw.len()]}));
        data.extend_from_slice(raw);
    }
    let mut end = data.len() as u64;
    for (name, dims) in &huge {
        let len = 4 * dims.iter().product::<i64>() as u64;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": dims, "data_offsets": [end, end + len]}),
        );
        end += len;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let path = ckpt.join(ditc::checkpoint::WEIGHTS);
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    if let Err(e) = file.set_len(8 + json.len() as u64 + end) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: this filesystem cannot hold a 4 TiB sparse file ({e})"
        );
        return;
    }
    let out = tmp.path().join("out");
    assert_refused(
        &[
            "convert",
            ckpt.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-progress",
        ],
        &out,
        &["not enough disk space", "the output needs 4098."],
    );
}

/// A hostile config case: (fixture, case name, config keys to overwrite, shape flags, expected error).
type HostileConfig<'a> = (&'a str, &'a str, serde_json::Value, &'a [&'a str], &'a str);

/// Each case's patched copy of its fixture's checkpoint ends in a clear error: no panic, no overflow,
/// no huge allocation (each case returns at once), nothing written.
fn assert_hostile_configs_refused(cases: Vec<HostileConfig>) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (model, name, patch, flags, expect) in cases {
        let src = model_dir(model).join("ckpt");
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        std::fs::copy(
            src.join(ditc::checkpoint::WEIGHTS),
            d.join(ditc::checkpoint::WEIGHTS),
        )
        .unwrap();
        let mut args = vec!["convert", d.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(flags);
        assert_refused(&args, &out, &[expect]);
    }
}

/// Hostile numbers in latte-tiny's config.json are refused.
#[test]
fn hostile_latte_configs_are_refused() {
    assert_hostile_configs_refused(vec![
        (
            "latte-tiny",
            "layers",
            serde_json::json!({"num_layers": 1_000_000_000_000i64}),
            &[],
            "\"num_layers\" = 1000000000000 is out of range",
        ),
        (
            "latte-tiny",
            "negative",
            serde_json::json!({"in_channels": -4}),
            &[],
            "\"in_channels\" = -4 is out of range",
        ),
        (
            "latte-tiny",
            "zero patch",
            serde_json::json!({"patch_size": 0}),
            &[],
            "\"patch_size\" = 0 is out of range",
        ),
        (
            "latte-tiny",
            "wide",
            serde_json::json!({"num_attention_heads": 1 << 20, "attention_head_dim": 1 << 20}),
            &[],
            "above the supported inner dim",
        ),
        (
            "latte-tiny",
            "type",
            serde_json::json!({"num_layers": "four"}),
            &[],
            "wrong type",
        ),
    ]);
}

/// Hostile numbers in DiT's and Wan's config.json or the shape options are refused.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hostile_configs_and_shapes_are_refused() {
    assert_hostile_configs_refused(vec![
        (
            "dit-tiny",
            "odd dim",
            serde_json::json!({"num_attention_heads": 3, "attention_head_dim": 5}),
            &[],
            "is not a multiple of 4",
        ),
        (
            "wan-tiny",
            "odd head",
            serde_json::json!({"attention_head_dim": 15}),
            &["--frames", "5", "--height", "16", "--width", "16"],
            "attention_head_dim 15 is not a multiple of 2",
        ),
        (
            "wan-tiny",
            "grid",
            serde_json::json!({}),
            &[
                "--frames", "1048576", "--height", "1048576", "--width", "1048576",
            ],
            "exceeds rope_max_seq_len",
        ),
        (
            "dit-tiny",
            "huge grid",
            serde_json::json!({"sample_size": 1 << 20}),
            &[],
            "elements (limit",
        ),
    ]);
}

/// A BF16 copy of the latte-tiny checkpoint: weights stay BF16 in the graph (cast to f32 inside), the
/// graph runs on CPU close to PyTorch's f32 outputs, and `quantize-w8a8` quantizes its linears from the
/// BF16 values (the BF16 copies of quantized weights leave the bundle).
#[test]
fn bf16_checkpoints_keep_their_dtype_and_quantize() {
    let dir = demo();
    let tmp = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let bf16: Vec<ditc::ir::Tensor> = src
        .tensors
        .iter()
        .map(|t| {
            let raw: Vec<u8> = t
                .to_f32_vec()
                .unwrap()
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect();
            ditc::ir::Tensor::from_raw(
                &t.name,
                ditc::ir::DataType::BF16,
                t.dims.clone(),
                raw.into(),
            )
            .unwrap()
        })
        .collect();
    let ckpt = tmp.path().join("bf16");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::copy(dir.join("ckpt/config.json"), ckpt.join("config.json")).unwrap();
    write_safetensors(
        &ckpt.join(ditc::checkpoint::WEIGHTS),
        &bf16.iter().collect::<Vec<_>>(),
    );

    let opts = BuildOptions {
        text_len: Some(4),
        ..Default::default()
    };
    let model = build_model(&Checkpoint::open(&ckpt).unwrap(), &opts).unwrap();
    assert!(
        model
            .graph
            .initializers
            .iter()
            .filter(|t| t.dtype == ditc::ir::DataType::BF16)
            .count()
            == src.tensors.len()
    );
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let inputs = case(&io, 2);
    let out = TractRunner::new(&model, &inputs)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let f = compare(
        &named(&out, "sample").to_f32_vec().unwrap(),
        &named(&inputs, "sample").to_f32_vec().unwrap(),
    );
    eprintln!(
        "latte-tiny with BF16 weights vs PyTorch f32: rel L2 {:.2e}, cosine {:.6}",
        f.rel_l2, f.cosine
    );
    // BF16 keeps 8 bits of mantissa (relative rounding <= 2^-9 per weight).
    assert!(f.rel_l2 <= 3e-3 && f.cosine >= 0.99999, "{f:?}");

    // W8A8 from the BF16 values.
    let stats = tmp.path().join("stats.json");
    let sampling = dir.join("sampling.safetensors");
    let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("passes/w8a8.toml");
    let c = ckpt.to_str().unwrap();
    let r = recipe.to_str().unwrap();
    ditc_ok(&[
        "calibrate",
        c,
        "--text-len",
        "4",
        "--recipe",
        r,
        "--inputs",
        sampling.to_str().unwrap(),
        "--cases",
        "1",
        "--every",
        "10",
        "-o",
        stats.to_str().unwrap(),
        "--no-progress",
    ]);
    let out = tmp.path().join("w8a8");
    ditc_ok(&[
        "convert",
        c,
        "--text-len",
        "4",
        "--recipe",
        r,
        "--calibration-stats",
        stats.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
        "--target",
        "ampere",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["precision"]["quantized"].as_array().unwrap().len(),
        64,
        "every attention projection and FFN linear"
    );
    let q = ditc::onnx::read_model(&out.join("model.onnx")).unwrap();
    assert!(
        q.graph
            .initializer("transformer_blocks.0.attn1.to_q.weight")
            .is_none(),
        "BF16 source of a quantized weight dropped"
    );
    assert!(q
        .graph
        .initializer("transformer_blocks.0.attn1.to_q.weight.int8")
        .is_some());
}

// wan-small: a trained flow-matching Wan model whose io.safetensors has float32 timesteps that are not
// integers, and whose sampling.json has diffusers' own flow-matching schedule.

/// Shapes of wan-small's io.safetensors and trajectories.
fn wan_small_shapes() -> BuildOptions {
    BuildOptions {
        frames: Some(8),
        height: Some(16),
        width: Some(16),
        text_len: Some(4),
        ..Default::default()
    }
}

/// The Wan graph built from wan-small's checkpoint has a float32 timestep by default and reproduces
/// PyTorch on all five cases (timesteps 999.0, 937.5, 712.25, 404.8125, 23.875) to 1e-4 relative.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn wan_small_float_timesteps_match_pytorch() {
    let dir = common::fixture("wan-small");
    let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let model = build_model(&ckpt, &wan_small_shapes()).unwrap();
    let timestep = model.graph.inputs.iter().find(|i| i.name == "timestep");
    assert_eq!(timestep.unwrap().dtype(), Some(ditc::ir::DataType::F32));
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let t = named(&case(&io, 2), "timestep").to_f32_vec().unwrap();
    assert_eq!(
        t,
        [712.25],
        "the case a rounded timestep could not reproduce"
    );
    common::assert_matches_reference(&model, &io, "wan-small (float32 timestep)");
}

/// Largest relative difference of `got` from `want` (absolute where `want` is 0), and how many are
/// bit-identical.
fn schedule_error(got: &[f64], want: &serde_json::Value) -> (f64, usize) {
    let want: Vec<f64> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    let rel = |(g, w): (&f64, &f64)| (g - w).abs() / if *w == 0.0 { 1.0 } else { w.abs() };
    let max = got.iter().zip(&want).map(rel).fold(0.0, f64::max);
    (max, got.iter().zip(&want).filter(|(g, w)| g == w).count())
}

/// The flow-matching sampler's 50 timesteps and 51 sigmas equal diffusers' own (wan-small's
/// sampling.json, FlowMatchEulerDiscreteScheduler(1000, shift 3)): within 1e-6 relative, and in fact
/// bit-identical; the double shift ends at timestep 8.93.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn flow_schedule_matches_diffusers() {
    let dir = common::fixture("wan-small");
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sampling.json")).unwrap()).unwrap();
    let config: ditc::schedule::SamplerConfig =
        serde_json::from_value(sampling["sampler"].clone()).unwrap();
    let sampler = config.plan().unwrap();
    let sigmas: Vec<f64> = sampler
        .sigmas()
        .unwrap()
        .iter()
        .map(|&s| s as f64)
        .collect();
    let (t_err, t_same) = schedule_error(&sampler.timesteps, &sampling["timesteps"]);
    let (s_err, s_same) = schedule_error(&sigmas, &sampling["sigmas"]);
    eprintln!("flow schedule vs diffusers: timesteps max_rel {t_err:.1e} ({t_same}/50 identical), sigmas max_rel {s_err:.1e} ({s_same}/51 identical)");
    assert!(t_err <= 1e-6 && s_err <= 1e-6, "{t_err} {s_err}");
    // Repeating diffusers' f32/f64 operations gives its values bit for bit (a schedule computed in f64
    // throughout differs by up to 7.4e-8, within the bound above but not the same trajectory).
    assert_eq!((t_same, s_same), (50, 51));
    assert!((sampler.timesteps[49] - 8.9285717).abs() < 1e-6);
}

/// `ditc convert` of wan-small with the flow recipe: the manifest declares the float32 timestep input,
/// finds it as the timestep (`io`), lists diffusers' exact timesteps, and passes the schema.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn wan_small_manifest_has_float_timestep_and_diffusers_schedule() {
    let dir = common::fixture("wan-small");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wan-small");
    let recipe = common::repo_path("passes/pab-flow.toml");
    let manifest = common::convert_wan_small(&dir, &recipe, &[], &out);
    assert_eq!(
        ditc::manifest::validate_schema(&manifest),
        Vec::<String>::new()
    );
    let input = |name: &str| {
        manifest["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(input("timestep")["dtype"], "f32", "{manifest}");
    assert_eq!(manifest["io"]["timestep"], "timestep");
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sampling.json")).unwrap()).unwrap();
    assert_eq!(manifest["sampler"]["timesteps"], sampling["timesteps"]);
    // An ONNX file has its own input types; an unknown type is not guessed.
    let onnx = common::fixtures().join("wan-tiny/model.onnx");
    let bad = tmp.path().join("bad");
    for (dtype, expect) in [
        (
            "float32",
            "--timestep-dtype apply to diffusers checkpoint folders",
        ),
        ("float16", "invalid value 'float16'"),
    ] {
        let args = [
            "convert",
            onnx.to_str().unwrap(),
            "-o",
            bad.to_str().unwrap(),
            "--timestep-dtype",
            dtype,
        ];
        assert_refused(&args, &bad, &[expect]);
    }
}

// hunyuanvideo-tiny: HunyuanVideoTransformer3DModel with random weights (token refiner, 2 dual-stream
// + 2 single-stream blocks, guidance embedding, RoPE axes (4, 6, 6)); its cases mask the last text token.

/// CLI shape flags of hunyuanvideo-tiny's io.safetensors: 3 frames of 8 x 12 latents, 5 text tokens.
const HUNYUAN_TINY_FLAGS: [&str; 8] = [
    "--frames",
    "3",
    "--height",
    "8",
    "--width",
    "12",
    "--text-len",
    "5",
];

/// The graph built from hunyuanvideo-tiny has diffusers' forward inputs (float32 timestep and
/// guidance, int64 mask) and reproduces PyTorch on all five cases to 1e-4 relative. The cases mask
/// the last text token, and the mask matters: unmasking it moves the output by more than ten times
/// the tolerance.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hunyuanvideo_tiny_matches_pytorch() {
    use ditc::ir::DataType;
    let dir = common::fixture("hunyuanvideo-tiny");
    let ckpt = Checkpoint::open(&dir.join("ckpt")).unwrap();
    let model = build_model(&ckpt, &fixture_shapes("hunyuanvideo-tiny")).unwrap();
    let inputs: Vec<(String, Option<DataType>)> = model
        .graph
        .inputs
        .iter()
        .map(|i| (i.name.clone(), i.dtype()))
        .collect();
    let want = [
        ("hidden_states", DataType::F32),
        ("timestep", DataType::F32),
        ("encoder_hidden_states", DataType::F32),
        ("encoder_attention_mask", DataType::I64),
        ("pooled_projections", DataType::F32),
        ("guidance", DataType::F32),
    ];
    let want: Vec<(String, Option<DataType>)> = want
        .iter()
        .map(|(n, d)| (n.to_string(), Some(*d)))
        .collect();
    assert_eq!(inputs, want);
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    common::assert_matches_reference(&model, &io, "hunyuanvideo-tiny");

    let mut case0 = case(&io, 0);
    let mask = case0
        .iter_mut()
        .find(|t| t.name == "encoder_attention_mask")
        .unwrap();
    assert_eq!(mask.to_i64_vec().unwrap(), [1, 1, 1, 1, 0]);
    *mask = ditc::ir::Tensor::from_i64("encoder_attention_mask", vec![1, 5], &[1; 5]);
    let runner = TractRunner::new(&model, &case0).unwrap();
    let out = runner.run(&case0).unwrap();
    let got = named(&out, "sample").to_f32_vec().unwrap();
    let reference = named(&case0, "sample").to_f32_vec().unwrap();
    let moved = compare(&got, &reference).max_rel;
    eprintln!("hunyuanvideo-tiny case 0 with the last token unmasked: max_rel {moved:.2e}");
    assert!(
        moved > 1e-3,
        "unmasking a token barely moved the output ({moved})"
    );
}

/// `ditc inspect` on hunyuanvideo-tiny: the refiner's text self-attention is `cross` (keys from the
/// text), every dual- and single-stream attention over [video, text] is `full`, all traced; one block
/// per refiner, dual-stream and single-stream block.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hunyuanvideo_tiny_attention_map() {
    let ckpt = common::fixture("hunyuanvideo-tiny").join("ckpt");
    let mut args = vec![ckpt.to_str().unwrap()];
    args.extend(HUNYUAN_TINY_FLAGS);
    let report = inspect_json(&args);
    let joint = "b1 q77 k77 h2x16"; // 3 x 4 x 6 video tokens + 5 text tokens, 2 heads of 16
    assert_eq!(
        sites(&report),
        [
            "\"cross\" b1 q5 k5 h2x16".to_string(),
            format!("\"full\" {joint}"),
            format!("\"full\" {joint}"),
            format!("\"full\" {joint}"),
            format!("\"full\" {joint}"),
        ]
    );
    let attention = report["attention"].as_array().unwrap();
    assert!(attention.iter().all(|s| s["traced"] == true), "{report}");
    assert_eq!(
        attention[1]["query_axes"],
        serde_json::json!(["frame", "height", "width", "text"])
    );
    let anchors: Vec<&str> = attention
        .iter()
        .map(|s| s["anchor"].as_str().unwrap())
        .collect();
    assert!(anchors[0].starts_with("context_embedder.token_refiner.refiner_blocks.0.attn"));
    assert!(anchors[1].starts_with("transformer_blocks.0.attn"));
    assert!(anchors[4].starts_with("single_transformer_blocks.1.attn"));
    let blocks: Vec<serde_json::Value> = report["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["ffn"].clone())
        .collect();
    assert_eq!(
        blocks,
        [
            serde_json::json!([
                "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj",
                "context_embedder.token_refiner.refiner_blocks.0.ff.net.2"
            ]),
            serde_json::json!([
                "transformer_blocks.0.ff.net.0.proj",
                "transformer_blocks.0.ff.net.2"
            ]),
            serde_json::json!([
                "transformer_blocks.1.ff.net.0.proj",
                "transformer_blocks.1.ff.net.2"
            ]),
            serde_json::json!([
                "single_transformer_blocks.0.proj_mlp",
                "single_transformer_blocks.0.proj_out"
            ]),
            serde_json::json!([
                "single_transformer_blocks.1.proj_mlp",
                "single_transformer_blocks.1.proj_out"
            ]),
        ]
    );
}

/// `--dynamic-batch` on hunyuanvideo-tiny: a batch of cases 1 and 4 gives each case's PyTorch output
/// (the masks, text pooling and joint-attention key lengths are per row).
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn hunyuanvideo_tiny_dynamic_batch() {
    assert_dynamic_batch_graph_runs_any_batch("hunyuanvideo-tiny");
}
