//! Emitting ONNX nodes from code: unique names that follow module paths, constants, and checkpoint
//! weights that stay zero-copy slices of the memory-mapped safetensors files.
//!
//! Weight lookups never fail on the spot: a missing tensor or one of the wrong shape is recorded and a
//! placeholder name returned, so one build reports *every* problem of a checkpoint at once
//! ([`GraphBuilder::finish`]), including tensors the checkpoint has but the model never asked for.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Result};

use crate::ir::{AttrValue, Attribute, DataType, Dim, Graph, Node, Tensor, ValueInfo};

pub struct GraphBuilder {
    graph: Graph,
    /// Every value name in use (node outputs, initializers, inputs).
    taken: HashSet<String>,
    /// Checkpoint tensors by name, and the value each one the model asked for became (its f32 value,
    /// or a placeholder when it could not serve).
    weights: BTreeMap<String, Tensor>,
    used: BTreeMap<String, String>,
    missing: Vec<String>,
    unusable: Vec<String>,
}

impl GraphBuilder {
    pub fn new(name: &str, weights: Vec<Tensor>) -> GraphBuilder {
        GraphBuilder {
            graph: Graph {
                name: name.to_string(),
                ..Graph::default()
            },
            taken: HashSet::new(),
            weights: weights.into_iter().map(|t| (t.name.clone(), t)).collect(),
            used: BTreeMap::new(),
            missing: Vec::new(),
            unusable: Vec::new(),
        }
    }

    /// A graph input; `dims` uses `Dim::Param` for dynamic axes.
    pub fn input(&mut self, name: &str, dtype: DataType, dims: Vec<Dim>) -> String {
        self.taken.insert(name.to_string());
        self.graph.inputs.push(ValueInfo::tensor(name, dtype, dims));
        name.to_string()
    }

    /// A graph input whose axis order differs from diffusers' usual `[B, C, F, H, W]`, declared for the
    /// structure analysis as `ditc.layout=<letters>` in its doc_string (see `analysis::axes`).
    pub fn input_with_layout(
        &mut self,
        name: &str,
        dtype: DataType,
        dims: Vec<Dim>,
        layout: &str,
    ) -> String {
        let name = self.input(name, dtype, dims);
        if let Some(input) = self.graph.inputs.last_mut() {
            input.doc_string = format!("ditc.layout={layout}");
        }
        name
    }

    /// Marks `value` as the graph output `name` (through an Identity when the names differ).
    pub fn output(&mut self, value: &str, name: &str, dtype: DataType, dims: Vec<Dim>) {
        if value != name {
            self.taken.insert(name.to_string());
            self.push(name, "Identity", &[value], &[name], vec![]);
        }
        self.graph
            .outputs
            .push(ValueInfo::tensor(name, dtype, dims));
    }

