//! `ditc run` checks a bundle before using it: the manifest against its schema, then every listed
//! file's place (inside the bundle folder), presence, size and SHA-256. Each kind of damage is refused
//! with exit 2, an error naming the file and the reason, and no output.
//!
//! One demo bundle (examples/latte-tiny, PAB recipe, few steps) is converted per test process and copied
//! before each damage.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{assert_refused, ditc_ok};
use serde_json::Value;

/// Few sampling steps keep each `ditc run` well under a second; 25 keeps the preset's MLP timesteps.
const STEPS: &str = "sampler.steps=25";

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .to_str()
        .unwrap()
        .to_string()
}

fn convert(out: &Path, sets: &[&str]) {
    let mut args = vec![
        "convert".to_string(),
        repo("examples/latte-tiny/model.onnx"),
        "--recipe".into(),
        repo("passes/pab.toml"),
        "-o".into(),
        out.to_str().unwrap().into(),
        "--no-progress".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ditc_ok(&args);
}

/// The bundles every test copies from, converted once: `pab` (the one damaged), `plain` (no
/// schedule: another graph) and `period3` (spatial period 3: the same graph with other tables).
fn originals() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // A static is never dropped, so a temporary folder would stay behind after every run: use one
        // fixed folder under target/ instead, made afresh by each run.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bundle-integrity");
        let _ = std::fs::remove_dir_all(&dir);
        convert(&dir.join("pab"), &[STEPS]);
        convert(
            &dir.join("period3"),
            &[STEPS, "broadcast-static.spatial.period=3"],
        );
        ditc_ok(&[
            "convert",
            &repo("examples/latte-tiny/model.onnx"),
            "-o",
            dir.join("plain").to_str().unwrap(),
            "--no-progress",
        ]);
        dir
    })
}

