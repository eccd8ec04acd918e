//! Drift profiling (`ditc calibrate --profile`), TeaCache fitting (`--fit-teacache`) and the decision
//! timeline (`ditc run --plot`) on wan-small with classifier-free guidance.
//!
//! The profile's values are checked against computations that do not go through it: the metric
//! first-block-cache's graph computes and `--trace` reports (a bundle that computes every step, so its
//! reference is always the previous step), and Wan's timestep embedding evaluated in f64 from the
//! checkpoint's weights. The fitted polynomial is checked by the least-squares optimality condition
//! (the residual is orthogonal to every power of the indicator) and by `convert` taking the preset.
//! The pictures are parsed as SVG; the timeline's cells are read back and compared with the trace.

mod common;

use std::path::Path;

use common::{
    assert_refused, calibrate_args, convert_wan_small, ditc_ok, repo_path, run_args, strs,
};
use serde_json::Value;

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `profile["quantities"][name]["values"][branch][0]` (case 0) as numbers, null as None.
fn series(profile: &Value, name: &str, branch: &str) -> Vec<Option<f64>> {
    let q = profile["quantities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("no quantity {name}"));
    q["values"][branch][0]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// `mean|a - b| / mean|b|` in f64.
fn rel_l1(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum();
    d / b.iter().map(|y| (*y as f64).abs()).sum::<f64>()
}

#[test]
fn the_profile_matches_first_block_cache_and_the_embedding_and_the_fit_is_least_squares() {
    let tmp = tempfile::tempdir().unwrap();
    let profile_path = tmp.path().join("p").join("profile.json");
    let preset = tmp.path().join("tea.toml");
    ditc_ok(&strs(&calibrate_args(
        &profile_path,
        &["--fit-teacache", preset.to_str().unwrap()],
    )));
    let profile = read_json(&profile_path);
    assert_eq!(profile["format"], "ditc-profile");
    assert_eq!(profile["steps"], 50);
    let schema: Value = serde_json::from_str(ditc::calibration::profile::PROFILE_SCHEMA).unwrap();
    let validator = jsonschema::draft202012::options()
        .build(&schema)
        .expect("the profile schema is valid");
    let violations: Vec<String> = validator
        .iter_errors(&profile)
        .map(|e| e.to_string())
        .collect();
    assert!(violations.is_empty(), "{violations:?}");
    // The schema is not a no-op: a profile with an unknown measure is refused.
    let mut bad = profile.clone();
    bad["quantities"][0]["measure"] = "l2".into();
    assert!(!validator.is_valid(&bad));

    // 1. First-block residual vs first-block-cache's own metric, threshold 0: every call computes, so
    // the graph compares each step's head residual with the previous step's.
    let example = repo_path("examples/wan-small");
    let bundle = tmp.path().join("fbc");
    let manifest = convert_wan_small(
        &example,
        &repo_path("passes/fbc-wan-cfg.toml"),
        &["broadcast-adaptive.threshold=0"],
        &bundle,
    );
    assert_eq!(manifest["schedule"]["policy"], "first-block-cache");
    let trace_path = tmp.path().join("trace.json");
    ditc_ok(&strs(&run_args(
        &bundle.join("manifest.json"),
        &example.join("inputs.safetensors"),
        "0.",
        &tmp.path().join("s.safetensors"),
        &["--trace", trace_path.to_str().unwrap()],
    )));
    let trace = read_json(&trace_path);
    let mut worst = 0f64;
    for branch in ["cond", "uncond"] {
        let profiled = series(&profile, "first_block_residual", branch);
        assert_eq!(profiled[0], None, "step 0 has no previous step");
        for (i, step) in trace["steps"].as_array().unwrap().iter().enumerate() {
            let call = &step[branch];
            assert_eq!(
                call["computed"], true,
                "{branch} step {i}: threshold 0 computes"
            );
            if i == 0 {
                continue;
            }
            let metric = call["metric"].as_f64().unwrap();
            let p = profiled[i].unwrap();
            worst = worst.max((p - metric).abs() / metric.abs());
        }
    }
    println!("first_block_residual vs first-block-cache's traced metric: worst relative difference {worst:.2e}");
    assert!(worst < 1e-4, "{worst:.2e}");

    // 2. Wan's timestep embedding: its change vs the embedding computed in f64 from the weights (the
    // same for both branches).
    let options = ditc::models::BuildOptions {
        frames: Some(8),
        height: Some(16),
        width: Some(16),
        text_len: Some(4),
        ..Default::default()
    };
    let model = ditc::models::read_model_or_checkpoint(&example.join("ckpt"), &options).unwrap();
    let timesteps: Vec<f64> = profile["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap() as f32 as f64) // the model is fed f32 timesteps
        .collect();
    let e = ditc::schedule::tea_cache::wan_indicators(&model, &timesteps, false).unwrap();
    let mut worst = 0f64;
    for branch in ["cond", "uncond"] {
        let profiled = series(&profile, "timestep_embedding", branch);
        for i in 1..50 {
            let want = rel_l1(&e[i], &e[i - 1]);
            worst = worst.max((profiled[i].unwrap() - want).abs() / want);
        }
    }
    println!("timestep_embedding vs the f64 embedding from the weights: worst relative difference {worst:.2e}");
    assert!(worst < 1e-3, "{worst:.2e}");

    // 3. AdaCache's motion at the first call (cond, step 0): the gated self-attention residual of the
    // middle block read by a separate run of the graph, and MoReg's formula worked here over its 8
    // frames of 64 tokens x 128 channels.
    let inputs = ditc::tensors::read_safetensors(&example.join("inputs.safetensors")).unwrap();
    let inputs = common::case(&inputs, 0);
    let feed = vec![
        ditc::ir::Tensor {
            name: "hidden_states".into(),
            ..common::named(&inputs, "noise").clone()
        },
        common::named(&inputs, "encoder_hidden_states").clone(),
        ditc::ir::Tensor::from_f32("timestep", vec![1], &[1000.0]),
    ];
    let gate = "blocks.3.attn1/gate";
    let r = &common::run_with_probes(&model, &feed, &[gate])[gate];
    assert_eq!(r.len(), 512 * 128);
    let frame = 64 * 128;
    let (mut diff, mut norms) = (0f64, 0f64);
    for i in frame..r.len() {
        let (a, b) = (r[i] as f64, r[i - frame] as f64);
        diff += (a - b).abs();
        norms += a.abs() + b.abs();
    }
    let motion = series(&profile, "mid_block_motion", "cond")[0].unwrap();
    println!(
        "mid_block_motion at step 0: {motion:.6} (profile) vs {:.6} (recomputed)",
        diff / norms
    );
    assert!(
        (motion - diff / norms).abs() <= 1e-5 * motion,
        "{motion} vs {}",
        diff / norms
    );

    // 4. The fit: least squares means the residual is orthogonal to x^k for every k <= degree,
    // checked here on the profile's pairs (both branches, steps 1..49).
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for branch in ["cond", "uncond"] {
        let ind = series(&profile, "timestep_embedding", branch);
        let out = series(&profile, "output", branch);
        for (a, b) in ind.iter().zip(&out) {
            if let (Some(a), Some(b)) = (a, b) {
                x.push(*a);
                y.push(*b);
            }
        }
    }
    assert_eq!(x.len(), 98);
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(&preset).unwrap()).unwrap();
    assert_eq!(table["policy"].as_str(), Some("tea-cache"));
    assert_eq!(table["use_ret_steps"].as_bool(), Some(false));
    let c: Vec<f64> = table["coefficients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_float().unwrap())
        .collect();
    assert_eq!(c.len(), 5);
    let poly = |v: f64| c.iter().fold(0.0, |acc, k| acc * v + k);
    let residual: Vec<f64> = x.iter().zip(&y).map(|(a, b)| b - poly(*a)).collect();
    for k in 0..5 {
        let dot: f64 = x.iter().zip(&residual).map(|(a, r)| a.powi(k) * r).sum();
        let scale: f64 = x.iter().zip(&y).map(|(a, b)| (a.powi(k) * b).abs()).sum();
        assert!(dot.abs() <= 1e-9 * scale, "x^{k}: {dot:e} vs {scale:e}");
    }
    let sse: f64 = residual.iter().map(|r| r * r).sum();
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let sst: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    println!(
        "fitted TeaCache coefficients {c:?}: R^2 {:.4} on {} pairs",
        1.0 - sse / sst,
        x.len()
    );

    // The preset is one `policy = "tea-cache"` takes.
    let recipe = tmp.path().join("tea-recipe.toml");
    let cfg = std::fs::read_to_string(repo_path("passes/wan-cfg.toml")).unwrap();
    std::fs::write(
        &recipe,
        format!(
            "{cfg}\n[[passes]]\nname = \"broadcast-adaptive\"\npreset = {:?}\n",
            preset.to_str().unwrap()
        ),
    )
    .unwrap();
    let tea = convert_wan_small(&example, &recipe, &[], &tmp.path().join("tea"));
    assert_eq!(tea["schedule"]["policy"], "tea-cache");

    // 5. The picture: SVG, a legend entry per quantity in each branch's panel.
    let svg = std::fs::read_to_string(profile_path.with_file_name("profile.drift.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the drift picture parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect();
    let names: Vec<&str> = profile["quantities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        // The name, or the name with a note where nothing could be drawn (a log axis shows no 0).
        let n = texts
            .iter()
            .filter(|t| *t == name || t.starts_with(&format!("{name} (")))
            .count();
        assert_eq!(n, 2, "legend entries for {name} (one per branch)");
    }
}

/// A run's timeline read back from the SVG: the cells of each row, top to bottom, left to right
/// (true where drawn in the computed colour).
fn timeline_cells(svg: &str) -> Vec<Vec<bool>> {
    let doc = roxmltree::Document::parse(svg).expect("the timeline parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let mut cells: Vec<(i64, i64, bool)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect"))
        .filter_map(|n| {
            let computed = match n.attribute("fill")? {
                "#1F77B4" => true,
                "#FFB347" => false,
                _ => return None,
            };
            let at = |a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap() as i64;
            Some((at("y"), at("x"), computed))
        })
        .collect();
    cells.sort();
    let mut rows: Vec<Vec<bool>> = Vec::new();
    let mut last_y = None;
    for (y, _, c) in cells {
        if last_y != Some(y) {
            rows.push(Vec::new());
            last_y = Some(y);
        }
        rows.last_mut().unwrap().push(c);
    }
    rows
}

#[test]
fn the_timeline_of_a_magcache_run_shows_the_traced_decisions() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo_path("examples/wan-small");
    let bundle = tmp.path().join("mag");
    convert_wan_small(
        &example,
        &repo_path("passes/wan-magcache.toml"),
        &[],
        &bundle,
    );
    let (trace_path, plot) = (tmp.path().join("t.json"), tmp.path().join("timeline.svg"));
    ditc_ok(&strs(&run_args(
        &bundle.join("manifest.json"),
        &example.join("inputs.safetensors"),
        "0.",
        &tmp.path().join("s.safetensors"),
        &[
            "--trace",
            trace_path.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ],
    )));
    let trace = read_json(&trace_path);
    let svg = std::fs::read_to_string(&plot).unwrap();
    let rows = timeline_cells(&svg);
    // One row per branch: the stack (which carries every site).
    assert_eq!(rows.len(), 2, "rows: {rows:?}");
    let mut reused = 0;
    for (row, branch) in rows.iter().zip(["cond", "uncond"]) {
        let want: Vec<bool> = trace["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[branch]["groups"]["stack"].as_bool().unwrap())
            .collect();
        assert_eq!(row, &want, "{branch}");
        reused += want.iter().filter(|c| !**c).count();
    }
    assert!(reused > 0, "the run must reuse the stack somewhere");
    assert!(svg.contains("cond stack (12 sites)") && svg.contains("uncond stack (12 sites)"));
}

/// latte-tiny with Latte's PAB preset (no guidance): a row per attention kind and the MLP, then one
/// per site, then one per block's MLP, each equal to what the run decided.
#[test]
fn the_timeline_of_a_pab_run_has_a_row_per_group_site_and_mlp() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("pab");
    let model = repo_path("examples/latte-tiny/model.onnx");
    ditc_ok(&[
        "convert",
        model.to_str().unwrap(),
        "--recipe",
        repo_path("passes/pab.toml").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--no-progress",
    ]);
    let manifest = read_json(&bundle.join("manifest.json"));
    let (trace_path, plot) = (tmp.path().join("t.json"), tmp.path().join("timeline.svg"));
    ditc_ok(&strs(&run_args(
        &bundle.join("manifest.json"),
        &repo_path("examples/latte-tiny/sampling.safetensors"),
        "0.",
        &tmp.path().join("s.safetensors"),
        &[
            "--trace",
            trace_path.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ],
    )));
    let trace = read_json(&trace_path);
    let rows = timeline_cells(&std::fs::read_to_string(&plot).unwrap());
    let group = |g: &str| -> Vec<bool> {
        trace["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["cond"]["groups"][g].as_bool().unwrap())
            .collect()
    };
    // Groups in their order (spatial, temporal, cross, mlp), then sites by id, then MLPs by block.
    let groups = ["spatial", "temporal", "cross", "mlp"];
    let sites = &manifest["schedule"]["sites"];
    let mut want: Vec<Vec<bool>> = groups.iter().map(|g| group(g)).collect();
    let kind_of = |id: u64| {
        groups[..3]
            .iter()
            .find(|g| sites[**g].as_array().unwrap().iter().any(|s| s == id))
            .unwrap()
    };
    let site_count: u64 = groups[..3]
        .iter()
        .map(|g| sites[*g].as_array().unwrap().len() as u64)
        .sum();
    want.extend((0..site_count).map(|id| group(kind_of(id))));
    let blocks = manifest["schedule"]["blocks"].as_array().unwrap().len();
    want.extend((0..blocks).map(|_| group("mlp")));
    assert_eq!(rows.len(), 4 + 12 + 8, "rows: {}", rows.len());
    assert_eq!(rows, want);
    assert!(want.iter().flatten().any(|c| !c), "PAB reuses something");
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p.json");
    // A case the inputs file does not have.
    let mut args = calibrate_args(&out, &[]);
    let at = args.iter().position(|a| a == "--cases").unwrap();
    args[at + 1] = "9".into();
    assert_refused(&strs(&args), &["case 9", "no tensors named '9."]);
    // An output folder that cannot be made (a file is in the way).
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let args = calibrate_args(&blocker.join("p.json"), &[]);
    assert_refused(&strs(&args), &["cannot create", "file"]);
    // An indicator the model does not have, a degree the data cannot determine.
    let fit = tmp.path().join("t.toml");
    let args = calibrate_args(
        &out,
        &[
            "--fit-teacache",
            fit.to_str().unwrap(),
            "--fit-indicator",
            "nope",
        ],
    );
    assert_refused(
        &strs(&args),
        &["--fit-indicator nope", "timestep_embedding"],
    );
    // A polynomial of more coefficients than the 49 distinct indicator changes: refused after the
    // run, before anything is written.
    let args = calibrate_args(
        &out,
        &[
            "--fit-teacache",
            fit.to_str().unwrap(),
            "--fit-degree",
            "60",
        ],
    );
    assert_refused(&strs(&args), &["61 distinct", "49"]);
    // Fit options without a fit.
    assert_refused(
        &strs(&calibrate_args(&out, &["--fit-degree", "3"])),
        &["--fit-degree", "--fit-teacache"],
    );
    // Options of the range calibration.
    assert_refused(
        &strs(&calibrate_args(&out, &["--every", "2"])),
        &["--every", "--profile"],
    );
    for p in [&out, &fit, &tmp.path().join("p.drift.svg")] {
        assert!(!p.exists(), "{} was written", p.display());
    }
}
