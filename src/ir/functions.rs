//! Model-local functions (`ModelProto.functions`): inlining their calls into the graph.
//!
//! tract-onnx 0.23.9 does not read `ModelProto.functions` (its loader looks only at the graph and
//! refuses an op of an unknown domain), so the runtime inlines every call of a local function into its
//! own copy of the graph before tract sees it. A call is replaced by the function's body: formal
//! inputs and outputs become the call's actual values, every value internal to the body gets a name
//! prefixed by the calling node's name (so two calls never collide), and attributes that refer to the
//! caller's attributes (`ref_attr_name`) take the caller's value, or the function's default, or are
//! dropped when neither exists (as the ONNX spec says for an optional attribute).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use super::{AttrValue, Attribute, Graph, Model, Node};
use crate::onnx::{nodes_from_proto, proto};

/// `model` with every call of one of its local functions inlined (subgraphs included); the functions
/// themselves are left out of the result. A model without functions comes back unchanged.
pub fn inline_local_functions(model: &Model) -> Result<Model> {
    let mut out = model.clone();
    if model.functions.is_empty() {
        return Ok(out);
    }
    let functions: HashMap<(&str, &str), &proto::FunctionProto> = model
        .functions
        .iter()
        .map(|f| ((f.domain.as_str(), f.name.as_str()), f))
        .collect();
    inline_in_graph(&mut out.graph, &functions, 0)?;
    // The body's opsets must be imported by the model (they are the model's own in ditc's output).
    for f in &model.functions {
        for o in &f.opset_import {
            if !out.opsets.iter().any(|(d, _)| *d == o.domain) {
                out.opsets.push((o.domain.clone(), o.version));
            }
        }
    }
    out.functions.clear();
    let used: std::collections::HashSet<&str> = all_domains(&out.graph);
    out.opsets
        .retain(|(d, _)| d.is_empty() || d == "ai.onnx" || used.contains(d.as_str()));
    Ok(out)
}

fn all_domains(graph: &Graph) -> std::collections::HashSet<&str> {
    let mut out = std::collections::HashSet::new();
    for n in &graph.nodes {
        out.insert(n.domain.as_str());
        for g in n.subgraphs() {
            out.extend(all_domains(g));
        }
    }
    out
}

type Functions<'a> = HashMap<(&'a str, &'a str), &'a proto::FunctionProto>;

/// Calls nested deeper than this are refused (a function calling itself would never end).
const MAX_DEPTH: usize = 8;

fn inline_in_graph(graph: &mut Graph, functions: &Functions, depth: usize) -> Result<()> {
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    for mut node in std::mem::take(&mut graph.nodes) {
        for a in &mut node.attributes {
            match &mut a.value {
                AttrValue::Graph(g) => inline_in_graph(g, functions, depth)?,
                AttrValue::Graphs(gs) => {
                    for g in gs {
                        inline_in_graph(g, functions, depth)?;
                    }
                }
                _ => {}
            }
        }
        let key = (node.domain.as_str(), node.op_type.as_str());
        match functions.get(&key) {
            Some(f) => {
                if depth >= MAX_DEPTH {
                    bail!(
                        "node {}: local functions nested more than {MAX_DEPTH} deep",
                        node.label()
                    );
                }
                let mut body = expand_call(&node, f)
                    .with_context(|| format!("inlining local function call {}", node.label()))?;
                let mut inner = Graph {
                    nodes: std::mem::take(&mut body),
                    ..Graph::default()
                };
                inline_in_graph(&mut inner, functions, depth + 1)?;
                nodes.extend(inner.nodes);
            }
            None => nodes.push(node),
        }
    }
    graph.nodes = nodes;
    Ok(())
}

/// The body of `f` for the call `call`: values renamed, attributes resolved.
fn expand_call(call: &Node, f: &proto::FunctionProto) -> Result<Vec<Node>> {
    if call.inputs.len() > f.input.len() || call.outputs.len() > f.output.len() {
        bail!(
            "the call has {} inputs and {} outputs; function {}.{} takes {} and gives {}",
            call.inputs.len(),
            call.outputs.len(),
            f.domain,
            f.name,
            f.input.len(),
            f.output.len()
        );
    }
    let mut rename: HashMap<String, String> = HashMap::new();
    for (i, formal) in f.input.iter().enumerate() {
        // An input the caller leaves out is the empty name: optional inputs stay omitted inside.
        rename.insert(
            formal.clone(),
            call.inputs.get(i).cloned().unwrap_or_default(),
        );
    }
    for (i, formal) in f.output.iter().enumerate() {
        let actual = call.outputs.get(i).cloned().unwrap_or_default();
        let actual = if actual.is_empty() {
            format!("{}/{formal}", call.name)
        } else {
            actual
        };
        rename.insert(formal.clone(), actual);
    }
    let defaults: HashMap<&str, &proto::AttributeProto> = f
        .attribute_proto
        .iter()
        .map(|a| (a.name.as_str(), a))
        .collect();
    let body = nodes_from_proto(&f.node)?;
    let mut out = Vec::with_capacity(body.len());
    for mut n in body {
        let local = |v: &str, rename: &HashMap<String, String>| -> String {
            if v.is_empty() {
                return String::new();
            }
            rename
                .get(v)
                .cloned()
                .unwrap_or_else(|| format!("{}/{v}", call.name))
        };
        n.inputs = n.inputs.iter().map(|v| local(v, &rename)).collect();
        n.outputs = n.outputs.iter().map(|v| local(v, &rename)).collect();
        n.name = format!("{}/{}", call.name, n.name);
        let mut attributes = Vec::with_capacity(n.attributes.len());
        for a in n.attributes {
            match resolve_attribute(a, call, &defaults)? {
                Some(a) => attributes.push(a),
                None => continue,
            }
        }
        n.attributes = attributes;
        out.push(n);
    }
    Ok(out)
}

/// A body attribute with its reference to the caller's attributes resolved (None: neither the
/// caller nor the function gives a value, so the attribute is absent).
fn resolve_attribute(
    a: Attribute,
    call: &Node,
    defaults: &HashMap<&str, &proto::AttributeProto>,
) -> Result<Option<Attribute>> {
    let AttrValue::Other(p) = &a.value else {
        return Ok(Some(a));
    };
    if p.ref_attr_name.is_empty() {
        return Ok(Some(a));
    }
    let referred = p.ref_attr_name.as_str();
    if let Some(value) = call.attr(referred) {
        return Ok(Some(Attribute {
            name: a.name,
            value: value.clone(),
        }));
    }
    let Some(default) = defaults.get(referred) else {
        return Ok(None);
    };
    let mut proto = (*default).clone();
    proto.name = a.name.clone();
    let resolved = crate::onnx::attribute_value(proto)
        .with_context(|| format!("the default of attribute '{referred}'"))?;
    Ok(Some(Attribute {
        name: a.name,
        value: resolved,
    }))
}
