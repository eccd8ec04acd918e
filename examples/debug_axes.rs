use ditc::analysis::axes::{propagate, tags_of};
use ditc::ir::infer_types;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let stop = std::env::args().nth(2).unwrap();
    let m = ditc::onnx::read_model(std::path::Path::new(&path)).unwrap();
    let types = infer_types(&m.graph, m.default_opset());
    let axes = propagate(&m.graph, &types);
    for n in &m.graph.nodes {
        let o = &n.outputs[0];
        let t = types.get(o);
        let a = axes.get(o).map(|a| {
            a.iter()
                .map(|d| {
                    format!(
                        "{:?}",
                        d.iter().map(|x| (x.tags, x.size)).collect::<Vec<_>>()
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        });
        println!(
            "{} {} {:?} {:?} {:?}",
            n.name,
            n.op_type,
            n.inputs,
            t.and_then(|t| t.shape.clone()),
            a
        );
        let _ = tags_of;
        if n.name == stop {
            break;
        }
    }
}
