"""Hostile model files: each refused with a ClientError before a file outside the work dir is read,
user code runs, or a large allocation happens; reasons never name the compiler's internal paths."""

from __future__ import annotations

import io
import json
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from kiln_compiler.archive import ArchiveLimits, check_zip
from kiln_compiler.errors import ClientError, scrub_paths
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig
from kiln_compiler.pickles import UNRESOLVED, pickled_globals
from onnx import TensorProto, helper

from tests.compiler.conftest import entrypoint_job, make_tar, run_entrypoint
from tests.conftest import tiny_onnx_model


class _Payload:
    """Unpickling this writes a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def _external_model(location: str, dims: tuple[int, ...] = (8, 4)) -> onnx.ModelProto:
    """The tiny model with its weight W stored as external data at ``location``."""
    model = tiny_onnx_model()
    weight = next(i for i in model.graph.initializer if i.name == "W")
    weight.ClearField("raw_data")
    del weight.dims[:]
    weight.dims.extend(dims)
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "128")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """An unpacked archive directory inside a work dir, as the compiler lays it out."""
    path = tmp_path / "work" / "model"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def no_external_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every call of onnx's external-data loader (the refusal must come before it)."""
    from onnx import external_data_helper

    calls: list[str] = []
    original = external_data_helper.load_external_data_for_model

    def spy(model: Any, base_dir: str) -> None:
        calls.append(base_dir)
        original(model, base_dir)

    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", spy)
    return calls


@pytest.mark.parametrize("location", ["/etc/passwd", "../../../etc/passwd", "sub/../../outside.bin"])
def test_onnx_external_data_outside_the_archive_is_refused(model_dir: Path, location: str,
                                                           no_external_reads: list[str]) -> None:
    # GIVEN an ONNX model whose weight points at a file outside the archive (which exists)
    (model_dir.parent.parent / "outside.bin").write_bytes(b"\0" * 128)
    onnx.save(_external_model(location), str(model_dir / "model.onnx"))
    # WHEN it is loaded
    with pytest.raises(ClientError) as info:
        load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())
    # THEN it is refused naming the tensor and the location, before any external data was read
    assert "tensor 'W' keeps its data in" in str(info.value) and location in str(info.value)
    assert "outside the model archive" in str(info.value)
    assert no_external_reads == []
    # AND the reason does not name the work dir
    assert str(model_dir) not in info.value.reason


def test_onnx_external_data_through_a_symlink_out_is_refused(model_dir: Path, no_external_reads: list[str]) -> None:
    # GIVEN external data named inside the archive, but the name is a link to a file outside it
    (model_dir.parent / "secret.bin").write_bytes(b"\0" * 128)
    (model_dir / "weights.bin").symlink_to(model_dir.parent / "secret.bin")
    onnx.save(_external_model("weights.bin"), str(model_dir / "model.onnx"))
    # WHEN it is loaded THEN it is refused before anything is read
    with pytest.raises(ClientError, match="leads outside the model archive"):
        load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())
    assert no_external_reads == []


def test_onnx_external_data_inside_the_archive_still_loads(model_dir: Path) -> None:
    # GIVEN a model saved the standard way with its weights as external data next to it
    onnx.save(tiny_onnx_model(), str(model_dir / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    # WHEN it is loaded THEN it is accepted with its input
    loaded = load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())
    assert [(s.name, s.shape) for s in loaded.inputs] == [("x", (1, 8))]


@pytest.mark.parametrize("where", ["initializer", "constant", "external"])
def test_onnx_with_billions_of_declared_elements_is_refused(model_dir: Path, where: str,
                                                            no_external_reads: list[str]) -> None:
    # GIVEN a small ONNX file declaring a tensor of 10^15 float32 elements (4 PB), with no data
    huge = (100_000, 100_000, 100_000)
    if where == "external":
        (model_dir / "w.bin").write_bytes(b"\0" * 128)
        model = _external_model("w.bin", huge)
    else:
        model = tiny_onnx_model()
        tensor = TensorProto(name="Huge", data_type=TensorProto.FLOAT, dims=huge)
        if where == "initializer":
            model.graph.initializer.append(tensor)
        else:
            model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=tensor))
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())
    assert (model_dir / "model.onnx").stat().st_size < 10_000
    # WHEN it is loaded THEN it is refused from the declared size, naming the tensor, nothing read
    with pytest.raises(ClientError, match=r"declares 1000000000000000 elements"):
        load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())
    assert no_external_reads == []


