"""Inputs of ``hevc-vit encode``: expanding paths, folders, globs and list files, and loading one input
(decode, preprocess, patchify) into packed patches. Loading never raises on a bad file: the reason is
returned with the item, so the run can record it and go on.

Legend: ``N`` patches of one item, ``C`` channels, ``p`` patch size, ``T`` frames.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .packing import grid_positions, patchify
from .processing import ImageProcessor
from .video import VIDEO_EXTENSIONS, read_video, temporal_positions, video_patch_positions

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
_GLOB_CHARS = frozenset("*?[")


@dataclass
class InputSpec:
    """One input after expansion: its path as given, or why it could not be found."""

    path: str
    error: str = ""


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[InputSpec]:
    """Files, folders (recursive), globs and list files -> one ``InputSpec`` per file, without duplicates.

    A folder contributes every file under it in sorted order, hidden names (a leading ``.``) excepted; a
    ``.txt``/``.lst``/``.list`` file given directly lists one path per line (blank lines and ``#`` comments
    skipped, relative paths taken from the list's folder). A path that does not exist, or a glob that matches
    nothing, becomes an ``InputSpec`` with its error, so it is reported rather than dropped.
    """
    out: list[InputSpec] = []
    seen: set[str] = set()

    def add(spec: InputSpec) -> None:
        if spec.path not in seen:
            seen.add(spec.path)
            out.append(spec)

    for raw in inputs:
        _expand_one(os.fspath(raw), add, from_list=False)
    return out


def _expand_one(arg: str, add, from_list: bool) -> None:
    path = Path(arg)
    if path.is_dir():
        for file in _walk(path):
            add(InputSpec(str(file)))
    elif path.is_file():
        if not from_list and path.suffix.lower() in LIST_EXTENSIONS:
            for line in _read_list(path):
                _expand_one(line, add, from_list=True)
        else:
            add(InputSpec(str(path)))
    elif _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            add(InputSpec(arg, "no file matches this pattern"))
        for match in matches:
            _expand_one(match, add, from_list=True)
    elif path.exists():
        add(InputSpec(arg, "not a regular file or folder"))
    else:
        add(InputSpec(arg, "no such file or folder"))


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return files


def _read_list(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lines.append(line if os.path.isabs(line) else str(path.parent / line))
    return lines


# --------------------------------------------------------------------------------------------------
# loading one input
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedItem:
    """One input ready for the encoder, or the reason it is not.

    patches: ``(N, C·p·p)`` float32; grid_thw: ``(t, h, w)`` in patches; positions: ``(N, 3)`` int64
    ``(t, h, w)`` RoPE positions (explicit for videos spread over a temporal context, else the grid's own).
    """

    index: int
    path: str
    kind: str = ""  # "image" or "video"
    patches: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None
    positions: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    error: str = ""

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


@dataclass
class LoadOptions:
    """What ``load_item`` needs besides the path."""

    processor: ImageProcessor
    patch_size: int
    num_channels: int = 3
    frames: int = 8
    temporal_context: int | None = None


def load_item(index: int, path: str, options: LoadOptions) -> LoadedItem:
    """Decode, preprocess and patchify one input; any failure is returned in ``error``, never raised."""
    item = LoadedItem(index=index, path=path)
    try:
        _load_into(item, options)
    except MemoryError:
        item.error = "out of memory while decoding"
    except Exception as e:  # a bad file may fail anywhere in a decoder; the reason goes to the index
        item.error = _describe(e)
    if item.error:
        item.patches = item.positions = None
    return item


def _describe(e: BaseException) -> str:
    message = str(e).strip() or type(e).__name__
    return message if message.startswith(type(e).__name__) else f"{type(e).__name__}: {message}"


def _load_into(item: LoadedItem, options: LoadOptions) -> None:
    path = Path(item.path)
    size = path.stat().st_size
    if size == 0:
        item.error = "empty file (0 bytes)"
        return
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        _load_video(item, options)
        return
    try:
        image = _open_image(path)
    except UnidentifiedImageError as image_error:
        # not an image to PIL: maybe a video without a usual extension, else neither
        try:
            _load_video(item, options)
        except ImportError:
            item.error = f"not a readable image ({image_error}); video decoding needs PyAV, which is not installed"
        except Exception as video_error:
            item.error = f"not an image or a video: PIL: {image_error}; PyAV: {_describe(video_error)}"
        return
    pixels = options.processor(image)  # (C, H, W)
    _set_patches(item, "image", pixels.unsqueeze(0), options, t_positions=None)  # (1, C, H, W)
    item.info = {"size": [image.width, image.height]}


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now: a truncated or corrupt file fails here, inside the loader
        return image.copy()


def _load_video(item: LoadedItem, options: LoadOptions) -> None:
    video = read_video(item.path, options.frames)
    pixels = options.processor(video.frames)  # (C, T, H, W)
    t_positions = temporal_positions(len(video.frames), options.temporal_context)
    _set_patches(item, "video", pixels.unsqueeze(0), options, t_positions)  # (1, C, T, H, W)
    item.info = {
        "size": [video.frames[0].width, video.frames[0].height],
        "frames": video.indices,
        "total_frames": video.total_frames,
        "temporal_positions": t_positions,
    }


def _set_patches(item: LoadedItem, kind: str, batch: torch.Tensor, options: LoadOptions, t_positions) -> None:
    if batch.shape[1] != options.num_channels:
        raise ValueError(f"the processor gave {batch.shape[1]} channels; the model expects {options.num_channels}")
    # patchify on an explicit (1, C, T, H, W) / (1, C, H, W) batch: no guessing between frames and channels
    patches, grid = patchify(batch, options.patch_size)  # (N, C·p·p), (1, 3)
    t, h, w = (int(v) for v in grid[0])
    item.kind = kind
    item.patches = patches.contiguous()
    item.grid_thw = (t, h, w)
    item.positions = video_patch_positions((t, h, w), t_positions) if kind == "video" else grid_positions(grid)
