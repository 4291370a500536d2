"""Files the library writes and reads back: written atomically (readers see the old version or the
new one, never a partial one), and JSON documents that name their format."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` fills a temporary file beside ``path``, which is then renamed over
    ``path`` (a rename within one directory is atomic). Creates the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of ``path``'s bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def read_json_document(path: Path, format_name: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``"format"`` is ``format_name``; ``ValueError`` naming
    the file and ``what`` it should be otherwise. The caller checks ``"version"``."""
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is corrupted (not valid JSON: {error})") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise ValueError(f"{path} is not a {what} (no format {format_name!r})")
    return document