def test_onnx_file_beyond_protobufs_limit_is_refused_unread(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a .onnx file of more than 2 GiB (sparse: nothing is written)
    with open(model_dir / "model.onnx", "wb") as handle:
        handle.truncate(2 * 1024**3 + 1)
    read: list[str] = []
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: read.append("onnx.load"))
    # WHEN it is loaded THEN it is refused from its size, before onnx reads it
    with pytest.raises(ClientError, match="larger than 2 GiB; save the model with its weights as external data"):
        load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())
    assert read == []


def test_onnx_input_declaring_terabytes_is_refused(model_dir: Path) -> None:
    # GIVEN a model whose declared input shape is [1000000, 1000000] float32 (4 TB)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1_000_000, 1_000_000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1_000_000, 1_000_000])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model_dir / "model.onnx"))
    # WHEN it is loaded without DataInputConfig THEN the model's own shape is capped, naming the input
    with pytest.raises(ClientError, match=r"input 'x' has shape \[1000000, 1000000\], 4000000000000 bytes"):
        load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())


def test_data_input_config_of_terabytes_is_refused_by_the_compiler_too() -> None:
    # GIVEN a DataInputConfig whose shape would take 4 TB (the API refuses it at create; the compiler re-checks)
    # WHEN the compiler parses it THEN it is a ClientError naming the member, before anything is allocated
    with pytest.raises(ClientError, match=r"inputConfig.dataInputConfig.x.*takes 4000000000000 bytes"):
        DataInputConfig.parse('{"x": [1000000, 1000000]}', "ONNX")


# -- PyTorch: pickled globals ------------------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small conv net saved as TorchScript (.pth) and torch.export (.pt2)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    example = (torch.zeros(1, 3, 8, 8),)
    root = tmp_path_factory.mktemp("torch")
    torch.jit.trace(model, example).save(str(root / "model.pth"))
    torch.export.save(torch.export.export(model, example), str(root / "model.pt2"))
    return {"script": root / "model.pth", "export": root / "model.pt2"}


def _rewrite_zip(src: Path, dest: Path, replace: dict[str, bytes]) -> None:
    """Copy a zip, replacing the entries whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = next((v for k, v in replace.items() if item.filename.endswith(k)), None)
            zout.writestr(item, data if data is not None else zin.read(item.filename))


def _nested_torch_save(payload: object) -> bytes:
    """What torch.save writes (a zip holding data.pkl), with ``payload`` pickled as its data.pkl."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        zf.writestr("archive/version", b"3\n")
    return buffer.getvalue()


@pytest.mark.parametrize(("kind", "entry", "make"), [
    ("script", "constants.pkl", lambda marker: pickle.dumps(_Payload(marker))),  # protocol 5: STACK_GLOBAL
    ("script", "data.pkl", lambda marker: pickle.dumps(_Payload(marker), protocol=2)),  # GLOBAL
    ("export", "sample_inputs/model.pt", lambda marker: _nested_torch_save(_Payload(marker))),  # a zip in the zip
])
def test_pytorch_pickled_globals_are_refused_without_allow_pickle(torch_files: dict[str, Path], tmp_path: Path,
                                                                  kind: str, entry: str, make: Any) -> None:
    # GIVEN a real TorchScript / torch.export file with one pickle replaced by one that imports code
    marker = tmp_path / "marker"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    target = model_dir / torch_files[kind].name
    _rewrite_zip(torch_files[kind], target, {entry: make(marker)})
    # WHEN it is loaded without allow_pickle
    with pytest.raises(ClientError) as info:
        load_model("PYTORCH", model_dir, DataInputConfig.parse("[[1, 3, 8, 8]]", "PYTORCH"), CompilerOptions())
    # THEN it is refused naming the pickle and the global, and the payload never ran
    assert "pickled Python objects" in str(info.value) and "allow_pickle" in str(info.value)
    assert "pathlib" in str(info.value) and entry in str(info.value)
    assert not marker.exists()


