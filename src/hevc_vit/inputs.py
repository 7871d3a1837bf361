"""Inputs of ``hevc-vit encode``: expanding paths, folders, globs and list files, and loading one input
(decode, preprocess, patchify) into packed patches. Loading never raises on a bad file: the reason is
returned with the item, so the run can record it and go on. ``load_items`` loads many in worker processes,
and a worker that dies costs only the input it was on.

Legend: ``N`` patches of one item, ``C`` channels, ``p`` patch size, ``T`` frames.
"""

from __future__ import annotations

import glob
import os
import pickle
import signal
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.multiprocessing  # registers the tensor reductions: patches travel through shared memory
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
            add(InputSpec(str(current), f"cannot read this folder: {_describe(e)}"))
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
        raise OSError(f"cannot read list file {path}: {_describe(e)}") from None
    lines = []
    for line in text.splitlines():
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


# --------------------------------------------------------------------------------------------------
# loading many inputs in worker processes
# --------------------------------------------------------------------------------------------------


def load_items(
    work: Sequence[tuple[int, str]], options: LoadOptions, workers: int, prefetch: int = 4
) -> Iterator[LoadedItem]:
    """``load_item(index, path, options)`` for every ``(index, path)`` of ``work``, yielded in order.

    workers: processes that decode and preprocess (0: here, one at a time). Each gets up to ``prefetch`` inputs
    at a time, and at most ``workers * prefetch`` loaded items wait to be yielded. A worker that dies (killed
    for memory, a decoder that crashes the process) costs only the input it was loading: that input is yielded
    with the reason as its error, the inputs queued behind it go to the other workers, and a new worker takes
    its place. (A ``DataLoader`` ends the whole run instead, from whatever line the main process is on.)
    """
    if workers == 0:
        for index, path in work:
            yield load_item(index, path, options)
        return
    pool = _WorkerPool(options, workers, prefetch)
    try:
        yield from pool.run(list(work))
    finally:
        pool.close()


@dataclass
class _Worker:
    process: object
    conn: object  # the main process's end of a duplex pipe
    current: object  # shared int64: the position the worker is loading (-1: none)
    assigned: deque = field(default_factory=deque)  # positions sent, in order, not yet returned


class _WorkerPool:
    def __init__(self, options: LoadOptions, size: int, prefetch: int):
        self.ctx = torch.multiprocessing.get_context()
        self.options, self.prefetch = options, prefetch
        self.workers = [self._start() for _ in range(size)]
        self._lost: dict[int, int] = {}  # position -> results that could not be received

    def _start(self) -> _Worker:
        conn, child = self.ctx.Pipe(duplex=True)
        current = self.ctx.Value("q", -1, lock=False)
        process = self.ctx.Process(target=_worker_main, args=(child, self.options, current), daemon=True)
        process.start()
        child.close()
        return _Worker(process, conn, current)

    def run(self, work: list[tuple[int, str]]) -> Iterator[LoadedItem]:
        window = len(self.workers) * self.prefetch
        todo = deque(range(len(work)))  # positions not yet sent; those of a dead worker go back to the front
        done: dict[int, LoadedItem] = {}
        next_out = 0
        deaths_without_progress = 0
        while next_out < len(work):
            if next_out in done:
                yield done.pop(next_out)
                next_out += 1
                deaths_without_progress = 0
                continue
            while todo and todo[0] < next_out + window:
                worker = min(self.workers, key=lambda w: len(w.assigned))
                if len(worker.assigned) >= self.prefetch:
                    break
                pos = todo.popleft()
                worker.assigned.append(pos)
                try:
                    worker.conn.send((pos, *work[pos]))
                except OSError:  # it has just died: noticed below, and pos goes to another worker
                    break
            ready = set(wait_for([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]))
            for slot, worker in enumerate(self.workers):
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                alive = self._receive(worker, work, todo, done)
                if alive and worker.process.sentinel not in ready:
                    continue
                # the worker is gone: whatever it sent is in; the input it was on is its cause
                worker.process.join(timeout=10)
                culprit = worker.current.value
                if culprit in worker.assigned:
                    worker.assigned.remove(culprit)
                    index, path = work[culprit]
                    done[culprit] = LoadedItem(index, path, error=_death_reason(worker.process.exitcode))
                else:
                    deaths_without_progress += 1
                    if deaths_without_progress > 3 * len(self.workers):
                        raise RuntimeError(
                            f"decoding worker processes keep dying before they load anything (exit code "
                            f"{worker.process.exitcode}); run with workers=0 to see the error"
                        )
                todo.extendleft(reversed(worker.assigned))
                worker.conn.close()
                self.workers[slot] = self._start()

    def _receive(self, worker: _Worker, work, todo: deque, done: dict[int, LoadedItem]) -> bool:
        """Take every result ``worker`` has sent; False when its pipe has closed (the worker is gone)."""
        try:
            while worker.conn.poll():
                pos, payload = worker.conn.recv()
                worker.assigned.remove(pos)
                try:
                    done[pos] = pickle.loads(payload)
                except Exception as e:  # its shared memory went with a worker that died since: load it again
                    self._lost[pos] = self._lost.get(pos, 0) + 1
                    if self._lost[pos] < 3:
                        todo.appendleft(pos)
                    else:
                        index, path = work[pos]
                        error = f"loaded, but not received from its worker: {_describe(e)}"
                        done[pos] = LoadedItem(index, path, error=error)
        except (EOFError, OSError):
            return False
        return True

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            worker.conn.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            how += " (often: out of memory)"
    else:
        how = f"exited with code {exitcode}"
    return f"the decoding worker process {how} while loading this input; it was skipped and the run went on"


def _worker_main(conn, options: LoadOptions, current) -> None:
    """One worker: load the inputs it is sent until it is sent None (or the main process goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it closes the pool
    torch.set_num_threads(1)  # many workers decode side by side; the model has the cores
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        pos, index, path = task
        current.value = pos
        item = load_item(index, path, options)
        conn.send((pos, bytes(ForkingPickler.dumps(item))))
        current.value = -1
