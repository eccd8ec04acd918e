//! Running an IR graph on CPU with tract (the verifier).
//!
//! The graph is serialized with weights inline and handed to `tract-onnx`, input facts are fixed from
//! the tensors the caller provides, and the model is optimised once into a plan that can be run many
//! times. Inputs and outputs are [`Tensor`]s keyed by graph input/output names.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec,
    Tensor as TractTensor, TypedRunnableModel,
};

use super::{fused_elementwise, narrow_slice, rewrite, short_softmax, small_kernels, tiled_matmul};
use crate::ir::{DataType, Model, Tensor};
use crate::onnx::model_to_bytes_inline;

pub struct TractRunner {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl TractRunner {
    /// Prepare `model` for inputs shaped like `example_inputs` (matched by name).
    /// `DITC_RUNTIME_REWRITES=0` in the environment plans every graph as tract alone would (to
    /// tell the rewrites' effect apart when investigating a result).
    pub fn new(model: &Model, example_inputs: &[Tensor]) -> Result<TractRunner> {
        let rewrites = std::env::var_os("DITC_RUNTIME_REWRITES").is_none_or(|v| v != "0");
        Self::prepare(model, example_inputs, rewrites)
    }

    /// As [`TractRunner::new`] but as tract alone plans the graph, without the runtime's rewrites
    /// ([`super::rewrite`], [`super::small_kernels`]): for tests and for measuring the rewrites.
    pub fn without_rewrites(model: &Model, example_inputs: &[Tensor]) -> Result<TractRunner> {
        Self::prepare(model, example_inputs, false)
    }

    fn prepare(model: &Model, example_inputs: &[Tensor], rewrites: bool) -> Result<TractRunner> {
        let inputs: Vec<String> = model
            .graph
            .runtime_inputs()
            .map(|i| i.name.clone())
            .collect();
        let outputs: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        // tract-onnx does not read local functions (`ModelProto.functions`): their calls (ditc's
        // `ai.ditc` ops) run as their bodies, inlined into this copy of the graph.
        let inlined;
        let model = if model.functions.is_empty() {
            model
        } else {
            inlined = crate::ir::functions::inline_local_functions(model)?;
            &inlined
        };
        // tract has no FLOAT8: FP8 Q/DQ run as their exact f32 emulation.
        let emulated;
        let model = if crate::fp8::needs_emulation(model) {
            emulated = crate::fp8::emulate(model)?;
            &emulated
        } else {
            model
        };
        // tract has no BF16 either: BF16 initializers (weights of checkpoints, cast to f32 in the graph)
        // are widened to f32, which is exact.
        let widened;
        let model = if model
            .graph
            .initializers
            .iter()
            .any(|t| t.dtype == DataType::BF16)
        {
            widened = widen_bf16(model)?;
            &widened
        } else {
            model
        };
        // One-input permuting einsums become transposes (see `rewrite`): on a copy, only if any.
        let transposed;
        let model = if rewrites && model.graph.nodes.iter().any(|n| n.op_type == "Einsum") {
            let mut copy = model.clone();
            rewrite::einsums_to_transposes(&mut copy);
            transposed = copy;
            &transposed
        } else {
            model
        };
        let bytes = model_to_bytes_inline(model)?;
        let mut tract_model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| anyhow!("tract could not load the graph: {}", describe(&e)))?;
        for (i, name) in inputs.iter().enumerate() {
            let t = find_input(example_inputs, name)?;
            let dt = datum_type(t.dtype).with_context(|| format!("input '{name}'"))?;
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            tract_model
                .set_input_fact(i, InferenceFact::dt_shape(dt, shape))
                .map_err(|e| anyhow!("input '{name}': {}", describe(&e)))?;
        }
        let cannot_run =
            |e: anyhow::Error| anyhow!("tract cannot run this graph: {}", describe(&e));
        let mut typed = tract_model.into_typed().map_err(cannot_run)?;
        typed.declutter().map_err(cannot_run)?;
        if rewrites {
            tiled_matmul::use_tiled_matmuls(&mut typed).map_err(cannot_run)?;
            small_kernels::use_small_matmuls(&mut typed).map_err(cannot_run)?;
            short_softmax::use_short_softmaxes(&mut typed).map_err(cannot_run)?;
            narrow_slice::use_narrow_slices(&mut typed).map_err(cannot_run)?;
            // After the product kernels (which match patterns that include element-wise ops) and
            // before broadcasts are expanded (a group reads broadcast operands in place).
            fused_elementwise::use_fused_elementwise(&mut typed).map_err(cannot_run)?;
            rewrite::expand_broadcast_operands(&mut typed)?;
        }
        // `optimize`, not `into_optimized`: the latter would declutter again.
        let plan = typed
            .optimize()
            .and_then(|()| typed.into_runnable())
            .map_err(cannot_run)?;
        Ok(TractRunner {
            plan,
            inputs,
            outputs,
        })
    }

