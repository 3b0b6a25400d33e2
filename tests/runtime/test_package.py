"""kiln-runtime as its own package: one implementation, platform wheels with TVM's runtime only,
installed into a fresh virtualenv without TVM and run there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import kiln.runtime
import kiln_runtime
import numpy as np
import onnx
import onnxruntime as ort

from tests.conftest import tiny_onnx_model
from tests.runtime.conftest import REPO

MAX_INSTALLED_BYTES = 30 * 1024 * 1024
RUNTIME_LIBRARY = {"manylinux_2_28_x86_64": "libtvm_runtime.so", "manylinux_2_28_aarch64": "libtvm_runtime.so",
                   "win_amd64": "tvm_runtime.dll"}
ELF_MACHINE = {"manylinux_2_28_x86_64": 62, "manylinux_2_28_aarch64": 183}


def test_kiln_runtime_is_the_one_implementation() -> None:
    # GIVEN kiln.runtime, the compiler side's loader
    # WHEN its public names are compared with kiln_runtime's
    # THEN each is the very same object (a re-export, not a copy)
    for name in kiln.runtime.__all__:
        assert getattr(kiln.runtime, name) is getattr(kiln_runtime, name), name
    assert {"load", "check_host", "IncompatibleHostError", "ArtifactError", "TensorSpec"} <= set(kiln.runtime.__all__)


def test_pins_have_one_definition() -> None:
    # GIVEN kiln-runtime's pyproject and requirements/runtime.txt
    project = tomllib.loads((REPO / "runtime/pyproject.toml").read_text())["project"]
    pins = dict(line.split("==") for line in (REPO / "requirements/runtime.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    # WHEN the package's exact pin is compared
    exact = {d.split("==")[0]: d.split("==")[1] for d in project["dependencies"] if "==" in d}
    # THEN it is the requirements file's, and compiler.txt takes these pins from runtime.txt (not its own)
    assert exact == {"apache-tvm-ffi": pins["apache-tvm-ffi"]}
    compiler = (REPO / "requirements/compiler.txt").read_text()
    assert "-r runtime.txt" in compiler and not re.search(r"^(numpy|apache-tvm-ffi)==", compiler, re.M)


def test_wheels_carry_the_runtime_library_and_never_the_compiler(wheels: dict[str, Path]) -> None:
    # GIVEN the wheels for linux x86_64, linux aarch64 and win_amd64
    assert set(wheels) == set(RUNTIME_LIBRARY)
    for platform, wheel in wheels.items():
        # WHEN each is opened
        with zipfile.ZipFile(wheel) as zf:
            names = {Path(n).name: n for n in zf.namelist()}
            installed = sum(i.file_size for i in zf.infolist())
            lib = zf.read(names[RUNTIME_LIBRARY[platform]])
            wheel_meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
        # THEN it is tagged for its platform, holds TVM's runtime for that machine, no compiler, and is small
        assert wheel.name.endswith(f"-py3-none-{platform}.whl") and f"Tag: py3-none-{platform}" in wheel_meta
        assert not any("compiler" in n for n in names), sorted(names)
        if platform in ELF_MACHINE:
            assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == ELF_MACHINE[platform]
        else:
            assert lib[:2] == b"MZ"
        assert installed <= MAX_INSTALLED_BYTES, (platform, installed)


def _site_bytes(site: Path, top: str) -> int:
    return sum(p.stat().st_size for p in (site / top).rglob("*") if p.is_file())


def test_wheel_in_a_fresh_virtualenv_without_tvm_runs_artifacts(
        wheels: dict[str, Path], tiny_x86: Path, tree_x86: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    # GIVEN a fresh virtualenv with only the x86_64 wheel and its pinned dependencies
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin/python"
    # Nothing of this session's environment leaks in (PYTHONPATH holds the source tree and the compiler).
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(wheels["manylinux_2_28_x86_64"]), "-r", str(REPO / "requirements/runtime.txt")],
                   env=clean, check=True, timeout=600)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               env=clean, capture_output=True, text=True, check=True).stdout.strip())
    no_tvm = subprocess.run([str(python), "-c", "import tvm"], env=clean, capture_output=True, text=True, check=False)
    # AND inputs for the tiny network and the tree model
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    tree, features, probabilities = tree_x86
    np.save(tmp_path / "features.npy", features)
    # WHEN kiln-run runs each artifact there
    runs = {}
    for name, artifact, feed in (("tiny", tiny_x86, "x=x.npy"), ("tree", tree, "data=features.npy")):
        runs[name] = subprocess.run([str(env / "bin/kiln-run"), str(artifact), "--input", feed,
                                     "--output-dir", str(tmp_path / name)],
                                    cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300, check=False)
    # THEN TVM is absent, both ran, and the outputs equal ONNX Runtime's and XGBoost's
    assert "No module named 'tvm'" in no_tvm.stderr
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr)
    session = ort.InferenceSession(tiny_onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(np.load(tmp_path / "tiny/output_0.npy"), session.run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "tree/output_0.npy").reshape(-1), probabilities,
                               rtol=1e-6, atol=1e-6)
    # AND kiln-runtime's own installed files stay within 30 MB
    assert _site_bytes(site, "kiln_runtime") <= MAX_INSTALLED_BYTES
    print(f"installed: kiln_runtime {_site_bytes(site, 'kiln_runtime') / 2**20:.1f} MiB, tvm_ffi "
          f"{_site_bytes(site, 'tvm_ffi') / 2**20:.1f} MiB, numpy {_site_bytes(site, 'numpy') / 2**20:.1f} MiB")


def test_kiln_run_names_what_is_wrong(tiny_x86: Path, tmp_path: Path) -> None:
    # GIVEN the tiny ml_c4 artifact and an input of the wrong shape, an unknown input name and a non-.npy file
    np.save(tmp_path / "wrong.npy", np.zeros((2, 8), np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    cases = {("x=wrong.npy",): "input 'x' has shape [2, 8]; the model expects [1, 8]",
             ("y=wrong.npy",): "unknown input(s) ['y']",
             ("x=text.npy",): "--input x: cannot read text.npy as a .npy array",
             ("x",): "--input must be NAME=FILE.npy"}
    for feeds, message in cases.items():
        # WHEN kiln-run is called with it
        args = [sys.executable, "-m", "kiln_runtime.cli", str(tiny_x86)]
        for feed in feeds:
            args += ["--input", feed]
        run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        # THEN it exits 2 with one line naming the problem, no traceback
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr


def test_tree_predictor_matches_xgboost_with_missing_values(tree_x86: tuple[Path, np.ndarray, np.ndarray]) -> None:
    # GIVEN the XGBoost artifact and rows with a NaN feature
    artifact, features, probabilities = tree_x86
    # WHEN kiln_runtime runs it in this process (TL2cgen's C ABI, no tl2cgen import)
    code = ("import sys, numpy as np, kiln_runtime; m = kiln_runtime.load(sys.argv[1]); "
            "np.save(sys.argv[3], m.run({'data': np.load(sys.argv[2])})[0]); print('tl2cgen' in sys.modules)")
    np.save(Path(artifact).parent / "f.npy", features)
    run = subprocess.run([sys.executable, "-c", code, str(artifact), str(Path(artifact).parent / "f.npy"),
                          str(Path(artifact).parent / "p.npy")], capture_output=True, text=True, check=True)
    out = np.load(Path(artifact).parent / "p.npy")
    # THEN the probabilities equal XGBoost's (missing value included) in TL2cgen's (rows, targets, classes) shape
    assert out.shape == (len(features), 1, 1) and run.stdout.split() == ["False"]
    np.testing.assert_allclose(out.reshape(-1), probabilities, rtol=1e-6, atol=1e-6)


def test_tiny_artifact_runs_in_process(tiny_x86: Path) -> None:
    # GIVEN the ml_c4 artifact
    model = kiln_runtime.load(tiny_x86)
    x = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    # WHEN it runs (TVM runtime library through tvm_ffi)
    (y,) = model.run({"x": x})
    # THEN it equals ONNX Runtime's result
    session = ort.InferenceSession(onnx.load_from_string(tiny_onnx_model().SerializeToString()).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert model.runtime == "tvm-relax-vm" and y.dtype == np.float32


def test_compiler_images_build_context_holds_what_the_dockerfiles_copy() -> None:
    # GIVEN the CDK build context's allow-list and both compiler Dockerfiles
    from kiln_infra.paths import COMPILER_CONTEXT_EXCLUDE

    allowed = {p[1:].rstrip("/*") for p in COMPILER_CONTEXT_EXCLUDE if p.startswith("!")}
    for dockerfile in ("compiler-container/Dockerfile", "compiler-container/Dockerfile.gpu"):
        # WHEN each COPY from the context is read
        sources = [line.split()[1] for line in (REPO / dockerfile).read_text().splitlines()
                   if line.startswith("COPY ") and "--from" not in line]
        # THEN the allow-list lets it in (kiln-runtime and scripts/kiln_assets.py included)
        for source in sources:
            assert any(source == a or source.startswith(a + "/") for a in allowed), (dockerfile, source)
    assert {"runtime", "scripts/kiln_assets.py"} <= allowed


def test_gpu_images_use_the_cuda_major_that_the_pinned_tvm_links() -> None:
    # GIVEN the CUDA runtime apache-tvm 0.27's libtvm_runtime_cuda.so links (libcudart.so.13) and its pin
    pins = (REPO / "requirements" / "runtime-cuda.txt").read_text()
    cudart_major = re.search(r"^nvidia-cuda-runtime==(\d+)\.", pins, re.M).group(1)  # type: ignore[union-attr]
    from kiln_runtime import tvm_lib

    cuda_lib = next(d / "libtvm_runtime_cuda.so" for d in tvm_lib.library_dirs() if (d / "libtvm_runtime_cuda.so").is_file())
    needed = subprocess.run(["readelf", "-d", str(cuda_lib)], capture_output=True, text=True, check=True).stdout
    assert f"libcudart.so.{cudart_major}]" in needed
    for dockerfile in ("compiler-container/Dockerfile.gpu", "serving-container/Dockerfile.gpu"):
        text = (REPO / dockerfile).read_text()
        # WHEN the image's CUDA base is read
        base = re.search(r"^FROM nvidia/cuda:(\d+)\.\d+\.\d+-", text, re.M)
        # THEN it is that CUDA major
        assert base is not None and base.group(1) == cudart_major, dockerfile
    # AND the compiler's GPU image installs the same pinned CUDA wheels as make install (dev.txt includes them)
    compiler_gpu = (REPO / "compiler-container" / "Dockerfile.gpu").read_text()
    assert "-r /tmp/req/runtime-cuda.txt" in compiler_gpu and "requirements/runtime-cuda.txt" in compiler_gpu
    assert "-r runtime-cuda.txt" in (REPO / "requirements" / "dev.txt").read_text()


def test_the_pinned_tvm_wheel_lacks_what_an_armv7_runtime_build_needs() -> None:
    # GIVEN the pinned apache-tvm (found without importing it): it ships TVM's runtime sources, which is
    # what an armv7 libtvm_runtime would be built from (apache-tvm has no armv7 wheel and no sdist)
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    assert spec is not None and spec.submodule_search_locations
    tvm_dir = Path(spec.submodule_search_locations[0])
    assert (tvm_dir / "src" / "runtime" / "vm" / "executable.cc").is_file()
    # WHEN the headers those sources include are looked for
    includes = (tvm_dir / "include" / "tvm" / "runtime" / "vm" / "executable.h").read_text()
    assert "#include <tvm/support/serializer.h>" in includes
    # THEN TVM's support headers are missing, which is why kiln run --emulate refuses armv7 (ADR 0024):
    # when a wheel ships them, the armv7 runtime can be built from it and this test says so
    missing = [h for h in ("include/tvm/support/io.h", "include/tvm/support/serializer.h", "src/support/bytes_io.h")
               if not (tvm_dir / h).is_file()]
    assert missing, "apache-tvm now ships TVM's support headers: build the armv7 runtime from it (ADR 0024)"
