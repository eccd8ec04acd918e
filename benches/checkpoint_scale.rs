//! Converting diffusers checkpoints at real scale: synthetic Wan2.1-T2V-1.3B and -14B checkpoints (exact
//! tensor names, shapes and BF16 dtype from `../shared/fixtures/shapes/*.json`) and a HunyuanVideo-13B
//! one (the published config, tensor names and shapes from diffusers' modeling code as written in
//! `tests/common/hunyuan_video_layout.rs`), with deterministic pseudo-random values in ~5 GB shards
//! with an index, like the published ones, are generated, then
//! `ditc convert DIR` runs on each as a child process. Reported per model, in one run: the time of a
//! plain sequential read of the same shard bytes (the physical limit here); the finite check alone
//! (`ditc inspect --check DIR`: every weight scanned for NaN/Inf, its scan time as it reports it, wall
//! time, peak RSS); and the conversion (which runs the same check fused into its weight stream): wall
//! time, throughput, its ratio to the plain read, and its peak RSS. Asserted: the check and the
//! conversion each reach at least half the plain read's throughput, and each peak RSS stays below
//! 1.5 GB.
//!
//! The page cache is emptied of the shards before each timed pass (fsync + `POSIX_FADV_DONTNEED`), so
//! both read from disk. `cargo bench --profile dev --bench checkpoint_scale -- [--model
//! 1.3b|14b|hunyuanvideo|all] [--hunyuan-blocks DUAL,SINGLE] [--dir D] [--keep]` (default all, in the
//! system temp folder; 14B needs ~58 GB free there, HunyuanVideo-13B ~52 GB). `--hunyuan-blocks`
//! sets the number of dual- and single-stream blocks of the HunyuanVideo checkpoint (default 20,40:
//! the full 12.8 B parameters, 25.6 GB; every tensor keeps its real shape, fewer blocks only make it
//! smaller). Files are deleted afterwards unless `--keep`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;
use common::{arg, check, ditc_with_peak_rss, kilobytes};
#[path = "../tests/common/hunyuan_video_layout.rs"]
mod hunyuan_video_layout;

/// `--model` name of the synthetic HunyuanVideo checkpoint.
const HUNYUAN: &str = "hunyuanvideo";

const SHARD_BYTES: u64 = 5_000_000_000;

fn main() {
    let which = arg("--model").unwrap_or_else(|| "all".into());
    let root = arg("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/shapes");
    let models: Vec<&str> = match which.as_str() {
        "1.3b" => vec!["wan2.1-t2v-1.3b"],
        "14b" => vec!["wan2.1-t2v-14b"],
        "hunyuanvideo" => vec![HUNYUAN],
        "all" => vec!["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", HUNYUAN],
        other => panic!("--model {other}: expected 1.3b, 14b, hunyuanvideo or all"),
    };
    for m in models {
        let (name, spec) = if m == HUNYUAN {
            hunyuan_spec()
        } else {
            let file = shapes.join(format!("{m}.json"));
            if !file.is_file() {
                eprintln!("SKIPPED: {} is not present", file.display());
                continue;
            }
            let spec = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
            (m.to_string(), spec)
        };
        let work = root.join(format!("ditc-ckpt-scale-{}-{name}", std::process::id()));
        let result = std::panic::catch_unwind(|| run(&name, &spec, &work));
        if std::env::args().any(|a| a == "--keep") {
            println!("kept {}", work.display());
        } else {
            let _ = std::fs::remove_dir_all(&work);
        }
        if result.is_err() {
            std::process::exit(1);
        }
    }
}

