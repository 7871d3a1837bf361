"""The inputs of ``hevc-vit encode``: files, folders (recursive), globs and list files expanded to one
:class:`InputSpec` per file, and the samples shipped with the package. Nothing given is dropped silently:
what cannot be found or read becomes a spec with its reason, which the run records as a failed row."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
_GLOB_CHARS = frozenset("*?[")


@dataclass
class InputSpec:
    """One input after expansion: its path as given, or why it could not be found."""

    path: str
    error: str = ""


def expand_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()
) -> list[InputSpec]:
    """Files, folders (recursive), globs and list files -> one ``InputSpec`` per file, without duplicates.

    A folder contributes every file under it in sorted order, hidden names (a leading ``.``) excepted.
    Symlinked folders are followed, each real folder at most once per input (so a link loop ends); a ``.txt``/
    ``.lst``/``.list`` file given directly lists one path per line (blank lines and ``#`` comments skipped,
    relative paths taken from the list's folder). Nothing given is dropped silently: a path that does not exist,
    a glob that matches nothing, a folder or list that yields no file, a folder that cannot be read and a link
    that is not followed each become an ``InputSpec`` with its error. Folders in ``exclude`` (the output
    folder) are not searched. One path (``str`` or ``Path``) is one input.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[InputSpec] = []
    seen: set[str] = set()

    def add(spec: InputSpec) -> None:
        if spec.path not in seen:
            seen.add(spec.path)
            out.append(spec)

    skip = frozenset(os.path.realpath(e) for e in exclude)
    for raw in inputs:
        _expand_one(os.fspath(raw), add, from_list=False, skip=skip)
    return out


def _expand_one(arg: str, add, from_list: bool, skip: frozenset[str]) -> None:
    path = Path(arg)
    if path.is_dir():
        if os.path.realpath(path) in skip:
            return
        if not _walk(path, add, skip):
            add(InputSpec(arg, "no files in this folder (names starting with '.' are skipped)"))
    elif path.is_file():
        if not from_list and path.suffix.lower() in LIST_EXTENSIONS:
            try:
                lines = _read_list(path)
            except (OSError, ValueError) as e:
                add(InputSpec(arg, str(e)))
                return
            if not lines:
                add(InputSpec(arg, "the list file names no paths (blank lines and # comments are skipped)"))
            for line in lines:
                _expand_one(line, add, from_list=True, skip=skip)
        else:
            add(InputSpec(str(path)))
    elif _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            add(InputSpec(arg, "no file matches this pattern"))
        for match in matches:
            if not any(_is_inside(match, folder) for folder in skip):
                _expand_one(match, add, from_list=True, skip=skip)
    elif path.exists():
        add(InputSpec(arg, "not a regular file or folder"))
    elif path.is_symlink():
        add(InputSpec(arg, "a broken symbolic link: its target does not exist"))
    else:
        add(InputSpec(arg, "no such file or folder"))


def _is_inside(path: str, folder: str) -> bool:
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(folder: Path, add, skip: frozenset[str]) -> int:
    """Add the files under ``folder`` (sorted, depth first, hidden names skipped); returns how many specs were
    added. Symlinked folders are followed, but a real folder is searched at most once (``visited``), so a link
    loop or a second link to one folder adds a failed row for the link instead of running forever. A folder
    that cannot be read gets a failed row with the reason."""
    visited = {os.path.realpath(folder)}
    count = 0
    stack = [folder]  # depth first: a folder's files, then each of its sub-folders in sorted order
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            add(InputSpec(str(current), f"cannot read this folder: {describe_error(e)}"))
            count += 1
            continue
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symbolic links
            except OSError:
                is_dir = False  # a file then; opening it records the reason it cannot be read
            if not is_dir:
                add(InputSpec(str(current / entry.name)))
                count += 1
                continue
            sub = current / entry.name
            real = os.path.realpath(sub)
            if real in skip:  # the output folder inside an input folder: never an input
                continue
            if real in visited:
                add(InputSpec(str(sub), f"not searched: a link to the folder {real}, already searched for this input"))
                count += 1
                continue
            visited.add(real)
            folders.append(sub)
        stack.extend(reversed(folders))
    return count


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"list file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            f"expected one path per line in UTF-8"
        ) from None
    except OSError as e:
        raise OSError(f"cannot read list file {path}: {describe_error(e)}") from None
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lines.append(line if os.path.isabs(line) else str(path.parent / line))
    return lines


def sample_inputs() -> list[Path]:
    """The sample images and the short clip shipped with the package (what ``hevc-vit encode`` encodes
    when given no input)."""
    return sorted(p for p in ASSETS.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))


def describe_error(e: BaseException) -> str:
    """``"TypeName: message"`` (the message alone when it already starts with the type's name)."""
    message = str(e).strip() or type(e).__name__
    return message if message.startswith(type(e).__name__) else f"{type(e).__name__}: {message}"
