//! Every kind of emitted manifest validates against `schemas/manifest.schema.json` (with the
//! `jsonschema` crate, as `ditc run` does); the schema itself is a valid JSON Schema 2020-12; bad
//! recipe options are refused before any work.

mod common;

use std::path::Path;

use common::{ditc, ditc_ok, fixtures};
use ditc::manifest::validate_schema;
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

/// The keywords of JSON Schema 2020-12 (core, applicator, validation, meta-data vocabularies).
/// The meta-schema accepts any other key as an extension, so a misspelt keyword (`minItem`) would be
/// silently ignored by every validator: this list catches it.
const KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$ref",
    "$defs",
    "$anchor",
    "$dynamicRef",
    "$dynamicAnchor",
    "$comment",
    "$vocabulary",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "type",
    "const",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "patternProperties",
    "propertyNames",
    "items",
    "prefixItems",
    "contains",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "minProperties",
    "maxProperties",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedItems",
    "unevaluatedProperties",
];

/// Every key of every subschema of `schema` that is not a 2020-12 keyword, with its location.
fn unknown_keywords(schema: &Value, at: &str, out: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        return; // `true` / `false` schemas
    };
    for (key, value) in object {
        if !KEYWORDS.contains(&key.as_str()) {
            out.push(format!("{at}/{key}"));
        }
        match key.as_str() {
            // Maps from names to subschemas.
            "properties" | "$defs" | "patternProperties" | "dependentSchemas" => {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    unknown_keywords(sub, &format!("{at}/{key}/{name}"), out);
                }
            }
            // Lists of subschemas.
            "allOf" | "anyOf" | "oneOf" | "prefixItems" => {
                for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                    unknown_keywords(sub, &format!("{at}/{key}/{i}"), out);
                }
            }
            // One subschema.
            "items"
            | "additionalProperties"
            | "contains"
            | "not"
            | "if"
            | "then"
            | "else"
            | "propertyNames"
            | "unevaluatedItems"
            | "unevaluatedProperties" => unknown_keywords(value, &format!("{at}/{key}"), out),
            _ => {}
        }
    }
}

