"""Safe extraction of user-supplied model archives."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ClientError


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps that stop archive bombs before they fill the disk."""

    max_members: int = 10_000
    max_total_bytes: int = 8 * 1024**3
    max_member_bytes: int = 4 * 1024**3
    max_ratio: float = 200.0  # uncompressed size / compressed size


DEFAULT_LIMITS = ArchiveLimits()


def _is_within(base: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise ClientError(f"the model archive contains an absolute path '{name}'; archive paths must be relative")
    parts = Path(name).parts
    if ".." in parts:
        raise ClientError(f"the model archive contains a path that leaves the archive ('{name}'); remove '..' entries")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise ClientError(f"the model archive contains a device or FIFO '{name}'; only files and directories are allowed")
    if member.issym() or member.islnk():
        link = member.linkname
        if os.path.isabs(link):
            raise ClientError(f"the model archive contains a link '{name}' to an absolute path '{link}'")
        base = dest / Path(name).parent if member.issym() else dest
        if not _is_within(dest, base / link):
            raise ClientError(f"the model archive contains a link '{name}' pointing outside the archive ('{link}')")
    elif not (member.isfile() or member.isdir()):
        raise ClientError(f"the model archive contains an unsupported entry type for '{name}'")


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> list[Path]:
    """Extract a .tar/.tar.gz into ``dest``; raise ClientError on anything hostile.

    Every member is checked before anything is written, then extraction uses tarfile's
    ``data`` filter as a second line of defence. Returns the extracted regular files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    compressed = max(archive.stat().st_size, 1)
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ClientError(
            f"the model artifact is not a readable tar archive ({exc}); upload a .tar.gz of the model files"
        ) from None
    with tar:
        members: list[tarfile.TarInfo] = []
        total = 0
        try:
            for member in tar:  # streaming: the caps apply before the whole index is read
                members.append(member)
                if len(members) > limits.max_members:
                    raise ClientError(
                        f"the model archive has more than {limits.max_members} entries; package only the model files"
                    )
                _check_member(member, dest)
                if member.isfile():
                    if member.size > limits.max_member_bytes:
                        raise ClientError(f"the archive member '{member.name}' is larger than the per-file limit")
                    total += member.size
                    if total > limits.max_total_bytes:
                        raise ClientError("the model archive expands beyond the total size limit")
                    if total > 1024**2 and total / compressed > limits.max_ratio:
                        raise ClientError(
                            f"the model archive expands more than {limits.max_ratio:.0f}x (a compression bomb?); "
                            "upload the model without padding"
                        )
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ClientError(f"the model archive is corrupt ({exc}); re-create the .tar.gz") from None
        if not any(m.isfile() for m in members):
            raise ClientError("the model archive contains no files; it must contain the model files")
        try:
            tar.extractall(dest, members=members, filter="data")
        except (tarfile.FilterError, tarfile.TarError, OSError) as exc:
            raise ClientError(f"the model archive could not be extracted safely ({exc})") from None
    return sorted(p for p in dest.rglob("*") if p.is_file() and not p.is_symlink())


def check_zip(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS, *, label: str | None = None,
              data: bytes | None = None) -> list[zipfile.ZipInfo]:
    """Check a zip-based model file (``.keras``, ``.pt2``, TorchScript) against the outer archive's caps
    before any framework opens it: entry count, per-entry and total uncompressed size, expansion ratio,
    and entry names. Reads only the central directory. Returns the entries; ClientError when hostile.

    ``data`` checks an in-memory zip (one nested inside another); ``label`` names the file in messages."""
    label = label or path.name
    size = len(data) if data is not None else path.stat().st_size
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ClientError(f"'{label}' is not a readable zip archive ({exc})") from None
    if len(entries) > limits.max_members:
        raise ClientError(f"'{label}' has {len(entries)} entries, more than {limits.max_members}; "
                          "it does not look like a model file")
    total = 0
    for entry in entries:
        name = entry.filename
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in Path(name).parts:
            raise ClientError(f"'{label}' contains an entry with a path that leaves the file ('{name}')")
        if entry.file_size > limits.max_member_bytes:
            raise ClientError(f"the entry '{name}' of '{label}' expands to {entry.file_size} bytes, more than "
                              "the per-file limit")
        total += entry.file_size
    if total > limits.max_total_bytes:
        raise ClientError(f"'{label}' expands to {total} bytes, beyond the total size limit")
    if total > 1024**2 and total / max(size, 1) > limits.max_ratio:
        raise ClientError(f"'{label}' expands more than {limits.max_ratio:.0f}x (a compression bomb?); "
                          "save the model without padding")
    return entries