/// The spec (`class`, `config`, `tensors`, as in `shapes/*.json`) of a HunyuanVideo checkpoint with
/// the published config and `--hunyuan-blocks` blocks, and its name.
fn hunyuan_spec() -> (String, serde_json::Value) {
    let blocks = arg("--hunyuan-blocks").unwrap_or_else(|| "20,40".into());
    let (dual, single) = blocks
        .split_once(',')
        .and_then(|(d, s)| Some((d.parse::<u64>().ok()?, s.parse::<u64>().ok()?)))
        .unwrap_or_else(|| panic!("--hunyuan-blocks {blocks}: expected DUAL,SINGLE"));
    let mut config = hunyuan_video_layout::published_config();
    config["num_layers"] = dual.into();
    config["num_single_layers"] = single.into();
    let layout = hunyuan_video_layout::Layout::of(&config);
    let tensors: serde_json::Map<String, serde_json::Value> = layout
        .tensors()
        .into_iter()
        .map(|(name, shape)| (name, shape.into()))
        .collect();
    let name = match (dual, single) {
        (20, 40) => "hunyuanvideo-13b".to_string(),
        _ => format!("hunyuanvideo-{dual}-dual-{single}-single"),
    };
    println!(
        "{name}: {dual} dual-stream + {single} single-stream blocks, {} parameters",
        layout.parameters_by_arithmetic()
    );
    let spec =
        serde_json::json!({ "class": config["_class_name"], "config": config, "tensors": tensors });
    (name, spec)
}

fn run(name: &str, spec: &serde_json::Value, work: &Path) {
    let ckpt = work.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let t = Instant::now();
    let (shards, bytes) = generate(spec, &ckpt);
    let gb = bytes as f64 / 1e9;
    println!(
        "{name}: generated {gb:.2} GB in {} shards ({:.0}s)",
        shards.len(),
        t.elapsed().as_secs_f64()
    );

    drop_cache(&shards);
    let t = Instant::now();
    let read = plain_read(&shards);
    let read_s = t.elapsed().as_secs_f64();
    assert_eq!(read, bytes_of(&shards));
    println!(
        "{name}: plain sequential read: {read_s:.1}s, {:.0} MB/s",
        read as f64 / read_s / 1e6
    );

    drop_cache(&shards);
    let t = Instant::now();
    let (scan, rss) = finite_check(&ckpt);
    let check_s = t.elapsed().as_secs_f64();
    println!(
        "{name}: finite check (inspect --check): scan {scan}, {check_s:.1}s wall, {:.0} MB/s, peak RSS {rss}; {:.0}% of the plain-read throughput",
        bytes as f64 / check_s / 1e6,
        100.0 * read_s / check_s
    );
    let mut pass = check(
        read_s / check_s >= 0.5,
        &format!("{name}: finite check >= 50% of the plain read's throughput"),
    );
    pass &= check(
        kilobytes(&rss) < 1_500_000,
        &format!("{name}: finite check peak RSS {rss} < 1.5 GB"),
    );

    drop_cache(&shards);
    let out = work.join("bundle");
    let t = Instant::now();
    let rss = convert(&ckpt, &out);
    let conv_s = t.elapsed().as_secs_f64();
    let ratio = read_s / conv_s;
    println!(
        "{name}: ditc convert (finite check on): {conv_s:.1}s, {:.0} MB/s of weights, peak RSS {rss}; {:.0}% of the plain-read throughput",
        bytes as f64 / conv_s / 1e6,
        ratio * 100.0
    );
    pass &= check(
        ratio >= 0.5,
        &format!("{name}: convert >= 50% of the plain read's throughput"),
    );
    pass &= check(
        kilobytes(&rss) < 1_500_000,
        &format!("{name}: convert peak RSS {rss} < 1.5 GB"),
    );
    check_output(&ckpt, &out);
    println!("PASS {name}: output checked: every checkpoint tensor present with identical bytes");
    assert!(pass, "{name}: a bound was missed (FAIL above)");
}