#[test]
fn the_schema_is_valid_json_schema_2020_12() {
    let schema = schema_json();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let meta = jsonschema::draft202012::meta::validator();
    let errors: Vec<String> = meta
        .iter_errors(&schema)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let mut unknown = Vec::new();
    unknown_keywords(&schema, "#", &mut unknown);
    assert!(unknown.is_empty(), "not JSON Schema keywords: {unknown:?}");
    // The binary embeds this very file.
    assert_eq!(
        serde_json::from_str::<Value>(ditc::manifest::SCHEMA).unwrap(),
        schema
    );
    // Both checks can fail.
    let broken = serde_json::json!({ "type": "objekt", "minItem": 1, "properties": { "a": { "minimum": "1" } } });
    assert!(!meta.is_valid(&broken));
    let mut unknown = Vec::new();
    unknown_keywords(&broken, "#", &mut unknown);
    assert_eq!(unknown, ["#/minItem"]);
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
        let errors = validate_schema(m);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        // The same verdict as a validator built here from the schema file.
        assert!(jsonschema::draft202012::is_valid(&schema, m), "{name}");
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

    // The validator can fail: damaged manifests are caught, each violation named by its path.
    let mut missing = pab.clone();
    missing.as_object_mut().unwrap().remove("state");
    let mut bad_kind = pab.clone();
    bad_kind["state"][0]["group"] = "diagonal".into();
    let mut bad_hash = pab.clone();
    bad_hash["files"][0]["sha256"] = "xyz".into();
    let mut extra = pab.clone();
    extra["cost"]["joules"] = 1.into();
    let mut negative = pab.clone();
    negative["files"][1]["bytes"] = (-1).into();
    // The cost model per site (latte-tiny's 12 sites, BF16): a format other than fp8 / sage is refused.
    assert_eq!(pab["attention_cost"].as_array().unwrap().len(), 12);
    assert_eq!(pab["attention_cost"][0]["quantized_factor"], 1.0);
    let mut bad_format = pab.clone();
    bad_format["attention_cost"][0]["quantized"] = "int4".into();
    let cases = [
        (
            bad_format,
            "$.attention_cost[0].quantized: \"int4\" is not one of",
        ),
        (missing, "$: \"state\" is a required property"),
        (bad_kind, "$.state[0].group: \"diagonal\" is not one of"),
        (bad_hash, "$.files[0].sha256: \"xyz\" does not match"),
        (
            extra,
            "$.cost: Additional properties are not allowed ('joules'",
        ),
        (
            negative,
            "$.files[1].bytes: -1 is less than the minimum of 0",
        ),
    ];
    for (broken, expect) in cases {
        let errors = validate_schema(&broken);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].starts_with(expect), "{errors:#?}");
    }
    // A whole object where a number belongs is named by its kind, not printed.
    let mut object = pab.clone();
    object["cost"]["steps"] = pab["dit_map"].clone();
    let errors = validate_schema(&object);
    assert_eq!(
        errors,
        ["$.cost.steps: an object is not of type \"integer\""]
    );
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
    let errors = validate_schema(&m);
    assert!(errors.is_empty(), "wan: {errors:#?}");
    // The same with classifier-free guidance: calls counted over both branches.
    let m = convert(
        wan.to_str().unwrap(),
        &[
            "--recipe",
            &repo("passes/pab-flow.toml"),
            "--set",
            "sampler.guidance={ scale = 5.0, negative = \"zeros\" }",
        ],
        &tmp.path().join("wan-cfg"),
    );
    assert_eq!(m["sampler"]["guidance"]["input"], "encoder_hidden_states");
    assert_eq!(m["schedule"]["calls"]["full"]["total"], 3 * 50 * 2);
    let errors = validate_schema(&m);
    assert!(errors.is_empty(), "wan-cfg: {errors:#?}");
    // MagCache with guidance on the exporter's graph: one table for both branches, then the
    // unconditional branch with its own (the graph takes ditc.branch).
    let mag_recipe = repo("passes/wan-magcache.toml");
    let mag = |extra: &[&str], out: &str| {
        let mut args = vec![
            "--recipe",
            mag_recipe.as_str(),
            "--set",
            "sampler.guidance.negative=\"zeros\"",
        ];
        args.extend_from_slice(extra);
        convert(wan.to_str().unwrap(), &args, &tmp.path().join(out))
    };
    let m = mag(&[], "wan-mag");
    assert_eq!(m["schedule"]["policy"], "mag-cache");
    assert_eq!(m["state"][0]["group"], "stack");
    assert_eq!(m["schedule"]["calls"]["stack"]["total"], 100);
    let errors = validate_schema(&m);
    assert!(errors.is_empty(), "wan-mag: {errors:#?}");
    let m = mag(
        &["--set", "broadcast-adaptive.mag_ratios_uncond=[2.0]"],
        "wan-mag-branch",
    );
    assert_eq!(m["io"]["branch"], "ditc.branch");
    assert_eq!(
        m["schedule"]["uncond_tables"]["stack"]
            .as_array()
            .unwrap()
            .len(),
        50
    );
    let errors = validate_schema(&m);
    assert!(errors.is_empty(), "wan-mag-branch: {errors:#?}");
}

#[test]
fn bad_options_fail_before_any_work() {
    let recipe = repo("passes/pab.toml");
    // The model does not exist: an option error must come first, so nothing was read.
    let cases: [(&[&str], &str); 9] = [
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
        (
            &[
                "--set",
                "sampler.guidance={ scale = nan, negative = \"zeros\" }",
            ],
            "finite",
        ),
        (
            &["--set", "sampler.guidance={ scale = 5.0 }"],
            "missing field `negative`",
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
