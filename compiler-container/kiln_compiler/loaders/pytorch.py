"""PyTorch models: ``torch.export`` ExportedPrograms (``.pt2``) and TorchScript (``.pt``/``.pth``, Neo's format).

Both end as an ExportedProgram imported with TVM's ``from_exported_program``. TorchScript goes
through ``torch._export.converter.TS2EPConverter`` (a private torch API, guarded: a failure
becomes a ClientError asking for ``torch.export``), which needs example inputs, so TorchScript
needs DataInputConfig. Symbolic dimensions left in the program are bound to the configured shapes.

Untrusted files: before torch opens the file, Kiln checks it like the outer archive (entry count,
sizes, expansion ratio; :func:`kiln_compiler.archive.check_zip`) and reads the globals of every
pickle in it and in the zips nested in it (:mod:`kiln_compiler.pickles`, nothing is unpickled): a
global other than TorchScript's own classes and torch's tensor rebuilders is refused unless
CompilerOptions ``allow_pickle`` is true, as for scikit-learn pickles. ``torch.jit.load`` unpickles
with TorchScript's restricted unpickler. ``torch.export.load`` falls back to
``torch.load(weights_only=False)`` and ``pickle.loads`` for some payloads; without ``allow_pickle``
Kiln forces ``weights_only`` for the load (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) and refuses archives
with pickled custom/opaque objects.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln.runtime import TensorSpec

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from ..pickles import scan_zip
from . import LoadedModel, find_model_files

log = logging.getLogger(__name__)

_SUFFIXES = (".pt2", ".pt", ".pth")
_HINT = ("Save the model with torch.export.save(torch.export.export(model, args), 'model.pt2'), or as "
         "TorchScript with torch.jit.trace(model, args).save('model.pth').")
# Payloads torch.export.load unpickles without restriction (torchbind objects, opaque Python objects).
_PICKLED_PAYLOADS = ("data/constants/custom_obj_", "data/constants/opaque_obj_")
# Globals the pickles of TorchScript and torch.save/torch.export archives of plain tensors refer to:
# TorchScript's own classes (``__torch__.*``, resolved by TorchScript's type system, never imported),
# torch's tensor and storage rebuilders, dtypes, and the containers around them. Anything else is code.
_TENSOR_GLOBALS = re.compile(
    r"__torch__(\.\w+)*"
    r"|collections\.OrderedDict|builtins\.(set|frozenset|slice)|_codecs\.encode"
    r"|torch\._utils\._rebuild_(tensor|tensor_v2|tensor_v3|parameter|parameter_with_state|qtensor|sparse_tensor"
    r"|device_tensor_from_numpy|meta_tensor_no_storage|wrapper_subclass)"
    r"|torch\.jit\._pickle\.(restore_type_tag|build_intlist|build_tensorlist|build_doublelist|build_boollist)"
    r"|torch\.\w*Storage|torch\.storage\.UntypedStorage|torch\.(device|Size|dtype|layout|memory_format)"
    r"|torch\.(float\d*|double|half|bfloat16|complex\d+|u?int\d+|long|short|bool|cfloat|cdouble)"
    r"|torch\.serialization\._get_layout")


def check_pickled_globals(path: Path, options: CompilerOptions) -> None:
    """Refuse a PyTorch file whose pickles import anything but tensors (unless ``allow_pickle``)."""
    outside = scan_zip(path).outside(_TENSOR_GLOBALS)
    if not outside:
        return
    if options.allow_pickle:
        log.warning("'%s' pickles %s; loading it because CompilerOptions allow_pickle is true", path.name, outside)
        return
    entry, names = next(iter(outside.items()))
    raise ClientError(
        f"'{entry}' holds pickled Python objects {names[:5]}: loading them would run code from the file, so Kiln "
        "refuses it by default. Save a model whose pickles hold only tensors (torch.export.save or "
        "torch.jit.save), or set CompilerOptions {\"allow_pickle\": true} if you trust this file"
    )


def _kind(path: Path) -> str:
    """'export' (torch.export archive) or 'script' (TorchScript); ClientError for anything else."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ClientError(
            f"'{path.name}' is neither a torch.export archive nor TorchScript (it is not a zip archive: probably "
            f"a pickled model or state_dict, which Kiln does not load). {_HINT}"
        ) from None
    if any(n.endswith("/archive_format") or n == "archive_format" or "/models/" in n for n in names):
        return "export"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and any("/code/" in n for n in names):
        return "script"
    raise ClientError(f"'{path.name}' is a zip archive but neither a torch.export archive nor TorchScript "
                      f"(it holds {names[:5]}). {_HINT}")


