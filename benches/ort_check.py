#!/usr/bin/env python3
"""onnxruntime against ditc on one call of a bundle's graph (a by-hand check; developer machines only).

python3 benches/ort_check.py BUNDLE/model.onnx [--step S] [--out DIR] [--case INPUTS PREFIX]
Runs onnx.checker's full check, then one call of the graph in onnxruntime (CPU provider; ditc's
ai.ditc ops run as their ONNX local functions) on pseudo-random float inputs (a zero state,
`ditc.step` = S, `ditc.branch` = 0, t = 500; with --case the latent and condition inputs of one
case of a ditc inputs file instead), writes those inputs to DIR/inputs.safetensors and ort's outputs
to DIR/ort.safetensors, and prints the `ditc run` command that runs the same call and the `ditc
verify`-style comparison to make: compare with

  ditc run BUNDLE/model.onnx --inputs DIR/inputs.safetensors -o DIR/ditc.safetensors
  python3 benches/ort_check.py --compare DIR/ort.safetensors DIR/ditc.safetensors
"""
import argparse
import os

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file, save_file

TYPES = {1: np.float32, 7: np.int64, 9: np.bool_, 10: np.float16}

parser = argparse.ArgumentParser()
parser.add_argument("graph", nargs="?")
parser.add_argument("--step", type=int, default=25)
parser.add_argument("--out", default="ort-check")
parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
parser.add_argument("--case", nargs=2, metavar=("INPUTS", "PREFIX"),
                    help="take the condition inputs (and `noise` as the latent) from a ditc inputs file")
args = parser.parse_args()

if args.compare:
    a, b = load_file(args.compare[0]), load_file(args.compare[1])
    worst = 0.0
    for name in sorted(a):
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
        worst = max(worst, rel)
        print(f"{name}: rel-L2 {rel:.3e}")
    print(f"worst rel-L2 {worst:.3e}")
    raise SystemExit(0 if worst <= 1e-4 else 1)

onnx.checker.check_model(args.graph, full_check=True)
print(f"onnx.checker full check: ok ({args.graph})")
model = onnx.load(args.graph, load_external_data=False)
rng = np.random.default_rng(0)
case = {}
if args.case:
    case = {k[len(args.case[1]):]: v for k, v in load_file(args.case[0]).items() if k.startswith(args.case[1])}
    case["hidden_states"] = case.pop("noise")
feeds = {}
for i in model.graph.input:
    t = i.type.tensor_type
    shape = [d.dim_value for d in t.shape.dim]
    dtype = TYPES[t.elem_type]
    if i.name == "ditc.step":
        feeds[i.name] = np.array(args.step, dtype=np.int64)
    elif i.name == "ditc.branch":
        feeds[i.name] = np.array(0, dtype=np.int64)
    elif i.name.startswith("ditc.state"):
        feeds[i.name] = np.zeros(shape, dtype=dtype)
    elif i.name in case:
        feeds[i.name] = case[i.name].astype(dtype).reshape(shape)
    elif i.name == "timestep":
        feeds[i.name] = np.full(shape, 500.0, dtype=dtype)
    else:
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
options = ort.SessionOptions()
# No fusions: each ONNX op as written, as tract and ditc run it (fused kernels round differently,
# and a quantized graph turns an ulp into a flipped rounding).
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
options.intra_op_num_threads = 1
session = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
outputs = session.run(names, feeds)
os.makedirs(args.out, exist_ok=True)
save_file({k: np.ascontiguousarray(v) for k, v in feeds.items()}, os.path.join(args.out, "inputs.safetensors"))
save_file({n: np.ascontiguousarray(np.asarray(v)) for n, v in zip(names, outputs)}, os.path.join(args.out, "ort.safetensors"))
print(f"onnxruntime {ort.__version__}: {len(names)} outputs -> {args.out}/ort.safetensors")
