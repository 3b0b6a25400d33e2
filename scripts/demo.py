"""`make demo`: compile a real model end to end in local mode for this machine's target, run it, compare.

The same path as production: CreateCompilationJob validation, the Step Functions workflow on
moto, the compiler entrypoint as a process, the artifact downloaded from (embedded) S3. Then the
artifact runs here, its output is checked against ONNX Runtime, and Kiln's latency is put beside
the peers the bench measures (kiln.benchmark: ONNX Runtime and OpenVINO, same threads, each runner in its
own process, interleaved rounds), with the ratio as measured, whatever it is.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from kiln.benchmark import faster_peer, kiln_runner, peer_runners, runner_pool
from kiln.host import host_target, target_isa_label
from kiln_compiler.samples import input_shapes, load_light_model
from rich.console import Console
from rich.table import Table

MODEL = "squeezenet"
ROUNDS = 10
PER_ROUND = 5


def main() -> int:
    console = Console()
    out = Path("demo-out")
    out.mkdir(exist_ok=True)
    target = host_target()
    model = load_light_model(MODEL)
    shapes = input_shapes(model)
    data = model.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"{MODEL}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("model.onnx")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        command = [sys.executable, "-m", "kiln.cli", "compile", str(archive), "--framework", "ONNX",
                   "--target-device", "host", "--data-input-config",
                   json.dumps({k: list(v) for k, v in shapes.items()}), "--output-dir", str(out),
                   "--job-name", f"demo-{MODEL}"]
        console.print(f"$ kiln compile {MODEL}.tar.gz --framework ONNX --target-device host "
                      f"--output-dir {out}", style="bold", highlight=False)
        if subprocess.call(command) != 0:
            return 1
    artifact = out / f"{MODEL}-{target.name}.tar.gz"
    onnx_path = out / f"{MODEL}.onnx"  # what the peers load
    onnx_path.write_bytes(data)
    threads = int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)
    rivals = peer_runners(onnx_path, threads)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    with runner_pool([kiln_runner(artifact, threads), *rivals], feeds) as pool:
        ours = pool.outputs("Kiln")[0]
        reference = rivals[0]  # ONNX Runtime
        theirs = pool.outputs(reference.name)[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)
        console.print(f"\noutput matches {reference.name} (max abs diff {np.abs(ours - theirs).max():.1e})")
        medians = pool.interleaved_medians(rounds=ROUNDS, per_round=PER_ROUND)
    kiln_ms = medians["Kiln"]
    table = Table(title=f"{MODEL}, batch 1 fp32, {threads} threads each, own processes, median of "
                  f"{ROUNDS}x{PER_ROUND} interleaved calls", title_justify="left")
    table.add_column("runtime")
    table.add_column("latency (ms)", justify="right")
    table.add_column("Kiln / it", justify="right")
    table.add_row(f"Kiln ({target.name}, {target_isa_label(target)})", f"{kiln_ms:.2f}", "")
    for peer in rivals:
        table.add_row(peer.name, f"{medians[peer.name]:.2f}", f"{kiln_ms / medians[peer.name]:.2f}")
    console.print(table)
    name, peer_ms = faster_peer(medians, [p.name for p in rivals])
    ratio = kiln_ms / peer_ms
    verdict = "Kiln is faster" if ratio < 1 else f"{name} is faster"
    console.print(f"Kiln / faster peer ({name}): [bold]{ratio:.2f}[/] — {verdict} on this host (below 1: Kiln "
                  "is faster). Untuned; `make bench` measures all five models.", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