/// A fresh copy of an original bundle, in its own temporary folder.
struct BundleCopy {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl BundleCopy {
    fn of(name: &str) -> BundleCopy {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bundle");
        std::fs::create_dir(&dir).unwrap();
        for entry in std::fs::read_dir(originals().join(name)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        BundleCopy { _tmp: tmp, dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn manifest(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.file("manifest.json")).unwrap()).unwrap()
    }

    /// The undamaged manifest (from the original bundle).
    fn manifest_of_original(&self) -> Value {
        serde_json::from_slice(&std::fs::read(originals().join("pab/manifest.json")).unwrap())
            .unwrap()
    }

    fn set_manifest(&self, m: &Value) {
        std::fs::write(
            self.file("manifest.json"),
            serde_json::to_vec_pretty(m).unwrap(),
        )
        .unwrap();
    }

    fn output(&self) -> PathBuf {
        self.dir.join("sample.safetensors")
    }

    fn run_args(&self, extra: &[&'static str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            self.file("manifest.json").to_str().unwrap(),
            "--inputs",
            &repo("examples/latte-tiny/sampling.safetensors"),
            "--prefix",
            "0.",
            "-o",
            self.output().to_str().unwrap(),
            "--no-progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn runs(&self, extra: &[&'static str]) {
        let args = self.run_args(extra);
        ditc_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(self.output().is_file(), "no output written");
    }

    /// `ditc run` exits 2 with every string of `expect` in its error, and writes nothing.
    fn refused(&self, extra: &[&'static str], expect: &[&str]) -> String {
        let args = self.run_args(extra);
        let err = assert_refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), expect);
        assert!(!self.output().exists(), "output written despite: {err}");
        err
    }
}

fn truncate(path: &Path, drop_bytes: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - drop_bytes).unwrap();
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn intact_bundle_runs() {
    let b = BundleCopy::of("pab");
    let m = b.manifest();
    let files: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["model.onnx", "model.onnx.data"]);
    b.runs(&[]);
    let sample = ditc::tensors::read_safetensors(&b.output()).unwrap();
    assert_eq!(sample[0].name, "sample");
    assert_eq!(sample[0].dims, [1, 4, 8, 16, 16]);
}

#[test]
fn truncated_file_is_refused() {
    let b = BundleCopy::of("pab");
    let data = b.file("model.onnx.data");
    let size = std::fs::metadata(&data).unwrap().len();
    truncate(&data, 100);
    let err = b.refused(
        &[],
        &[
            "model.onnx.data",
            &format!("size {} bytes, manifest says {size}", size - 100),
            "truncated or replaced?",
        ],
    );
    assert!(!err.contains("SHA-256"), "sizes come before hashes: {err}");
}

#[test]
fn flipped_byte_is_refused() {
    let b = BundleCopy::of("pab");
    let data = b.file("model.onnx.data");
    let want = b.manifest()["files"][1]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    flip_byte(&data, 1000);
    let got = ditc::output::sha256_file(&data).unwrap();
    b.refused(
        &[],
        &[
            "model.onnx.data",
            &format!("SHA-256 {got} does not match the manifest's {want}"),
            "damaged or swapped",
        ],
    );
}

#[test]
fn swapped_graph_is_refused() {
    // Another bundle's graph with another size (no schedule): caught by the size.
    let b = BundleCopy::of("pab");
    std::fs::copy(originals().join("plain/model.onnx"), b.file("model.onnx")).unwrap();
    b.refused(
        &[],
        &["model.onnx'", "manifest says", "truncated or replaced?"],
    );
    // The same graph with other schedule tables: same size, so only the hash can tell.
    let b = BundleCopy::of("pab");
    let other = originals().join("period3/model.onnx");
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(
        len(&other),
        len(&b.file("model.onnx")),
        "premise: same size"
    );
    assert_ne!(
        std::fs::read(&other).unwrap(),
        std::fs::read(b.file("model.onnx")).unwrap(),
        "premise: other contents"
    );
    std::fs::copy(&other, b.file("model.onnx")).unwrap();
    b.refused(&[], &["model.onnx'", "SHA-256", "damaged or swapped"]);
}

#[test]
fn missing_file_is_refused() {
    let b = BundleCopy::of("pab");
    std::fs::remove_file(b.file("model.onnx.data")).unwrap();
    b.refused(
        &[],
        &[
            "model.onnx.data",
            "missing from the bundle (the manifest lists it)",
        ],
    );
}

#[test]
fn manifest_violating_the_schema_is_refused_with_every_violation() {
    let b = BundleCopy::of("pab");
    let mut m = b.manifest();
    m["cost"]["steps"] = "twenty-five".into(); // wrong type
    m["io"].as_object_mut().unwrap().remove("latent"); // missing required field
    m["sampler"]["config"]["kind"] = "euler_ancestral".into(); // unknown enum value
    m["files"][0]["sha256"] = "xyz".into(); // not a SHA-256
    b.set_manifest(&m);
    b.refused(
        &[],
        &[
            "manifest.json' is not a ditc manifest: 4 violation(s)",
            "$.cost.steps: \"twenty-five\" is not of type \"integer\"",
            "$.io: \"latent\" is a required property",
            "$.sampler.config.kind: \"euler_ancestral\" is not one of",
            "$.files[0].sha256: \"xyz\" does not match",
        ],
    );
    // One at a time too: each alone is enough.
    let damages: [fn(&mut Value); 3] = [
        |m: &mut Value| m["cost"]["steps"] = "twenty-five".into(),
        |m: &mut Value| {
            m.as_object_mut().unwrap().remove("files");
        },
        |m: &mut Value| m["state"][0]["group"] = "diagonal".into(),
    ];
    for damage in damages {
        let b = BundleCopy::of("pab");
        let mut m = b.manifest();
        damage(&mut m);
        b.set_manifest(&m);
        b.refused(&[], &["not a ditc manifest: 1 violation(s)"]);
    }
    // Not JSON at all, and a manifest of another version.
    let b = BundleCopy::of("pab");
    std::fs::write(b.file("manifest.json"), "{ \"format\": ").unwrap();
    b.refused(&[], &["manifest.json' is not a ditc manifest: not JSON"]);
    let mut m = b.manifest_of_original();
    m["version"] = 2.into();
    b.set_manifest(&m);
    b.refused(
        &[],
        &["version 2 (this ditc reads 'ditc-manifest' version 1)"],
    );
}

#[test]
fn file_paths_leaving_the_bundle_are_refused() {
    // Each path names a file with exactly the listed size and SHA-256, so only the path is wrong.
    let b = BundleCopy::of("pab");
    let outside = b.dir.parent().unwrap().join("x");
    std::fs::copy(b.file("model.onnx.data"), &outside).unwrap();
    let absolute = b.file("model.onnx.data").to_str().unwrap().to_string();
    for (path, why) in [
        ("../x", "contains '..': it would leave the bundle folder"),
        ("sub/../../x", "contains '..'"),
        (absolute.as_str(), "is absolute"),
    ] {
        let mut m = b.manifest_of_original();
        m["files"][1]["path"] = path.into();
        b.set_manifest(&m);
        b.refused(
            &[],
            &["manifest.json'", &format!("files[1].path '{path}'"), why],
        );
    }
}

#[test]
fn no_verify_skips_only_the_hash() {
    // A flipped byte goes unnoticed without the hash...
    let b = BundleCopy::of("pab");
    flip_byte(&b.file("model.onnx.data"), 1000);
    b.runs(&["--no-verify"]);
    // ...a truncated file, a missing file and a schema violation do not.
    let b = BundleCopy::of("pab");
    truncate(&b.file("model.onnx.data"), 1);
    b.refused(
        &["--no-verify"],
        &["model.onnx.data", "truncated or replaced?"],
    );
    let b = BundleCopy::of("pab");
    std::fs::remove_file(b.file("model.onnx")).unwrap();
    b.refused(
        &["--no-verify"],
        &["model.onnx'", "missing from the bundle"],
    );
    let b = BundleCopy::of("pab");
    let mut m = b.manifest();
    m["files"][1]["path"] = "../x".into();
    b.set_manifest(&m);
    b.refused(&["--no-verify"], &["files[1].path '../x'"]);
    // And the option is documented.
    let help = String::from_utf8(ditc_ok(&["run", "--help"])).unwrap();
    assert!(help.contains("--no-verify"), "{help}");
    assert!(help.contains("sizes are always checked"), "{help}");
}

/// A listed file that is a symbolic link (here to an identical copy outside the bundle, so size and
/// hash match) is refused: nothing outside the bundle folder is read.
#[test]
fn symlinked_file_is_refused() {
    let b = BundleCopy::of("pab");
    let outside = b.dir.parent().unwrap().join("outside.onnx.data");
    std::fs::rename(b.file("model.onnx.data"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, b.file("model.onnx.data")).unwrap();
    b.refused(&[], &["model.onnx.data", "a symbolic link"]);
}

/// A hand-edited manifest whose schedule table is shorter than the sampler's steps is refused before
/// sampling (it used to index past the table's end).
#[test]
fn schedule_table_of_the_wrong_length_is_refused() {
    let b = BundleCopy::of("pab");
    let mut m = b.manifest();
    let table = m["schedule"]["tables"]["spatial"].as_array_mut().unwrap();
    table.truncate(10);
    b.set_manifest(&m);
    b.refused(
        &[],
        &[
            "schedule.tables.spatial",
            "has 10 entries for 25 sampling steps",
        ],
    );
}
