//! The small graphs a cache policy adds to decide inside the graph (first-block-cache, easy-cache,
//! ada-cache): nodes and constants named `ditc.<policy>.<name>`, and the few composite values their
//! rules need (means over every axis, a slice along axis 1), written for the model's opset.

use anyhow::{Context, Result};

use crate::ir::{sort_topologically, AttrValue, DataType, Dim, Graph, Node, Tensor, ValueInfo};
use crate::manifest::StateBinding;
use crate::passes::STEP_INPUT;
use crate::schedule::first_block_cache::{DECISION, METRIC};
use crate::schedule::Group;

/// Nodes and constants a policy adds, in the order they were emitted.
pub struct Emitter {
    prefix: &'static str,
    opset: i64,
    pub nodes: Vec<Node>,
    pub constants: Vec<Tensor>,
}

impl Emitter {
    /// An emitter naming its values `ditc.<prefix>.<name>`, for a model of `opset`.
    pub fn new(prefix: &'static str, opset: i64) -> Emitter {
        Emitter {
            prefix,
            opset,
            nodes: Vec::new(),
            constants: Vec::new(),
        }
    }

    fn full(&self, name: &str) -> String {
        format!("ditc.{}.{name}", self.prefix)
    }

    /// A node `op(inputs)` whose output is `ditc.<prefix>.<name>`.
    pub fn op(&mut self, op: &str, name: &str, inputs: &[&str]) -> String {
        let out = self.full(name);
        self.named(op, inputs, &out);
        out
    }

    /// A node `op(inputs)` whose output (and node name) is `output` as given.
    pub fn named(&mut self, op: &str, inputs: &[&str], output: &str) {
        self.nodes.push(Node::new(output, op, inputs, &[output]));
    }

    /// A 0-D int64 constant.
    pub fn i64(&mut self, name: &str, value: i64) -> String {
        let full = self.full(name);
        self.constants
            .push(Tensor::from_i64(&full, vec![], &[value]));
        full
    }

    /// A 1-D int64 constant.
    pub fn i64s(&mut self, name: &str, values: &[i64]) -> String {
        let full = self.full(name);
        self.constants
            .push(Tensor::from_i64(&full, vec![values.len() as i64], values));
        full
    }

    /// A 0-D f32 constant.
    pub fn f32(&mut self, name: &str, value: f32) -> String {
        let full = self.full(name);
        self.constants
            .push(Tensor::from_f32(&full, vec![], &[value]));
        full
    }

    /// `Cast(input, to = dtype)`.
    pub fn cast(&mut self, name: &str, input: &str, dtype: DataType) -> String {
        let out = self.full(name);
        self.nodes.push(
            Node::new(&out, "Cast", &[input], &[&out])
                .with_attr("to", AttrValue::Int(dtype.onnx_code() as i64)),
        );
        out
    }

    /// The mean over every axis of `input` (rank `rank`), 0-D: `ReduceMean` with its axes as an
    /// input from opset 18 on, as an attribute before.
    pub fn mean_all(&mut self, name: &str, input: &str, rank: usize) -> String {
        let out = self.full(name);
        let axes: Vec<i64> = (0..rank as i64).collect();
        let node = if self.opset >= 18 {
            let axes_name = self.i64s(&format!("{name}.axes"), &axes);
            Node::new(&out, "ReduceMean", &[input, &axes_name], &[&out])
        } else {
            Node::new(&out, "ReduceMean", &[input], &[&out])
                .with_attr("axes", AttrValue::Ints(axes))
        };
        self.nodes
            .push(node.with_attr("keepdims", AttrValue::Int(0)));
        out
    }

    /// `mean(|a|)` over every axis of a rank-`rank` value, 0-D.
    pub fn mean_abs(&mut self, name: &str, a: &str, rank: usize) -> String {
        let abs = self.op("Abs", &format!("{name}.abs"), &[a]);
        self.mean_all(name, &abs, rank)
    }

    /// `mean(|a - b|)` over every axis of rank-`rank` values, 0-D.
    pub fn mean_abs_diff(&mut self, name: &str, a: &str, b: &str, rank: usize) -> String {
        let diff = self.op("Sub", &format!("{name}.diff"), &[a, b]);
        self.mean_abs(name, &diff, rank)
    }

