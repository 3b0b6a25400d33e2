"""What a pickle would import, read without unpickling it.

Unpickling runs code: every ``GLOBAL``/``STACK_GLOBAL`` opcode imports a callable that ``REDUCE``
may then call with any arguments. :func:`pickled_globals` walks the opcodes with ``pickletools``
(nothing is imported or called) and returns the ``module.name`` of each global; a global whose
name cannot be read statically comes back as :data:`UNRESOLVED`, so a caller that allows only a
known set refuses it (fail closed).
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .archive import DEFAULT_LIMITS, ArchiveLimits, check_zip
from .errors import ClientError

UNRESOLVED = "<unresolved>"
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PICKLE_PROTOCOL = re.compile(rb"\x80[\x02-\x05]")
_ZIP_MAGIC = b"PK\x03\x04"
MAX_IN_MEMORY_BYTES = 256 * 1024**2  # a pickle or nested zip read whole to be checked
_MAX_NESTING = 2  # a .pt2 holds torch.save zips (sample inputs, constants); nothing deeper is expected


def pickled_globals(data: bytes) -> set[str]:
    """The ``module.name`` of every global the pickle ``data`` refers to (``UNRESOLVED`` when unreadable)."""
    found: set[str] = set()
    pushed: list[object] = []  # what each opcode pushed, as far as strings matter here
    memo: dict[object, object] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.add(f"{module}.{attr}")
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                where, what = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                found.add(f"{where}.{what}" if isinstance(where, str) and isinstance(what, str) else UNRESOLVED)
                pushed.append(None)
            elif name in _STRING_OPS:
                pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
            elif name in _PUT_OPS:
                memo[arg] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in _GET_OPS:
                pushed.append(memo.get(arg))
            else:
                pushed.append(None)
    except Exception:  # truncated or malformed: nothing can be said about what it imports
        found.add(UNRESOLVED)
    return found


def looks_like_pickle(data: bytes) -> bool:
    """A pickle of protocol 2 or later starts with the PROTO opcode."""
    return bool(_PICKLE_PROTOCOL.match(data[:2]))


@dataclass
class ZipPickles:
    """The globals of every pickle inside a zip-based model file (and the zips nested in it)."""

    globals_by_entry: dict[str, set[str]] = field(default_factory=dict)

    def outside(self, allowed: re.Pattern[str]) -> dict[str, list[str]]:
        """Entries whose pickles import something ``allowed`` does not match, with those globals."""
        return {entry: sorted(g for g in found if not allowed.fullmatch(g))
                for entry, found in self.globals_by_entry.items()
                if any(not allowed.fullmatch(g) for g in found)}


def scan_zip(path: Path, *, label: str | None = None, data: bytes | None = None,
             limits: ArchiveLimits = DEFAULT_LIMITS, depth: int = 0) -> ZipPickles:
    """Check a zip (the caps of :func:`check_zip`) and read the globals of each pickle in it, recursing
    into nested zips. Pickles and nested zips are read into memory only below :data:`MAX_IN_MEMORY_BYTES`."""
    label = label or path.name
    entries = check_zip(path, limits, label=label, data=data)
    result = ZipPickles()
    with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as zf:
        for entry in entries:
            if entry.is_dir():
                continue
            with zf.open(entry) as stream:
                head = stream.read(4)
            is_pickle = entry.filename.endswith(".pkl") or looks_like_pickle(head)
            if not is_pickle and head != _ZIP_MAGIC:
                continue
            where = f"{label}:{entry.filename}"
            if entry.file_size > MAX_IN_MEMORY_BYTES:
                raise ClientError(f"'{where}' is a {'pickle' if is_pickle else 'nested zip'} of {entry.file_size} "
                                  f"bytes, more than {MAX_IN_MEMORY_BYTES}; weights belong in tensor entries")
            if is_pickle:
                result.globals_by_entry[where] = pickled_globals(zf.read(entry))
                continue
            if depth >= _MAX_NESTING:
                raise ClientError(f"'{label}' nests zip archives more than {_MAX_NESTING} deep ('{entry.filename}')")
            nested = scan_zip(path, label=where, data=zf.read(entry), limits=limits, depth=depth + 1)
            result.globals_by_entry.update(nested.globals_by_entry)
    return result
