"""Safe unpacking of hostile model archives."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from kiln_compiler.archive import ArchiveLimits, safe_extract
from kiln_compiler.errors import ClientError


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _outside_untouched(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "work" not in p.relative_to(root).parts and p.suffix != ".gz"]


@pytest.fixture()
def sandbox(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path


def test_regular_archive_extracts(sandbox: Path) -> None:
    # GIVEN an ordinary archive with a nested model file
    arc = _tar(sandbox / "m.tar.gz", [_file("model/model.onnx", b"onnx"), _file("labels.txt", b"a\nb")])
    # WHEN it is extracted
    files = safe_extract(arc, sandbox / "work")
    # THEN both files land under the work dir with their content
    assert sorted(p.name for p in files) == ["labels.txt", "model.onnx"]
    assert (sandbox / "work/model/model.onnx").read_bytes() == b"onnx"


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_file("../evil.txt"), "leaves the archive"),
        (_file("a/../../evil.txt"), "leaves the archive"),
        (_file("/tmp/evil_abs.txt"), "absolute path"),
        (_special("link", tarfile.SYMTYPE, "../../etc/passwd"), "outside the archive"),
        (_special("abslink", tarfile.SYMTYPE, "/etc/passwd"), "absolute path"),
        (_special("hard", tarfile.LNKTYPE, "../evil.txt"), "outside the archive"),
        (_special("dev", tarfile.CHRTYPE), "device"),
        (_special("blk", tarfile.BLKTYPE), "device"),
        (_special("fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "chardev",
         "blockdev", "fifo"],
)
def test_hostile_member_is_refused(sandbox: Path, member: tuple[tarfile.TarInfo, bytes | None],
                                   message: str) -> None:
    # GIVEN an archive with a good file and one hostile member
    arc = _tar(sandbox / "h.tar.gz", [_file("model.onnx"), member])
    # WHEN it is extracted
    with pytest.raises(ClientError) as err:
        safe_extract(arc, sandbox / "work")
    # THEN a ClientError names the problem and nothing at all was written
    assert message in str(err.value)
    assert err.value.reason.startswith("ClientError: InputConfiguration: ")
    assert list((sandbox / "work").iterdir()) == []
    assert _outside_untouched(sandbox) == []
    assert not Path("/tmp/evil_abs.txt").exists()


def test_symlink_inside_archive_is_allowed(sandbox: Path) -> None:
    # GIVEN a symlink that stays inside the archive
    arc = _tar(sandbox / "s.tar.gz", [_file("d/model.onnx", b"m"), _special("d/alias.onnx", tarfile.SYMTYPE,
                                                                            "model.onnx")])
    # WHEN extracted
    safe_extract(arc, sandbox / "work")
    # THEN the link resolves to the file inside the work dir
    assert (sandbox / "work/d/alias.onnx").read_bytes() == b"m"


def test_gzip_bomb_is_refused(sandbox: Path) -> None:
    # GIVEN a ~10 KB gzip that declares a 10 MB member of zeros
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("model.bin")
        info.size = 10 * 1024**2
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    arc = sandbox / "bomb.tar.gz"
    arc.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9))
    assert arc.stat().st_size < 16 * 1024
    # WHEN extracted
    with pytest.raises(ClientError, match="compression bomb"):
        safe_extract(arc, sandbox / "work")
    # THEN nothing was written
    assert list((sandbox / "work").iterdir()) == []


def test_total_size_cap(sandbox: Path) -> None:
    # GIVEN a tight total-size cap and an archive over it
    arc = _tar(sandbox / "big.tar.gz", [_file(f"f{i}", bytes(600)) for i in range(3)])
    # WHEN extracted under the cap
    with pytest.raises(ClientError, match="total size"):
        safe_extract(arc, sandbox / "work", ArchiveLimits(max_total_bytes=1000))
    # THEN nothing was written
    assert list((sandbox / "work").iterdir()) == []


def test_hundred_thousand_members_refused(sandbox: Path) -> None:
    # GIVEN an archive with 100k empty members
    arc = sandbox / "many.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        for i in range(100_000):
            tar.addfile(tarfile.TarInfo(f"f{i}"))
    # WHEN extracted
    with pytest.raises(ClientError, match="more than 10000 entries"):
        safe_extract(arc, sandbox / "work")
    # THEN nothing was written
    assert list((sandbox / "work").iterdir()) == []


@pytest.mark.parametrize("payload", [b"", b"not a tar at all", gzip.compress(b"garbage" * 10, mtime=0)],
                         ids=["empty", "text", "gzip-not-tar"])
def test_not_an_archive(sandbox: Path, payload: bytes) -> None:
    # GIVEN a file that is not a tar archive
    arc = sandbox / "bad.tar.gz"
    arc.write_bytes(payload)
    # WHEN extracted
    # THEN a ClientError says so
    with pytest.raises(ClientError, match=r"tar archive|corrupt|no files"):
        safe_extract(arc, sandbox / "work")