@contextmanager
def _weights_only() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` for every load torch makes inside the block."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _load_exported(path: Path, options: CompilerOptions | None = None) -> Any:
    import torch

    options = options or CompilerOptions()
    with zipfile.ZipFile(path) as zf:
        pickled = [n for n in zf.namelist() if any(p in n for p in _PICKLED_PAYLOADS)]
    if pickled and options.allow_pickle:
        log.warning("'%s' holds pickled objects %s; loading them because allow_pickle is true", path.name, pickled)
        return torch.export.load(str(path))
    if pickled:
        raise ClientError(
            f"'{path.name}' holds pickled Python objects {pickled[:3]} (torchbind or opaque constants); loading "
            "them would run code from the file, so Kiln refuses them. Export a model whose constants are tensors"
        )
    try:
        with _weights_only():
            return torch.export.load(str(path))
    except Exception as exc:
        log.exception("torch.export.load failed")
        raise ClientError(f"'{path.name}' could not be loaded with torch.export.load ({_first_line(exc)}). "
                          f"{_HINT}") from None


def _input_dtype(i: int, name: str, config: DataInputConfig, options: CompilerOptions,
                 model_dtype: str | None) -> str:
    """CompilerOptions 'dtype' for the input, else the model's, else float32."""
    given = options.dtype
    if model_dtype is not None and given is not None and given != model_dtype:
        raise ClientError(f"input #{i} '{name}' of the model is {model_dtype}, but the configuration asks for "
                          f"{given}; fix CompilerOptions 'dtype' (or the input's dtype) or omit it")
    return given or model_dtype or "float32"


def _configured_shapes(config: DataInputConfig, count: int | None) -> list[tuple[str | None, tuple[int, ...]]]:
    """DataInputConfig as a positional list of (name or None, shape): PyTorch inputs are positional."""
    items: list[tuple[str | None, tuple[int, ...]]] = (
        [(k, v) for k, v in config.by_name.items()] if config.by_name else [(None, s) for s in config.by_position]
    )
    if count is not None and items and len(items) != count:
        raise ClientError(f"DataInputConfig gives {len(items)} input shape(s) but the PyTorch model takes {count} "
                          "tensor input(s); list one shape per forward() argument, in order")
    return items


def _from_script(path: Path, config: DataInputConfig, options: CompilerOptions) -> tuple[Any, list[TensorSpec]]:
    import torch

    configured = _configured_shapes(config, None)
    if not configured:
        raise ClientError(
            "TorchScript models need DataInputConfig with the input shapes, for example "
            "{\"input0\": [1, 3, 224, 224]} or [[1, 3, 224, 224]]"
        )
    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        log.exception("torch.jit.load failed")
        raise ClientError(f"'{path.name}' could not be loaded as TorchScript ({_first_line(exc)}). {_HINT}") from None
    script.eval()
    specs = []
    for i, (name, shape) in enumerate(configured):
        label = name or f"input{i}"
        specs.append(TensorSpec(label, shape, _input_dtype(i, label, config, options, None)))
    args = tuple(_example(s) for s in specs)
    try:
        from torch._export.converter import TS2EPConverter  # private API: may move between torch releases

        with torch.no_grad():
            program = TS2EPConverter(script, args).convert()
    except Exception as exc:
        log.exception("TorchScript -> ExportedProgram conversion failed")
        raise ClientError(
            f"the TorchScript model could not be converted for compilation ({_first_line(exc)}); check that "
            "DataInputConfig matches forward()'s inputs, or export the model with torch.export and upload the "
            ".pt2 file instead"
        ) from None
    return program, specs


def _example(spec: TensorSpec) -> Any:
    import torch

    # zeros: valid for float inputs and for integer ones (token ids, indices) alike
    return torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype))


def _program_inputs(program: Any) -> list[tuple[str, tuple[int | None, ...], str]]:
    """(name, shape with None for symbolic dims, dtype) of the program's user tensor inputs."""
    user = set(program.graph_signature.user_inputs)
    declared = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise ClientError(f"the exported program's input '{node.name}' is not a tensor; only tensor inputs "
                              "can be compiled")
        shape = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
        declared.append((node.name, shape, str(val.dtype).removeprefix("torch.")))
    return declared


def _from_exported(program: Any, config: DataInputConfig, options: CompilerOptions) -> list[TensorSpec]:
    declared = _program_inputs(program)
    by_name = bool(config.by_name) and set(config.by_name) <= {n for n, _, _ in declared}
    configured = [] if by_name else _configured_shapes(config, len(declared))
    specs = []
    for i, (name, shape, dtype) in enumerate(declared):
        label, given = name, None
        if by_name:
            given = config.by_name.get(name)
        elif configured:
            label, given = configured[i][0] or name, configured[i][1]
        if given is None:
            if any(d is None for d in shape):
                raise ClientError(
                    f"input '{name}' has a dynamic shape {['?' if d is None else d for d in shape]}; give its shape "
                    f"in DataInputConfig, for example {{\"{name}\": {[1 if d is None else d for d in shape]}}}"
                )
            given = tuple(int(d) for d in shape if d is not None)
        elif len(given) != len(shape) or any(d is not None and d != g for d, g in zip(shape, given, strict=True)):
            raise ClientError(
                f"DataInputConfig shape {list(given)} for input #{i} '{label}' does not match the exported "
                f"program's shape {['?' if d is None else d for d in shape]}; fix DataInputConfig or omit it"
            )
        specs.append(TensorSpec(label, tuple(given), _input_dtype(i, label, config, options, dtype)))
    return specs


def _bind_shapes(mod: Any, specs: list[TensorSpec]) -> Any:
    """Replace symbolic dimensions of ``main``'s inputs with the configured sizes."""
    from tvm import relax, tirx

    params = mod["main"].params
    if len(params) != len(specs):
        raise ClientError(f"the converted model takes {len(params)} input(s) but {len(specs)} were configured")
    binding: dict[Any, int] = {}
    for param, spec in zip(params, specs, strict=True):
        for dim, size in zip(param.ty.shape, spec.shape, strict=True):
            if isinstance(dim, tirx.Var):
                if binding.get(dim, size) != size:
                    raise ClientError(f"DataInputConfig gives inconsistent sizes for the model's dimension {dim}")
                binding[dim] = size
    if binding:
        mod = relax.transform.BindSymbolicVars(binding, "main")(mod)
    return mod


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load one ``.pt2`` / ``.pt`` / ``.pth`` model from ``model_dir`` into a Relax IRModule."""
    files = find_model_files(model_dir, _SUFFIXES, "PYTORCH", _HINT)
    if len(files) > 1:
        rel = [str(f.relative_to(model_dir)) for f in files]
        raise ClientError(f"the archive contains several PyTorch model files {rel}; include exactly one")
    path = files[0]
    if zipfile.is_zipfile(path):  # caps and pickle check first; _kind explains what a non-zip is
        check_pickled_globals(path, options)
    kind = _kind(path)

    import torch

    if kind == "export":
        program = _load_exported(path, options)
        specs = _from_exported(program, config, options)
    else:
        program, specs = _from_script(path, config, options)

    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(program, keep_params_as_input=False, unwrap_unit_return_tuple=True)
        mod = _bind_shapes(mod, specs)
    except ClientError:
        raise
    except Exception as exc:
        log.exception("Relax import of the exported program failed")
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise ClientError(f"the PyTorch model could not be converted: {(lines[-1] if lines else type(exc).__name__)[:300]}"
                          ) from None
    from .onnx import relax_outputs

    outputs = relax_outputs(mod, [])
    if any(d < 0 for o in outputs for d in o.shape):
        raise ClientError(f"the model's output shapes {[list(o.shape) for o in outputs]} still depend on an input "
                          "size that DataInputConfig does not fix; give every input's full shape")
    return LoadedModel(
        framework="PYTORCH",
        framework_version=f"torch {torch.__version__.split('+')[0]} ({'torch.export' if kind == 'export' else 'TorchScript'})",
        kind="relax",
        inputs=specs,
        outputs=outputs,
        model_files=[str(path.relative_to(model_dir))],
        mod=mod,
        params=None,
    )
