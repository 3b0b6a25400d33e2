#!/usr/bin/env python3
"""Run the CUDA artifacts of a gpu-check bundle on this machine's GPU; compare and time them.

Needs only kiln-runtime[cuda] (installed from the bundle's wheels by ./gpu-check) and numpy. For each
artifact in bundle.json: load it (the kernels are compiled for this GPU), run it on the stored input,
compare with the reference output computed on the build host with ONNX Runtime, and time it.
Exit status: 0 all match, 1 a mismatch or a failure, 3 no usable NVIDIA GPU here (nothing was run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NO_GPU = 3


def compare(output: np.ndarray, reference: np.ndarray, rtol: float, atol: float) -> dict[str, Any]:
    """Max abs error and whether ``output`` matches ``reference`` (shape, and numpy's allclose rule)."""
    if output.shape != reference.shape:
        return {"match": False, "max_abs_error": None, "why": f"shape {list(output.shape)} != "
                                                              f"{list(reference.shape)}"}
    error = float(np.abs(output.astype(np.float64) - reference.astype(np.float64)).max()) if output.size else 0.0
    match = bool(np.allclose(output, reference, rtol=rtol, atol=atol))
    return {"match": match, "max_abs_error": error, "why": "" if match else f"beyond rtol={rtol} atol={atol}"}


def latency_ms(run: Any, repeat: int, warmup: int) -> dict[str, float]:
    """Median / min / max wall time of ``run()`` in ms (the call includes the copy back to the host)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def check(bundle: Path, repeat: int, warmup: int) -> tuple[int, list[dict[str, Any]]]:
    """Run every entry of ``bundle/bundle.json``; (exit status, one result per entry)."""
    import kiln_runtime
    from kiln_runtime import tvm_lib

    if not tvm_lib.cuda_present():
        print("gpu-check: no NVIDIA GPU is usable here (driver libcuda.so.1, CUDA 13 runtime and device 0 are "
              "needed); nothing was run", file=sys.stderr)
        return NO_GPU, []
    arch = tvm_lib.device_arch()
    print(f"GPU: compute capability {arch}")
    entries = json.loads((bundle / "bundle.json").read_text())["artifacts"]
    results = []
    for entry in entries:
        result: dict[str, Any] = {"name": entry["name"], "target": entry["target"], "cuda_arch": entry["cuda_arch"],
                                  "device_arch": arch}
        try:
            started = time.perf_counter()
            model = kiln_runtime.load(bundle / entry["artifact"])
            feeds = {entry["input"]: np.load(bundle / entry["input_file"])}
            (output, *_) = model.run(feeds)
            result["first_run_s"] = time.perf_counter() - started  # load + NVRTC + first run
            result.update(compare(output, np.load(bundle / entry["reference_file"]), entry["rtol"], entry["atol"]))
            result.update(latency_ms(lambda m=model, f=feeds: m.run(f), repeat, warmup))
        except Exception as exc:  # one failing artifact must not hide the others' results
            result.update({"match": False, "why": f"{type(exc).__name__}: {exc}"})
        results.append(result)
        print(_line(result), flush=True)
    return (0 if all(r["match"] for r in results) else 1), results


def _line(r: dict[str, Any]) -> str:
    status = "OK  " if r["match"] else "FAIL"
    err = f"max abs err {r['max_abs_error']:.3g}" if r.get("max_abs_error") is not None else ""
    lat = f"median {r['median_ms']:.2f} ms (min {r['min_ms']:.2f})" if "median_ms" in r else ""
    return f"{status} {r['name']:<28} {r['target']:<26} {err:<22} {lat} {r.get('why', '')}".rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, nargs="?", default=Path(__file__).resolve().parent)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--results", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    status, results = check(args.bundle, args.repeat, args.warmup)
    if args.results:
        args.results.write_text(json.dumps({"status": status, "results": results}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
