//! Every kind of emitted manifest validates against `schemas/manifest.schema.json`; bad recipe options
//! are refused before any work.

mod common;

use std::path::Path;

use common::{ditc, ditc_ok, fixtures, schema};
use serde_json::Value;

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .to_str()
        .unwrap()
        .to_string()
}

fn schema_json() -> Value {
    serde_json::from_slice(&std::fs::read(repo("schemas/manifest.schema.json")).unwrap()).unwrap()
}

fn convert(model: &str, extra: &[&str], out: &Path) -> Value {
    let mut args = vec![
        "convert",
        model,
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    ditc_ok(&args);
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn emitted_manifests_match_the_schema() {
    let schema = schema_json();
    let tmp = tempfile::tempdir().unwrap();
    let demo = repo("examples/latte-tiny/model.onnx");
    let recipe = repo("passes/pab.toml");
    let manifests = vec![
        ("plain", convert(&demo, &[], &tmp.path().join("plain"))),
        (
            "pab",
            convert(&demo, &["--recipe", &recipe], &tmp.path().join("pab")),
        ),
    ];
    for (name, m) in &manifests {
        let errors = schema::validate(&schema, m);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
    let pab = &manifests[1].1;
    // 12 attention sites + the MLPs of all 8 blocks (spatial and temporal blocks 0-3 of 0-4 listed).
    assert_eq!(pab["state"].as_array().unwrap().len(), 20);
    assert_eq!(pab["schedule"]["blocks"].as_array().unwrap().len(), 8);
    // 5 key timesteps x 2 reused steps.
    assert_eq!(pab["schedule"]["calls"]["mlp"]["computed"], 8 * 40);
    assert_eq!(pab["io"]["step"], "ditc.step");
    // Latte preset: spatial 2, temporal 3, cross 6 in (100, 800) over 50 leading DDIM steps.
    assert_eq!(pab["schedule"]["calls"]["spatial"]["computed"], 4 * 33);
    assert_eq!(pab["schedule"]["calls"]["temporal"]["computed"], 4 * 27);
    assert_eq!(pab["schedule"]["calls"]["cross"]["computed"], 4 * 22);

    // The validator can fail: damaged manifests are caught.
    let mut missing = pab.clone();
    missing.as_object_mut().unwrap().remove("state");
    let mut bad_kind = pab.clone();
    bad_kind["state"][0]["group"] = "diagonal".into();
    let mut bad_hash = pab.clone();
    bad_hash["files"][0]["sha256"] = "xyz".into();
    for broken in [missing, bad_kind, bad_hash] {
        assert!(!schema::validate(&schema, &broken).is_empty());
    }
}

/// Wan (flow-matching sampler, joint attention on the CogVideoX preset): its manifest matches the
/// schema too.
#[test]
#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]
fn flow_matching_manifest_matches_the_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let wan = fixtures().join("wan-tiny/model.dynamo.onnx");
    let m = convert(
        wan.to_str().unwrap(),
        &["--recipe", &repo("passes/pab-flow.toml")],
        &tmp.path().join("wan"),
    );
    assert_eq!(
        m["state"].as_array().unwrap().len(),
        6,
        "3 full + 3 cross sites baked"
    );
    assert_eq!(m["io"]["timestep"], "timestep");
    let errors = schema::validate(&schema_json(), &m);
    assert!(errors.is_empty(), "wan: {errors:#?}");
}

#[test]
fn bad_options_fail_before_any_work() {
    let recipe = repo("passes/pab.toml");
    // The model does not exist: an option error must come first, so nothing was read.
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "--set",
                "broadcast-static.diagonal={ period = 2, window = [1, 2] }",
            ],
            "unknown field",
        ),
        (&["--set", "broadcast-static.spatial.period=0"], "period"),
        (
            &["--set", "broadcast-static.cross.window=[800, 100]"],
            "inverted",
        ),
        (&["--set", "sampler.steps=0"], "steps"),
        (&["--set", "sampler.steps=2000"], "steps"),
        (&["--set", "nonsense.steps=3"], "unknown option root"),
        (
            &[
                "--set",
                "broadcast-static.mlp={ timesteps = [720], blocks = [], reuse = 2 }",
            ],
            "at least one block",
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (sets, expect) in cases {
        let out = tmp.path().join("out");
        let mut args = vec![
            "convert",
            "/nonexistent/model.onnx",
            "--recipe",
            &recipe,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(sets);
        let r = ditc(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{sets:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{sets:?}: expected '{expect}' in {stderr}"
        );
        assert!(
            !stderr.contains("nonexistent"),
            "{sets:?}: the model was opened before the options were checked"
        );
        assert!(!out.exists());
    }
    let r = ditc(&[
        "convert",
        "/nonexistent/model.onnx",
        "--recipe",
        "/nonexistent/recipe.toml",
        "-o",
        "x",
    ]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("recipe"));
}

#[test]
fn dump_after_writes_the_graph_after_a_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("b");
    convert(
        &repo("examples/latte-tiny/model.onnx"),
        &[
            "--recipe",
            &repo("passes/pab.toml"),
            "--dump-after",
            "broadcast-static",
        ],
        &out,
    );
    let dumped = ditc::onnx::read_model(&out.join("after-broadcast-static.onnx")).unwrap();
    let ifs = dumped
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "If")
        .count();
    assert_eq!(ifs, 20, "12 attention sites + 8 MLPs baked");
}
