#!/usr/bin/env python3
"""onnxruntime's per-call time on a graph, for the runtime_speed bench (developer machines only).

python3 benches/ort_per_call.py GRAPH.onnx INPUTS.safetensors --threads N --calls C
Prints one JSON object: load_s (session creation with full graph optimisation) and per_call_ms
(median over C calls after one warm-up call), on the CPU provider with N intra-op threads.
"""
import argparse
import json
import statistics
import time

import onnxruntime as ort
from safetensors.numpy import load_file

parser = argparse.ArgumentParser()
parser.add_argument("graph")
parser.add_argument("inputs")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--calls", type=int, default=50)
args = parser.parse_args()

options = ort.SessionOptions()
options.intra_op_num_threads = args.threads
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
start = time.perf_counter()
session = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - start
tensors = load_file(args.inputs)
feeds = {i.name: tensors[i.name] for i in session.get_inputs()}
session.run(None, feeds)
times = []
for _ in range(args.calls):
    start = time.perf_counter()
    session.run(None, feeds)
    times.append(time.perf_counter() - start)
print(json.dumps({"load_s": load_s, "per_call_ms": statistics.median(times) * 1e3}))