    /// The operators of tract's plan, one per node in execution order (for tests and profiling:
    /// which kernels a graph ends up on).
    pub fn plan_ops(&self) -> Vec<String> {
        self.plan
            .model()
            .nodes
            .iter()
            .map(|n| n.op().name().to_string())
            .collect()
    }

    pub fn input_names(&self) -> &[String] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Time spent per tract operator (or per node, with its output fact, when `by_node`) over `reps`
    /// calls on `inputs`, largest first: `(op, seconds, evaluations)`. For finding what a call
    /// spends its time on (the runtime_speed bench's `--profile`); the results are dropped.
    pub fn profile(
        &self,
        inputs: &[Tensor],
        reps: usize,
        by_node: bool,
    ) -> Result<Vec<(String, f64, usize)>> {
        let mut per_op: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        let mut state = self.plan.spawn().map_err(|e| anyhow!("{}", describe(&e)))?;
        for _ in 0..reps {
            let values = self.tract_inputs(inputs)?;
            on_pool(|| {
                state.run_plan_with_eval(values, |ctx, op_state, node, input| {
                    let start = std::time::Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                    let key = if by_node {
                        format!(
                            "{} {} {:?}",
                            node.op().name(),
                            node.name,
                            node.outputs[0].fact
                        )
                    } else {
                        node.op().name().to_string()
                    };
                    let slot = per_op.entry(key).or_default();
                    slot.0 += start.elapsed().as_secs_f64();
                    slot.1 += 1;
                    out
                })
            })
            .map_err(|e| anyhow!("tract failed while profiling: {}", describe(&e)))?;
        }
        let mut rows: Vec<(String, f64, usize)> =
            per_op.into_iter().map(|(op, (s, n))| (op, s, n)).collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(rows)
    }

    /// `inputs` as tract values, in the graph's input order (matched by name).
    fn tract_inputs(&self, inputs: &[Tensor]) -> Result<TVec<TValue>> {
        self.inputs
            .iter()
            .map(|name| Ok(to_tract(find_input(inputs, name)?)?.into_tvalue()))
            .collect()
    }

    /// Run once; `inputs` are matched to graph inputs by name, outputs come back named.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let values = self.tract_inputs(inputs)?;
        let results = on_pool(|| self.plan.run(values))
            .map_err(|e| anyhow!("tract failed while running: {}", describe(&e)))?;
        self.outputs
            .iter()
            .zip(results)
            .map(|(name, v)| from_tract(name, &v))
            .collect()
    }
}

fn find_input<'a>(inputs: &'a [Tensor], name: &str) -> Result<&'a Tensor> {
    inputs.iter().find(|t| t.name == name).with_context(|| {
        let have: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
        format!("no tensor for graph input '{name}' (given: {have:?})")
    })
}

/// tract's error chain on one line; its messages name the failing node and op.
fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn datum_type(d: DataType) -> Result<DatumType> {
    Ok(match d {
        DataType::F32 => DatumType::F32,
        DataType::F16 => DatumType::F16,
        DataType::F64 => DatumType::F64,
        DataType::I64 => DatumType::I64,
        DataType::I32 => DatumType::I32,
        DataType::I16 => DatumType::I16,
        DataType::I8 => DatumType::I8,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::Bool => DatumType::Bool,
        other => bail!("tract cannot take {other} tensors"),
    })
}

