"""Job errors in SageMaker's failure-reason style."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path


class CompilationError(Exception):
    """Base of every error that ends a job with a failure reason."""

    error_code = "ServerError"
    exit_code = 2

    @property
    def reason(self) -> str:
        """The failure reason shown to the user."""
        return f"{self.error_code}: {self}"


class ClientError(CompilationError):
    """The user's fault: the reason says what is wrong and what to fix."""

    error_code = "ClientError"
    exit_code = 1

    def __init__(self, message: str, *, section: str = "InputConfiguration") -> None:
        self.section = section
        super().__init__(message)

    @property
    def reason(self) -> str:
        return f"ClientError: {self.section}: {self}"


class ServerError(CompilationError):
    """Kiln's fault (a bug or an infrastructure failure)."""


# Exit code of a compiler the workflow stopped or timed out (its task token was refused): nobody
# waits for its result, so it exits without reporting.
ABORTED_EXIT_CODE = 3


_PATH_TAIL = r"(/[^\s'\"()\[\]{},:;<>]*)?"


def scrub_paths(text: str, *, model_dir: Path | None, internal_roots: Iterable[Path | str]) -> str:
    """A user-facing reason without the compiler's internal paths.

    A path inside ``model_dir`` (the unpacked archive) becomes its path within the archive (the
    archive root itself, "the archive"); any other path under an ``internal_roots`` entry (work
    directory, temporary directory, installed packages) becomes its file name."""
    model_forms = {os.path.realpath(model_dir), str(model_dir)} if model_dir is not None else set()
    roots = {form for root in internal_roots for form in (str(root), os.path.realpath(root)) if len(str(form)) > 1}
    roots |= model_forms
    if not roots:
        return text
    pattern = re.compile("(" + "|".join(re.escape(r.rstrip("/")) for r in sorted(roots, key=len, reverse=True))
                         + r")(?![^/\s'\"()\[\]{},:;<>])" + _PATH_TAIL)

    def replace(match: re.Match[str]) -> str:
        root, tail = match.group(1), (match.group(2) or "").strip("/")
        if root in model_forms:
            return tail or "the archive"
        return tail.rsplit("/", 1)[-1] or "the compiler's work directory"

    return pattern.sub(replace, text)
