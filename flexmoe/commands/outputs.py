"""Where a command writes: checked before anything is computed, so a mistake costs nothing and
overwrites nothing of the user's."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def check_output_file(argument: str, path: Path, inputs: Iterable[tuple[str, Path]] = ()) -> None:
    """``ValueError`` naming ``argument`` unless ``path`` can be written: its directory exists,
    it is not a directory, and it is none of the command's ``inputs`` ((argument, path) pairs)."""
    if not path.parent.is_dir():
        raise ValueError(f"{argument} {str(path)!r}: directory {str(path.parent)!r} does not exist; create it first")
    if path.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is a directory; name a file in it")
    for input_argument, input_path in inputs:
        if input_path is not None and path.resolve() == Path(input_path).resolve():
            raise ValueError(f"{argument} {str(path)!r} is also {input_argument}: writing it would replace the input")


def check_output_directory(argument: str, path: Path, owned: Iterable[str]) -> None:
    """``ValueError`` naming ``argument`` unless ``path`` is missing, empty, or holds only files the
    command writes (``owned`` names: a rerun replaces them); anything else there is the user's."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is not a directory; name a new or empty directory")
    # Temporaries of an interrupted atomic write (flexmoe.files) start with "." and end in ".tmp".
    others = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in owned and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(
            f"{argument} {str(path)!r} holds files this command did not write ({shown}); name a new or empty directory"
        )
