#!/usr/bin/env python3
"""Files Kiln needs beside its Python packages, made the same way by `make install` and the Dockerfile.

    kiln_assets.py windows-ffi              tvm_ffi.dll of the pinned win_amd64 apache-tvm-ffi wheel
    kiln_assets.py wheels [--dist DIR]      kiln-runtime platform wheels (linux x86_64/aarch64, win_amd64)
    kiln_assets.py emulation-root aarch64   an arm64 Python root with kiln-runtime for `kiln run --emulate`

Everything goes under ``<sys.prefix>/share/kiln`` (the venv locally, /usr/local in the image), where
kiln looks for it; downloads come from PyPI and Debian's archive, are cached under build/, and a
stamp makes a second run with the same inputs a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_SRC = REPO / "runtime"
CACHE = REPO / "build" / "assets-cache"
RUNTIME_REQUIREMENTS = REPO / "requirements" / "runtime.txt"  # kiln-runtime's pinned dependencies
SHARE = Path(sys.prefix) / "share" / "kiln"
PLATFORMS = {  # wheel platform tag -> (apache-tvm members bundled into kiln_runtime/lib)
    "manylinux_2_28_x86_64": ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_cuda.so"),
    "manylinux_2_28_aarch64": ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_cuda.so"),
    "win_amd64": ("tvm/lib/tvm_runtime.dll", "tvm/lib/tvm_runtime_cuda.dll", "apache_tvm.libs/msvcp140.dll",
                  "apache_tvm.libs/vcruntime140.dll", "apache_tvm.libs/vcruntime140_1.dll"),
}
# Emulated machines: Debian architecture, wheel platform tag, qemu-user binary.
EMULATED = {"aarch64": ("arm64", "manylinux_2_28_aarch64")}
# The interpreter of the emulation root: Debian 12's Python 3.11 (the version the cp311 wheels need).
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")


def pin(name: str) -> str:
    """The version requirements/*.txt pins for ``name`` (one definition of every pin)."""
    for req in sorted((REPO / "requirements").glob("*.txt")):
        if req.name == "mxnet.txt":
            continue
        for line in req.read_text().splitlines():
            m = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.strip())
            if m:
                return m.group(1)
    raise SystemExit(f"{name} is not pinned in requirements/*.txt")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def download_wheel(package: str, platform: str) -> Path:
    """The pinned wheel of ``package`` for ``platform`` (cp311), from PyPI once, then from the cache."""
    version = pin(package)
    dest = CACHE / "wheels" / platform
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        _pip("download", "--no-deps", "--only-binary=:all:", "--platform", platform, "--python-version", "3.11",
             "--implementation", "cp", "-d", str(dest), f"{package}=={version}")
        found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not download {package}=={version} for {platform}")
    return found[0]


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _stamped(dest: Path, inputs: dict[str, str]) -> bool:
    stamp = dest / ".kiln-stamp.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == inputs


def _stamp(dest: Path, inputs: dict[str, str]) -> None:
    (dest / ".kiln-stamp.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))


def windows_ffi(dest: Path) -> Path:
    """``dest/win_amd64/tvm_ffi.dll``, which x86_win64 TVM artifacts are linked against."""
    wheel = download_wheel("apache-tvm-ffi", "win_amd64")
    dll = dest / "win_amd64" / "tvm_ffi.dll"
    inputs = {"wheel": wheel.name}
    if dll.is_file() and _stamped(dest, inputs):
        return dll
    dll.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open("tvm_ffi/lib/tvm_ffi.dll") as src, dll.open("wb") as out:
        shutil.copyfileobj(src, out)
    _stamp(dest, inputs)
    print(f"installed {dll} (from {wheel.name})")
    return dll


def _runtime_sources() -> list[Path]:
    return sorted(p for p in RUNTIME_SRC.rglob("*") if p.is_file() and "lib" not in p.relative_to(RUNTIME_SRC).parts
                  and "__pycache__" not in p.parts and ".egg-info" not in str(p) and p.suffix != ".pyc")


def build_wheel(platform: str, dist: Path) -> Path:
    """kiln-runtime for ``platform``: its sources plus that platform's TVM runtime library."""
    tvm_wheel = download_wheel("apache-tvm", platform)
    sources = _runtime_sources()
    tag = hashlib.sha256((_digest(sources) + tvm_wheel.name).encode()).hexdigest()[:16]
    marker = dist / f".kiln-runtime-{platform}.{tag}"
    existing = sorted(dist.glob(f"kiln_runtime-*-py3-none-{platform}.whl"))
    if marker.is_file() and existing:
        return existing[-1]
    for old in [*existing, *dist.glob(f".kiln-runtime-{platform}.*")]:
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="kiln-runtime-wheel-") as tmp:
        stage = Path(tmp) / "runtime"
        for src in sources:
            target = stage / src.relative_to(RUNTIME_SRC)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        lib = stage / "kiln_runtime" / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(tvm_wheel) as zf:
            for member in PLATFORMS[platform]:
                with zf.open(member) as src_file, (lib / Path(member).name).open("wb") as out:
                    shutil.copyfileobj(src_file, out)
        dist.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "--plat-name", platform,
                        "--dist-dir", str(dist.resolve())], cwd=stage, check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    built = sorted(dist.glob(f"kiln_runtime-*-py3-none-{platform}.whl"))
    if not built:
        raise SystemExit(f"no kiln-runtime wheel was built for {platform}")
    marker.touch()
    print(f"built {built[-1]}")
    return built[-1]


def _apt(arch: str, work: Path, *args: str) -> None:
    """apt-get on a private state for a foreign architecture (no dpkg --add-architecture, no root)."""
    state, cache = work / "state", work / "cache"
    for d in (state / "lists" / "partial", cache / "archives" / "partial", work / "sources"):
        d.mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    for src in Path("/etc/apt/sources.list.d").glob("*.sources"):
        shutil.copy(src, work / "sources" / src.name)
    if Path("/etc/apt/sources.list").is_file():
        shutil.copy("/etc/apt/sources.list", work / "sources" / "main.list")
    options = [f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}", f"-oDir::State={state}",
               f"-oDir::State::status={state / 'status'}", f"-oDir::Cache={cache}",
               "-oDir::Etc::SourceList=/dev/null", f"-oDir::Etc::SourceParts={work / 'sources'}",
               "-oDebug::NoLocking=1", "-oAPT::Install-Recommends=false", "-oAPT::Sandbox::User=root"]
    subprocess.run(["apt-get", "-q", *options, *args], check=True, stdout=subprocess.DEVNULL)


def emulation_root(machine: str, dest: Path) -> Path:
    """``dest/<machine>``: Debian's Python for that machine, numpy, apache-tvm-ffi and kiln-runtime."""
    if machine not in EMULATED:
        raise SystemExit(f"no emulation root for {machine}: kiln-runtime needs TVM's runtime library, and "
                         f"apache-tvm publishes it for {sorted(EMULATED)} (besides x86_64) only")
    arch, platform = EMULATED[machine]
    wheel = build_wheel(platform, CACHE / "dist")
    root = dest / machine
    inputs = {"debian": " ".join(ROOT_PACKAGES), "kiln-runtime": _digest([wheel]),
              "requirements": _digest([RUNTIME_REQUIREMENTS])}
    if _stamped(root, inputs):
        return root
    work = CACHE / f"apt-{arch}"
    _apt(arch, work, "update")
    _apt(arch, work, "install", "-y", "--download-only", *ROOT_PACKAGES)
    if root.exists():
        shutil.rmtree(root)
    (root / "sysroot").mkdir(parents=True)
    for deb in sorted((work / "cache" / "archives").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "sysroot")], check=True)
    _pip("install", "--no-deps", "--only-binary=:all:", "--platform", platform, "--python-version", "3.11",
         "--implementation", "cp", "--target", str(root / "site"), "-r", str(RUNTIME_REQUIREMENTS), str(wheel))
    _stamp(root, inputs)
    print(f"emulation root for {machine} in {root}")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    win = sub.add_parser("windows-ffi")
    win.add_argument("--dest", type=Path, default=SHARE / "windows")
    wheels = sub.add_parser("wheels")
    wheels.add_argument("--dist", type=Path, default=REPO / "dist")
    wheels.add_argument("--platform", action="append", choices=sorted(PLATFORMS), default=None)
    emu = sub.add_parser("emulation-root")
    emu.add_argument("machine", choices=sorted(EMULATED))
    emu.add_argument("--dest", type=Path, default=SHARE / "emulation")
    args = parser.parse_args(argv)
    if args.command == "windows-ffi":
        windows_ffi(args.dest)
    elif args.command == "wheels":
        for platform in args.platform or sorted(PLATFORMS):
            print(build_wheel(platform, args.dist))
    else:
        emulation_root(args.machine, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
