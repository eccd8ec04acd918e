//! Classifier-free guidance: two batch-1 calls per step against one batch-2 call, on CPU with tract.
//!
//! `cargo bench --profile dev --bench cfg_batch [-- --reps R]` (default 15). On the example wan-small
//! checkpoint (examples/wan-small, 512 video tokens) it builds the graph at batch 1 and at batch 2 and
//! measures, interleaved, the median time of a step's model work both ways: two batch-1 calls
//! (conditional, unconditional) and one batch-2 call on both inputs stacked. The runtime uses two calls:
//! each branch then keeps its own batch-1 state and can decide on its own (FirstBlockCache's branches
//! diverge), which a single batch-2 call cannot do without computing both rows.

use std::path::Path;
use std::time::Instant;

use ditc::ir::Tensor;
use ditc::models::BuildOptions;
use ditc::runtime::TractRunner;

mod common;

fn main() {
    let reps = common::reps(15);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/wan-small");
    let inputs = ditc::tensors::read_safetensors(&root.join("inputs.safetensors")).unwrap();
    let get = |n: &str| {
        inputs
            .iter()
            .find(|t| t.name == format!("0.{n}"))
            .unwrap()
            .clone()
    };
    let build = |batch: i64| {
        let opts = BuildOptions {
            batch: Some(batch),
            frames: Some(8),
            height: Some(16),
            width: Some(16),
            text_len: Some(4),
            ..Default::default()
        };
        ditc::models::read_model_or_checkpoint(&root.join("ckpt"), &opts).unwrap()
    };
    let renamed = |t: Tensor, name: &str| Tensor {
        name: name.into(),
        ..t
    };
    let latent = renamed(get("noise"), "hidden_states");
    let cond = renamed(get("encoder_hidden_states"), "encoder_hidden_states");
    let uncond = renamed(
        get("negative_encoder_hidden_states"),
        "encoder_hidden_states",
    );
    let timestep =
        |batch: usize| Tensor::from_f32("timestep", vec![batch as i64], &vec![500.0; batch]);
    let stack = |a: &Tensor, b: &Tensor| {
        let mut values = a.to_f32_vec().unwrap();
        values.extend(b.to_f32_vec().unwrap());
        let mut dims = a.dims.clone();
        dims[0] = 2;
        Tensor::from_f32(&a.name, dims, &values)
    };
    let one = [
        vec![latent.clone(), cond.clone(), timestep(1)],
        vec![latent.clone(), uncond.clone(), timestep(1)],
    ];
    let two = vec![stack(&latent, &latent), stack(&cond, &uncond), timestep(2)];
    let single = TractRunner::new(&build(1), &one[0]).unwrap();
    let batched = TractRunner::new(&build(2), &two).unwrap();
    // The batch-2 call computes both rows exactly as the two calls do.
    let rows: Vec<f32> = one
        .iter()
        .flat_map(|i| single.run(i).unwrap()[0].to_f32_vec().unwrap())
        .collect();
    let both = batched.run(&two).unwrap()[0].to_f32_vec().unwrap();
    let f = ditc::metrics::compare(&both, &rows);
    let (mut t_two_calls, mut t_batch) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        for i in &one {
            single.run(i).unwrap();
        }
        t_two_calls.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        batched.run(&two).unwrap();
        t_batch.push(t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut t_two_calls), median(&mut t_batch));
    println!("wan-small, one CFG step's model work, median of {reps} interleaved repetitions:");
    println!("  two batch-1 calls  {:.1} ms", 1e3 * a);
    println!(
        "  one batch-2 call   {:.1} ms  ({:.2}x the two calls)",
        1e3 * b,
        b / a
    );
    println!("  batch-2 rows vs the two calls: rel L2 {:.1e}", f.rel_l2);
}