    /// `input[:, start:end]` along axis 1.
    pub fn slice1(&mut self, name: &str, input: &str, start: i64, end: i64) -> String {
        let starts = self.i64s(&format!("{name}.starts"), &[start]);
        let ends = self.i64s(&format!("{name}.ends"), &[end]);
        let axes = self.i64s(&format!("{name}.axes"), &[1]);
        self.op("Slice", name, &[input, &starts, &ends, &axes])
    }

    /// Add the emitted nodes and constants to `graph` with its 0-D outputs `ditc.metric` (f32)
    /// and `ditc.decision` (bool), in topological order, and check the result.
    pub fn finish(self, graph: &mut Graph) -> Result<()> {
        graph.nodes.extend(self.nodes);
        graph.initializers.extend(self.constants);
        graph
            .outputs
            .push(ValueInfo::tensor(METRIC, DataType::F32, vec![]));
        graph
            .outputs
            .push(ValueInfo::tensor(DECISION, DataType::Bool, vec![]));
        sort_topologically(graph)?;
        crate::ir::check_graph(graph).context("the baked graph is invalid (a ditc bug)")
    }
}

/// Turn every top-level `Constant` node whose value is a tensor into an initializer of its output's
/// name. Exporters (torch's) write reshape shapes as `Constant` nodes; a runtime that splits the graph
/// at a policy's `If` (the CPU runtime: a prefix, then the taken outcome) would feed their values to an
/// outcome as inputs, where a shape is no longer known to be constant. Initializers stay constants in
/// every part. Values and names are unchanged.
pub fn constants_to_initializers(graph: &mut Graph) {
    let outputs: std::collections::HashSet<String> =
        graph.outputs.iter().map(|o| o.name.clone()).collect();
    let mut kept = Vec::with_capacity(graph.nodes.len());
    for node in std::mem::take(&mut graph.nodes) {
        let value = (node.op_type == "Constant" && node.outputs.len() == 1)
            .then(|| node.attr_tensor("value").cloned())
            .flatten()
            .filter(|_| !outputs.contains(&node.outputs[0]));
        match value {
            Some(mut t) => {
                t.name = node.outputs[0].clone();
                graph.initializers.push(t);
            }
            None => kept.push(node),
        }
    }
    graph.nodes = kept;
}

/// The manifest's bindings of a policy's states (`(name, (dtype, shape))`, carried from
/// `state_in(name)` to `state_out(name)`, zeros before a branch's first call), all of the block
/// stack's group.
pub fn zero_state_bindings(
    states: &[(&str, (DataType, Vec<i64>))],
    state_in: fn(&str) -> String,
    state_out: fn(&str) -> String,
) -> Vec<StateBinding> {
    states
        .iter()
        .map(|(v, (dtype, shape))| StateBinding {
            group: Group::Blocks,
            site: None,
            block: None,
            table_block: None,
            input: state_in(v),
            output: state_out(v),
            dtype: dtype.to_string(),
            shape: shape.clone(),
            initial: "zeros".into(),
        })
        .collect()
}

/// Declare a policy's states (`(name, (dtype, shape))`) as graph inputs `state_in(name)` and
/// outputs `state_out(name)`, and the step input `ditc.step` unless the graph has it.
pub fn declare_states(
    graph: &mut Graph,
    states: &[(&str, (DataType, Vec<i64>))],
    state_in: fn(&str) -> String,
    state_out: fn(&str) -> String,
) {
    let dims = |shape: &[i64]| shape.iter().map(|&d| Dim::Value(d)).collect::<Vec<_>>();
    for (v, (dtype, shape)) in states {
        graph
            .inputs
            .push(ValueInfo::tensor(&state_in(v), *dtype, dims(shape)));
        graph
            .outputs
            .push(ValueInfo::tensor(&state_out(v), *dtype, dims(shape)));
    }
    if !graph.inputs.iter().any(|i| i.name == STEP_INPUT) {
        graph
            .inputs
            .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
    }
}