def test_pytorch_pickled_globals_pass_the_check_with_allow_pickle(torch_files: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    # GIVEN a TorchScript file whose constants.pkl imports a harmless non-tensor global
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _rewrite_zip(torch_files["script"], model_dir / "model.pth", {"constants.pkl": pickle.dumps(Path("x"))})
    config = DataInputConfig.parse("[[1, 3, 8, 8]]", "PYTORCH")
    with pytest.raises(ClientError, match="pickled Python objects"):
        load_model("PYTORCH", model_dir, config, CompilerOptions())
    # WHEN the user opts in with allow_pickle
    # THEN Kiln's check lets it through to torch (whose own TorchScript unpickler then decides)
    try:
        load_model("PYTORCH", model_dir, config, CompilerOptions.parse('{"allow_pickle": true}'))
    except ClientError as exc:
        assert "pickled Python objects" not in str(exc)


@pytest.mark.parametrize("kind", ["script", "export"])
def test_real_pytorch_files_hold_only_tensor_globals(torch_files: dict[str, Path], kind: str) -> None:
    # GIVEN files saved by torch itself WHEN their pickles are read THEN every global is on the tensor list
    from kiln_compiler.loaders.pytorch import _TENSOR_GLOBALS
    from kiln_compiler.pickles import scan_zip

    scanned = scan_zip(torch_files[kind])
    assert scanned.globals_by_entry, "the scan found no pickle at all"
    assert scanned.outside(_TENSOR_GLOBALS) == {}


def test_pickle_globals_are_read_without_unpickling(tmp_path: Path) -> None:
    # GIVEN pickles of every protocol that would run code, and a truncated one
    marker = tmp_path / "marker"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        # WHEN their globals are read THEN the callable is named, and nothing ran
        found = pickled_globals(pickle.dumps(_Payload(marker), protocol=protocol))
        assert found & {"pathlib.Path.write_text", "pathlib.Path"}, (protocol, found)
    assert pickled_globals(pickle.dumps(_Payload(marker))[:-5]) >= {UNRESOLVED}
    assert pickled_globals(pickle.dumps({"a": [1, 2.0, "s"]})) == set()
    assert not marker.exists()


# -- zip bombs inside model files ---------------------------------------------------------------

def _zip_bomb(path: Path, inner: str, size: int = 64 * 1024**2) -> Path:
    """A zip whose one entry is ``size`` zero bytes, deflated (about 1000x)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open(inner, "w") as out:
        chunk = b"\0" * 1024**2
        for _ in range(size // len(chunk)):
            out.write(chunk)
    return path


@pytest.mark.parametrize(("framework", "name", "inner", "config"), [
    ("KERAS", "model.keras", "model.weights.h5", '{"x": [1, 3, 8, 8]}'),
    ("PYTORCH", "model.pt2", "model/data/weights/weight_0", None),
    ("PYTORCH", "model.pth", "model/data/0", "[[1, 3, 8, 8]]"),
])
def test_zip_bomb_inside_a_model_file_is_refused(tmp_path: Path, framework: str, name: str, inner: str,
                                                 config: str | None) -> None:
    # GIVEN a .keras / .pt2 / TorchScript file that is a zip expanding about 1000x
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _zip_bomb(model_dir / name, inner)
    # WHEN it is loaded THEN the archive's ratio cap refuses it before the framework opens it
    with pytest.raises(ClientError, match="compression bomb"):
        load_model(framework, model_dir, DataInputConfig.parse(config, framework), CompilerOptions())


def test_zip_caps_on_entries_names_and_sizes(tmp_path: Path) -> None:
    # GIVEN zips with too many entries, an entry leaving the file, and one declaring more than the cap
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(11):
            zf.writestr(f"e{i}", b"")
    escape = tmp_path / "escape.zip"
    with zipfile.ZipFile(escape, "w") as zf:
        zf.writestr("../../evil", b"x")
    big = _zip_bomb(tmp_path / "big.zip", "w", size=2 * 1024**2)
    limits = ArchiveLimits(max_members=10, max_member_bytes=1024**2, max_total_bytes=4 * 1024**2)
    # WHEN they are checked THEN each is refused naming what is wrong
    with pytest.raises(ClientError, match="11 entries"):
        check_zip(many, limits)
    with pytest.raises(ClientError, match="leaves the file"):
        check_zip(escape, limits)
    with pytest.raises(ClientError, match="per-file limit"):
        check_zip(big, limits)
    with pytest.raises(ClientError, match="not a readable zip"):
        check_zip(many, limits, data=b"PK\x03\x04 truncated")


# -- internal paths are scrubbed from reasons --------------------------------------------------

def test_scrub_paths_keeps_archive_paths_and_drops_internal_ones() -> None:
    # GIVEN a reason naming files in the unpacked archive, in the work dir and in a temporary dir
    work = Path("/tmp/kiln-local-abc/containers/job-1/kiln-x1")
    reason = (f"ClientError: InputConfiguration: '{work}/model/sub/w.bin' missing; see {work}/build/lib.so, "
              f"/tmp/tmpq1/x.o and {work}/model")
    # WHEN it is scrubbed
    clean = scrub_paths(reason, model_dir=work / "model", internal_roots=[work, "/tmp"])
    # THEN archive paths are relative to the archive, internal ones reduced to a file name
    assert clean == "ClientError: InputConfiguration: 'sub/w.bin' missing; see lib.so, x.o and the archive"


def test_entrypoint_reason_never_names_the_work_dir(buckets: Any, aws_env: dict[str, str], tmp_path: Path) -> None:
    # GIVEN a hostile ONNX model (external data at ../..) in S3, run by the container entrypoint
    model = _external_model("../../../../etc/passwd")
    archive = make_tar(tmp_path / "evil.tar.gz", {"model.onnx": model.SerializeToString()})
    buckets.upload_file(str(archive), "user-models", "in/extdata.tar.gz")
    job = entrypoint_job("hostile-extdata", "s3://user-models/in/extdata.tar.gz")
    job["InputConfig"]["DataInputConfig"] = json.dumps({"x": [1, 8]})
    work = tmp_path / "containers" / "hostile-extdata"
    work.mkdir(parents=True)
    # WHEN it runs
    proc = run_entrypoint(job, aws_env, work)
    # THEN it fails with a ClientError naming the tensor and the location it gave
    assert proc.returncode == 1, proc.stderr[-2000:]
    failure = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failure["Cause"].startswith("ClientError: InputConfiguration: tensor 'W' keeps its data in "
                                       "'../../../../etc/passwd'")
    # AND no internal path appears in it: not the work dir, not the temporary dir
    assert str(tmp_path) not in failure["Cause"] and tempfile.gettempdir() + "/" not in failure["Cause"]
    assert "kiln-" not in failure["Cause"]


def test_onnx_external_data_missing_from_the_archive(model_dir: Path, no_external_reads: list[str]) -> None:
    # GIVEN a model whose external data file is not in the archive
    onnx.save(_external_model("missing.bin"), str(model_dir / "model.onnx"))
    # WHEN it is loaded THEN the reason names the file as the user wrote it, and nothing was read
    with pytest.raises(ClientError, match=r"'missing\.bin', which the archive does not contain"):
        load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())
    assert no_external_reads == []
