"""TVM thread-pool settings under a busy core: Kiln artifact vs ONNX Runtime, round-robin.

Usage: bench/threads.py squeezenet artifact.so [--rounds 4] [--busy-seconds 120]
Each configuration (TVM environment variables read once, when the runtime's pool starts) runs
in its own process; processes alternate round by round so host noise hits all alike. With
--busy-seconds, one ``yes`` process (ended by ``timeout``) keeps a core busy meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "default": {},
    "unbound": {"TVM_BIND_THREADS": "0"},
    "no-spin": {"TVM_THREAD_POOL_SPIN_COUNT": "0"},
    "unbound+no-spin": {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0"},
}


def _child(model: str, path: str, repeat: int, threads: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import tvm
    from kiln.benchmark import median_ms
    from kiln_compiler.samples import input_shapes, load_light_model
    from tvm import relax

    onnx_model = load_light_model(model)
    feed = {k: np.random.default_rng(0).random(v).astype("float32") for k, v in input_shapes(onnx_model).items()}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in feed.values()]

    ort_ms = median_ms(lambda: sess.run(None, feed), repeat)
    time.sleep(0.2)
    kiln_ms = median_ms(lambda: vm["main"](*args), repeat)
    print(json.dumps({"kiln_ms": kiln_ms, "ort_ms": ort_ms}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("path")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy-seconds", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.model, args.path, args.repeat, args.threads)
        return
    busy = None
    if args.busy_seconds:
        busy = subprocess.Popen(["timeout", str(args.busy_seconds), "yes"], stdout=subprocess.DEVNULL)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    try:
        for _ in range(args.rounds):
            for name, env in CONFIGS.items():
                child_env = {**os.environ, **env, "TVM_NUM_THREADS": str(args.threads)}
                out = subprocess.run([sys.executable, __file__, args.model, args.path, "--child",
                                      "--repeat", str(args.repeat), "--threads", str(args.threads)],
                                     env=child_env, capture_output=True, text=True, timeout=600, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[name].append(row)
                print(f"{name:16s} Kiln {row['kiln_ms']:8.2f} ms  ORT {row['ort_ms']:8.2f} ms  "
                      f"ratio {row['kiln_ms'] / row['ort_ms']:.2f}", flush=True)
    finally:
        if busy is not None:
            busy.terminate()
            busy.wait()
    for name, rows in results.items():
        ratios = [r["kiln_ms"] / r["ort_ms"] for r in rows]
        print(f"{name:16s} Kiln median {statistics.median(r['kiln_ms'] for r in rows):.2f} ms, "
              f"ratio median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
