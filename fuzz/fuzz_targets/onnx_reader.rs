//! Fuzz the ONNX reader and everything that runs on what it accepts: graph check, shape inference,
//! the DiT map, and re-serialization. Any panic, overflow or unbounded allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // External-data locations resolve inside an empty folder, so they can only fail cleanly.
    let dir = std::env::temp_dir().join("ditc-fuzz-empty");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(model) = ditc::onnx::model_from_bytes(bytes::Bytes::copy_from_slice(data), &dir) {
        let _ = ditc::analysis::analyse(&model);
        let _ = ditc::onnx::model_to_bytes_inline(&model);
    }
});