fn to_tract(t: &Tensor) -> Result<TractTensor> {
    let raw = t
        .raw()
        .with_context(|| format!("tensor '{}' has no raw data", t.name))?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    fn typed<T: tract_onnx::prelude::Datum + Copy, const N: usize>(
        shape: &[usize],
        raw: &[u8],
        f: fn([u8; N]) -> T,
    ) -> Result<TractTensor> {
        let v: Vec<T> = raw
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk size")))
            .collect();
        TractTensor::from_shape(shape, &v).map_err(|e| anyhow!("{e}"))
    }
    match t.dtype {
        DataType::F32 => typed(&shape, raw, f32::from_le_bytes),
        DataType::F16 => typed(&shape, raw, half::f16::from_le_bytes),
        DataType::F64 => typed(&shape, raw, f64::from_le_bytes),
        DataType::I64 => typed(&shape, raw, i64::from_le_bytes),
        DataType::I32 => typed(&shape, raw, i32::from_le_bytes),
        DataType::I16 => typed(&shape, raw, i16::from_le_bytes),
        DataType::U16 => typed(&shape, raw, u16::from_le_bytes),
        DataType::U32 => typed(&shape, raw, u32::from_le_bytes),
        DataType::U64 => typed(&shape, raw, u64::from_le_bytes),
        DataType::I8 => typed(&shape, raw, |b: [u8; 1]| b[0] as i8),
        DataType::U8 => typed(&shape, raw, |b: [u8; 1]| b[0]),
        DataType::Bool => typed(&shape, raw, |b: [u8; 1]| b[0] != 0),
        other => bail!("tensor '{}': tract cannot take {other} tensors", t.name),
    }
    .with_context(|| format!("tensor '{}'", t.name))
}

fn from_tract(name: &str, v: &TValue) -> Result<Tensor> {
    let dtype = match v.datum_type() {
        DatumType::F32 => DataType::F32,
        DatumType::F16 => DataType::F16,
        DatumType::F64 => DataType::F64,
        DatumType::I64 => DataType::I64,
        DatumType::I32 => DataType::I32,
        DatumType::I16 => DataType::I16,
        DatumType::I8 => DataType::I8,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::Bool => DataType::Bool,
        // tract computes int64 values derived from shapes as dimensions: concrete ones are integers.
        DatumType::TDim => {
            let ints = v
                .cast_to_dt(DatumType::I64)
                .map_err(|e| anyhow!("output '{name}': {}", describe(&e)))?;
            let dims = ints.shape().iter().map(|&d| d as i64).collect();
            return Tensor::from_raw(
                name,
                DataType::I64,
                dims,
                Bytes::copy_from_slice(ints.as_bytes()),
            );
        }
        other => bail!("output '{name}' has type {other:?}, which ditc cannot store"),
    };
    let dims = v.shape().iter().map(|&d| d as i64).collect();
    Tensor::from_raw(name, dtype, dims, Bytes::copy_from_slice(v.as_bytes()))
}

/// Convenience for tests and tools: a one-shot run.
pub fn run_once(model: &Model, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    TractRunner::new(model, inputs)?.run(inputs)
}

/// `model` with every top-level BF16 initializer widened to f32 (exactly: BF16 is f32's upper half).
fn widen_bf16(model: &Model) -> Result<Model> {
    let mut out = model.clone();
    for t in out
        .graph
        .initializers
        .iter_mut()
        .filter(|t| t.dtype == DataType::BF16)
    {
        let values = t
            .to_f32_vec()
            .with_context(|| format!("BF16 tensor '{}'", t.name))?;
        *t = Tensor::from_f32(&t.name, t.dims.clone(), &values);
    }
    Ok(out)
}

/// The thread pool tract's kernels run on (`--threads`), absent when single-threaded.
static POOL: std::sync::Mutex<Option<Arc<rayon::ThreadPool>>> = std::sync::Mutex::new(None);

/// Run tract's kernels (matrix products, element-wise and row-wise ops) on `threads` threads from now
/// on; 1 runs them on the calling thread. Results do not depend on the count: tract splits work on
/// output tiles and rows, never inside a reduction.
pub fn set_threads(threads: usize) -> Result<()> {
    use tract_linalg::multithread::{set_default_executor, Executor};
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let pool = if threads == 1 {
        None
    } else {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ditc-tract-{i}"))
            .build()
            .context("could not start the runtime's threads")?;
        Some(Arc::new(pool))
    };
    set_default_executor(match &pool {
        Some(p) => Executor::MultiThread(p.clone()),
        None => Executor::SingleThread,
    });
    *POOL.lock().unwrap_or_else(|e| e.into_inner()) = pool;
    Ok(())
}

/// Whether the runtime's own kernels split work over threads: only when `--threads` asked for more
/// than one (then a call runs inside the runtime's pool). rayon's `current_num_threads` alone
/// would answer for its global pool on a single-threaded run.
pub(super) fn split_over_threads() -> bool {
    use tract_linalg::multithread::{current_tract_executor, Executor};
    matches!(current_tract_executor(), Executor::MultiThread(p) if p.current_num_threads() > 1)
}

/// Run `f` on one of the pool's threads when there is a pool: tract's parallel kernels then split
/// work from inside the pool instead of handing each kernel over to it and waiting (a wake-up and a
/// sleep per kernel, which cost more than the kernels of small models gain).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// The default thread count: the cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
