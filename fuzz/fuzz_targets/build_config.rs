//! Fuzz the graph builders with arbitrary config.json contents and shape options (no weights: every
//! tensor is then missing, which the builders report after running through all their shape
//! arithmetic). Any panic, overflow or unbounded allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, text) = data.split_at(4);
    let Ok(mut config) = serde_json::from_slice::<serde_json::Value>(text) else {
        return;
    };
    let classes = ditc::models::CLASSES;
    let class = classes[head[0] as usize % classes.len()];
    if let Some(obj) = config.as_object_mut() {
        obj.insert("_class_name".into(), class.into());
    }
    let size = |b: u8| (b != 0).then(|| b as i64);
    let opts = ditc::models::BuildOptions {
        batch: None,
        dynamic_batch: head[0] & 0x80 != 0,
        frames: size(head[1]),
        height: size(head[2]),
        width: size(head[2].rotate_left(3)),
        text_len: size(head[3]),
        image_len: size(head[3].rotate_left(5)),
        timestep_per_token: head[1] & 1 != 0,
        ..Default::default()
    };
    let ckpt = ditc::checkpoint::Checkpoint {
        dir: std::path::PathBuf::from("fuzz"),
        class_name: class.to_string(),
        config,
        files: Vec::new(),
        tensors: Vec::new(),
    };
    let _ = ditc::models::build_model(&ckpt, &opts);
});