    /// A fresh value name derived from `base` (`base`, then `base#2`, `base#3`, ...).
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 1;
        while self.taken.contains(&name) {
            n += 1;
            name = format!("{base}#{n}");
        }
        self.taken.insert(name.clone());
        name
    }

    /// One node with one output; node and output share the (uniquified) name.
    pub fn op(
        &mut self,
        name: &str,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
    ) -> String {
        let out = self.fresh(name);
        self.push(&out, op_type, inputs, &[&out], attrs);
        out
    }

    /// A node with several outputs (`Split`), named `name:0`, `name:1`, ...
    pub fn op_n(
        &mut self,
        name: &str,
        op_type: &str,
        inputs: &[&str],
        outputs: usize,
        attrs: Vec<(&str, AttrValue)>,
    ) -> Vec<String> {
        let node_name = self.fresh(name);
        let outs: Vec<String> = (0..outputs)
            .map(|i| self.fresh(&format!("{node_name}:{i}")))
            .collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.push(&node_name, op_type, inputs, &refs, attrs);
        outs
    }

    /// The type of graph input `name` (`None` for any other value).
    pub fn input_dtype(&self, name: &str) -> Option<DataType> {
        self.graph
            .inputs
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| i.dtype())
    }

    /// `x` cast to float32.
    pub fn cast_f32(&mut self, name: &str, x: &str) -> String {
        let to = AttrValue::Int(DataType::F32.onnx_code() as i64);
        self.op(name, "Cast", &[x], vec![("to", to)])
    }

    fn push(
        &mut self,
        name: &str,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
    ) {
        let mut node = Node::new(name, op_type, inputs, outputs);
        node.attributes = attrs
            .into_iter()
            .map(|(name, value)| Attribute {
                name: name.to_string(),
                value,
            })
            .collect();
        self.graph.nodes.push(node);
    }

    pub fn const_f32(&mut self, name: &str, dims: Vec<i64>, values: &[f32]) -> String {
        let name = self.fresh(name);
        self.graph
            .initializers
            .push(Tensor::from_f32(&name, dims, values));
        name
    }

    pub fn const_i64(&mut self, name: &str, values: &[i64]) -> String {
        let name = self.fresh(name);
        self.graph
            .initializers
            .push(Tensor::from_i64(&name, vec![values.len() as i64], values));
        name
    }

    pub fn scalar(&mut self, name: &str, value: f32) -> String {
        self.const_f32(name, vec![], &[value])
    }

    /// The checkpoint tensor `name` as a float32 value of shape `dims`: the initializer itself when the
    /// checkpoint stores f32, else the initializer in its stored dtype followed by a Cast (the weight
    /// bytes stay as they are on disk). Missing or misshapen tensors are recorded for [`finish`].
    ///
    /// [`finish`]: GraphBuilder::finish
    pub fn weight(&mut self, name: &str, dims: &[i64]) -> String {
        let Some(t) = self.weights.get(name) else {
            self.missing.push(format!("{name} {dims:?}"));
            return self.placeholder(name);
        };
        if !matches!(
            t.dtype,
            DataType::F32 | DataType::F16 | DataType::BF16 | DataType::F64
        ) {
            let why = format!(
                "{name}: dtype {} (only float weights are built; pre-quantized checkpoints are not supported)",
                t.dtype
            );
            return self.unusable(name, why);
        }
        if t.dims != dims {
            let why = format!(
                "{name}: checkpoint has {:?}, the config implies {dims:?}",
                t.dims
            );
            return self.unusable(name, why);
        }
        if let Some(value) = self.used.get(name) {
            return value.clone();
        }
        let t = t.clone();
        self.taken.insert(name.to_string());
        let dtype = t.dtype;
        self.graph.initializers.push(t);
        let value = if dtype == DataType::F32 {
            name.to_string()
        } else {
            self.cast_f32(&format!("{name}/cast"), name)
        };
        self.used.insert(name.to_string(), value.clone());
        value
    }

    /// Accepts the checkpoint tensor `name` (checked like [`weight`]: present, float, of shape `dims`)
    /// that this graph does not compute with, because diffusers' forward leaves it unused for these
    /// shapes; it stays out of the graph.
    ///
    /// [`weight`]: GraphBuilder::weight
    pub fn unused_weight(&mut self, name: &str, dims: &[i64]) {
        let Some(t) = self.weights.get(name) else {
            self.missing.push(format!("{name} {dims:?}"));
            return;
        };
        if t.dims != dims || !t.dtype.is_float() {
            let why = format!(
                "{name}: checkpoint has {} {:?}, the config implies float {dims:?}",
                t.dtype, t.dims
            );
            self.unusable(name, why);
            return;
        }
        self.used.insert(name.to_string(), String::new());
    }

    /// True when the checkpoint has a tensor `name`.
    pub fn has_weight(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// Records a checkpoint tensor that exists but cannot serve (found, so not also "unexpected").
    fn unusable(&mut self, name: &str, why: String) -> String {
        if let Some(value) = self.used.get(name) {
            return value.clone();
        }
        self.unusable.push(why);
        let value = self.placeholder(name);
        self.used.insert(name.to_string(), value.clone());
        value
    }

    /// Stands in for a missing weight so the build can go on collecting problems: a name only (no data,
    /// whatever the shape), since a graph with any missing weight is never returned.
    fn placeholder(&mut self, name: &str) -> String {
        self.fresh(&format!("{name}/missing"))
    }

    /// The graph, or an error listing every missing, misshapen and unexpected tensor.
    pub fn finish(self, class_name: &str) -> Result<Graph> {
        let unexpected: Vec<&String> = self
            .weights
            .keys()
            .filter(|k| !self.used.contains_key(*k))
            .collect();
        if self.missing.is_empty() && self.unusable.is_empty() && unexpected.is_empty() {
            return Ok(self.graph);
        }
        let mut msg =
            format!("the checkpoint does not match what {class_name} with this config.json needs:");
        let mut section = |title: &str, items: Vec<String>| {
            if items.is_empty() {
                return;
            }
            msg.push_str(&format!("\n  {title} ({}):", items.len()));
            for item in items.iter().take(20) {
                msg.push_str(&format!("\n    {item}"));
            }
            if items.len() > 20 {
                msg.push_str(&format!("\n    ... and {} more", items.len() - 20));
            }
        };
        section("missing tensors", self.missing.clone());
        section("tensors of the wrong shape or dtype", self.unusable.clone());
        section(
            "unexpected tensors",
            unexpected.into_iter().cloned().collect(),
        );
        bail!("{msg}")
    }
}
