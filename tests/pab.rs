//! Static attention broadcast end to end on the trained latte-tiny: the runtime's DDIM trajectories
//! against diffusers' (full and with diffusers' PyramidAttentionBroadcast), decision by decision.

mod common;

use std::path::Path;

use common::{ditc_ok, fixtures};
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

fn convert(dir: &Path, out: &Path, sets: &[String]) {
    let model = dir.join("latte-tiny/model.onnx");
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
        no_progress: true,
        no_verify: false,
        shapes: Default::default(),
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
    let Some(dir) = fixtures() else { return };
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("latte-tiny/sampling.json")).unwrap())
            .unwrap();
    let inputs = dir.join("latte-tiny/sampling.safetensors");
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
    convert(&dir, &full, &ones);
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
        convert(&dir, &out, &sets);
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
        }
    }
}

/// MLP broadcast (PAB's Latte config): at each key timestep the listed blocks' MLPs compute, then
/// are reused for the next `reuse` steps. diffusers has no MLP broadcast, so the reference here is the
/// rule itself, written out over the recorded timesteps, plus the full trajectory for the forced run.
#[test]
fn mlp_broadcast_reuses_after_key_timesteps() {
    let Some(dir) = fixtures() else { return };
    let sampling: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("latte-tiny/sampling.json")).unwrap())
            .unwrap();
    let timesteps: Vec<i64> = sampling["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    let inputs = dir.join("latte-tiny/sampling.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlp");
    convert(&dir, &out, &["broadcast-static.mlp={ timesteps = [720, 640, 560, 480, 400], blocks = [0, 1], reuse = 2 }".to_string()]);
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
        no_progress: true,
        no_verify: false,
        shapes: Default::default(),
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