/// Shards of `spec`'s tensors (in its order) filled with deterministic BF16 values; returns the shard
/// paths and the weight bytes.
fn generate(spec: &serde_json::Value, dir: &Path) -> (Vec<PathBuf>, u64) {
    let mut config = spec["config"].as_object().unwrap().clone();
    config.retain(|k, _| !k.starts_with('_'));
    config.insert("_class_name".into(), spec["class"].clone());
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let tensors: Vec<(String, Vec<u64>)> = spec["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect();
    // Group into shards of at most ~5 GB.
    let mut groups: Vec<Vec<&(String, Vec<u64>)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &tensors {
        let b = 2 * t.1.iter().product::<u64>();
        if size + b > SHARD_BYTES && !groups.last().unwrap().is_empty() {
            groups.push(Vec::new());
            size = 0;
        }
        size += b;
        groups.last_mut().unwrap().push(t);
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut paths = Vec::new();
    let mut total = 0;
    for (i, group) in groups.iter().enumerate() {
        let file = format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", i + 1);
        total += write_shard(&dir.join(&file), group);
        for (name, _) in group.iter().map(|t| (&t.0, ())) {
            weight_map.insert(name.clone(), file.clone().into());
        }
        paths.push(dir.join(file));
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    (paths, total)
}

fn write_shard(path: &Path, tensors: &[&(String, Vec<u64>)]) -> u64 {
    let mut header = BTreeMap::new();
    let mut offset = 0u64;
    for (name, shape) in tensors.iter().map(|t| (&t.0, &t.1)) {
        let len = 2 * shape.iter().product::<u64>();
        header.insert(name.clone(), serde_json::json!({ "dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len] }));
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = BufWriter::with_capacity(8 << 20, File::create(path).unwrap());
    out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&json).unwrap();
    // Data in header (offset) order: BTreeMap order is name order, as are the offsets above.
    let mut sorted: Vec<_> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut buf = vec![0u8; 4 << 20];
    for (name, shape) in sorted.iter().map(|t| (&t.0, &t.1)) {
        let mut rng = seed(name);
        let mut left = 2 * shape.iter().product::<u64>();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            for pair in buf[..n].chunks_exact_mut(2) {
                // Uniform in about [-0.05, 0.05], as bf16 (the top half of an f32).
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let v = ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                pair.copy_from_slice(&v.to_bits().to_le_bytes()[2..4]);
            }
            out.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    }
    out.into_inner().unwrap().sync_all().unwrap();
    offset
}

fn seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    }) | 1
}

fn bytes_of(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// Empty the page cache of `paths` (clean pages only, hence the fsync), so the next read hits the disk.
fn drop_cache(paths: &[PathBuf]) {
    use std::os::unix::io::AsRawFd;
    for p in paths {
        let f = File::open(p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a valid open descriptor; the advice does not change file contents.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

fn plain_read(paths: &[PathBuf]) -> u64 {
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    for p in paths {
        let mut f = File::open(p).unwrap();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
}

/// `ditc convert DIR -o OUT`; returns the peak RSS the child reports.
fn convert(ckpt: &Path, out: &Path) -> String {
    let (ckpt, out) = (ckpt.to_str().unwrap(), out.to_str().unwrap());
    ditc_with_peak_rss(&["convert", ckpt, "-o", out, "--no-progress"]).2
}

/// `ditc inspect --check DIR`; returns the scan time it reports and its peak RSS.
fn finite_check(ckpt: &Path) -> (String, String) {
    let (_, stderr, rss) = ditc_with_peak_rss(&["inspect", "--check", ckpt.to_str().unwrap()]);
    let scan = stderr
        .lines()
        .find(|l| l.starts_with("checked "))
        .unwrap_or("?")
        .to_string();
    (scan, rss)
}

/// Every checkpoint tensor is an initializer of the output with the same bytes (BF16 kept).
fn check_output(ckpt: &Path, out: &Path) {
    let source = ditc::checkpoint::Checkpoint::open(ckpt).unwrap();
    let model = ditc::onnx::read_model(&out.join("model.onnx")).unwrap();
    for t in &source.tensors {
        let got = model
            .graph
            .initializer(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(got.dtype, t.dtype, "{}", t.name);
        assert!(got.raw() == t.raw(), "{} changed", t.name);
        ditc::onnx::external::release_pages(got.raw().unwrap());
        ditc::onnx::external::release_pages(t.raw().unwrap());
    }
}
