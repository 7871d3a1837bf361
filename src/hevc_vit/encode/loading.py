"""Loading inputs for ``hevc-vit encode``: decode, preprocess and patchify one input (:func:`load_item`), or
many in worker processes (:func:`load_items`). Loading never raises on a bad file: the reason is returned
with the item, so the run can record it and go on; a worker that dies costs only the input it was on.

Test seam: :func:`open_image` is looked up when each image is opened, so a test may replace it
(``monkeypatch.setattr(hevc_vit.encode.loading, "open_image", ...)``); forked workers see the replacement.

Legend: ``N`` patches of one item, ``C`` channels, ``p`` patch size, ``T`` frames.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing  # registers the tensor reductions: patches travel through shared memory
from PIL import Image, UnidentifiedImageError

from ..packing import grid_positions
from .items import Fetched, InputSpec, fetch, spec_path
from .pixels import exif_orientation, normalize_patches, upright_size
from .processing import ImageProcessor
from .remote import Network, describe_error
from .sidecars import read_sidecars
from .sniff import read_head, refusal, sniff
from .sparse import load_codec_video
from .video import VIDEO_EXTENSIONS, read_video, temporal_positions, video_patch_positions

if TYPE_CHECKING:
    from ..codec.config import CodecSparseConfig

# --------------------------------------------------------------------------------------------------
# loading one input
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedItem:
    """One input ready for the encoder, or the reason it is not.

    patches: ``(N, C·p·p)``, float32, or uint8 when ``normalization`` is set: 8-bit samples, normalised where they
    are used (:meth:`float_patches`, or on the model's device) — a quarter of the bytes between processes and to
    the device, and none of the float work in the loader; grid_thw: ``(t, h, w)`` in patches; positions: ``(N, 3)``
    int64 ``(t, h, w)`` RoPE positions (explicit for videos spread over a temporal context, else the grid's own).
    normalization: the processor's ``(mean, std, rescale_factor, do_rescale, do_normalize)`` for uint8 patches.
    """

    index: int
    path: str
    kind: str = ""  # "image" or "video"
    patches: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None
    positions: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    error: str = ""
    normalization: tuple | None = None

    @property
    def num_tokens(self) -> int:
        """Patches the encoder runs: all of the grid, or the kept ones of a codec-sparse clip."""
        if self.patches is not None:
            return self.patches.shape[0]
        t, h, w = self.grid_thw
        return t * h * w

    def float_patches(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``patches`` as float32 ``(N, C·p·p)`` on ``device`` (default: where they are): uint8 samples are
        moved first, then normalised there, with exactly the processor's values."""
        patches = self.patches if device is None else self.patches.to(device, non_blocking=True)
        return patches if self.normalization is None else normalize_patches(patches, *self.normalization)


@dataclass
class LoadOptions:
    """What ``load_item`` needs besides the path."""

    processor: ImageProcessor
    patch_size: int
    num_channels: int = 3
    frames: int = 8
    temporal_context: int | None = None
    codec: CodecSparseConfig | None = None  # videos: encode only the selected patches
    preview_dir: str | os.PathLike | None = None
    memory: list = field(default_factory=list)  # the run's in-memory inputs (objects, datasets), by number
    network: Network = Network()  # URLs: timeouts, and attempts after a failed read before the input fails
    jpeg_draft: bool = True  # JPEGs at least twice the target decode at a reduced DCT scale (as encode does by default)
    exif_transpose: bool = True  # images turned upright as their EXIF orientation says (transformers' load_image does)
    keys: Sequence[str] = ()  # the shard key of item ``index`` (names a codec preview); empty: item_key(index)
    video_backend: str = "pyav"  # decoder of the sampled frames: pyav or torchcodec (.video.read_video)


def load_item(index: int, path: str | InputSpec, options: LoadOptions) -> LoadedItem:
    """Decode, preprocess and patchify one input (a local path, or a spec whose ``ref`` says where its content
    is: a tar member, a URL, a row in memory); any failure is returned in ``error``, never raised. The spec's
    ``extra`` fields (``id``, kept columns) go into the item's ``info``, hence into its index row."""
    spec = path if isinstance(path, InputSpec) else InputSpec(path)
    item = LoadedItem(index=index, path=spec.path)
    try:
        columns = read_sidecars(spec.sidecars, options.memory, options.network)
        if spec.ref is None:
            _load_into(item, options)
        else:
            _load_fetched(item, fetch(spec.ref, options.memory, options.network), options)
        item.info = {**spec.extra, **columns, **item.info}
    except MemoryError:
        item.error = "out of memory while decoding"
    except Exception as e:  # a bad file may fail anywhere in a decoder; the reason goes to the index
        item.error = describe_error(e)
    if item.error:
        item.patches = item.positions = item.normalization = None
    return item


def _load_into(item: LoadedItem, options: LoadOptions) -> None:
    path = Path(item.path)
    size = path.stat().st_size
    if size == 0:
        item.error = "empty file (0 bytes)"
        return
    _load_media(item, options, path, path.name)


def _load_media(item: LoadedItem, options: LoadOptions, source: Path | io.BytesIO, name: str) -> None:
    """A local file or in-memory bytes, decoded as its first bytes say (:mod:`.sniff`); the name's extension
    decides only for content no magic number names (:func:`_load_unrecognised`)."""
    found = sniff(read_head(source))
    if found.kind == "image":
        try:
            image = open_image(source)
        except UnidentifiedImageError:
            item.error = refusal(found, name)
            return
        _load_image(item, options, image)
    elif found.kind == "video":
        _load_video(item, options, None if isinstance(source, Path) else source)
    elif found.kind:
        item.error = refusal(found, name)
    else:
        _load_unrecognised(item, options, source, name)


def _load_image(item: LoadedItem, options: LoadOptions, image: Image.Image) -> None:
    turn = exif_orientation(image) if options.exif_transpose else 1
    height, width = upright_size(image.height, image.width, turn)  # before a draft decode makes the image smaller
    draft = options.jpeg_draft
    patches, grid = options.processor.patchify(image, options.patch_size, draft, normalize=False, orientation=turn)
    _set_patches(item, "image", patches, grid, options, t_positions=None)
    item.info = {"size": [width, height], **({"exif_orientation": turn} if turn != 1 else {})}


def open_image(source: Path | io.BytesIO) -> Image.Image:
    """The image at ``source``, opened but not decoded yet, so that a JPEG can be decoded at a reduced scale (a
    test seam: see the module's docstring). A file's bytes are read first: no file stays open, and the decoded
    pixels need no copy. A truncated or corrupt file fails when it is decoded, inside the loader."""
    return Image.open(io.BytesIO(source.read_bytes()) if isinstance(source, Path) else source)


def _load_unrecognised(item: LoadedItem, options: LoadOptions, source: Path | io.BytesIO, name: str) -> None:
    """Content whose first bytes name no format: a video extension sends it to the video decoder; anything else
    is offered to Pillow (which knows formats without a magic number, e.g. TGA; it reads only the header to
    decide, so a stray large file is never read whole), then to the video decoder, which streams a file."""
    image_error = "not tried (a video extension)"
    if Path(name).suffix.lower() not in VIDEO_EXTENSIONS:
        try:
            Image.open(source).close()  # identifies the format from the header alone (Image.open seeks to 0)
        except UnidentifiedImageError:
            image_error = f"cannot identify image file {name!r}"  # PIL names the object it read: not stable
        else:
            _load_image(item, options, open_image(source))
            return
    try:
        _load_video(item, options, None if isinstance(source, Path) else source)
    except ImportError:
        item.error = f"not a readable image ({image_error}); video decoding needs PyAV, which is not installed"
    except Exception as video_error:
        item.error = f"not an image or a video: PIL: {image_error}; PyAV: {describe_error(video_error)}"


def _load_fetched(item: LoadedItem, fetched: Fetched, options: LoadOptions) -> None:
    """Decode the content of an input that is not a local file: an image from memory, or the bytes of a tar
    member, a URL or a dataset row (an image, or a video by its name's extension or by its content)."""
    if fetched.image is not None:
        _load_image(item, options, fetched.image)
    elif not fetched.data:
        item.error = "empty (0 bytes)"
    else:
        _load_media(item, options, io.BytesIO(fetched.data), fetched.name)


def _load_video(item: LoadedItem, options: LoadOptions, source=None) -> None:
    """``source``: the clip's bytes (a ``BytesIO``) or path when it is not the local file ``item.path``."""
    if options.codec is not None:
        load_codec_video(item, options, source)
        return
    frames = max(options.processor.frames_that_fit(options.frames), 1)  # fewer when the clip budget says so
    video = read_video(item.path if source is None else source, frames, options.video_backend)
    patches, grid = options.processor.patchify(video.frames, options.patch_size, normalize=False)  # (T·h·w, C·p·p)
    t_positions = temporal_positions(len(video.frames), options.temporal_context)
    _set_patches(item, "video", patches, grid, options, t_positions)
    item.info = {
        "size": [video.frames[0].width, video.frames[0].height],
        "frames": video.indices,
        "total_frames": video.total_frames,
        "temporal_positions": t_positions,
    }


def _set_patches(item: LoadedItem, kind: str, patches: torch.Tensor, grid, options: LoadOptions, t_positions) -> None:
    """``patches (N, C·p·p)`` of a ``grid = (t, h, w)`` item from the processor's ``patchify``: float32, or uint8
    8-bit samples that the processor's normalisation goes with."""
    channels = patches.shape[1] // options.patch_size**2
    if channels != options.num_channels:
        raise ValueError(f"the processor gave {channels} channels; the model expects {options.num_channels}")
    item.kind = kind
    item.patches = patches
    item.normalization = options.processor.normalization if patches.dtype == torch.uint8 else None
    item.grid_thw = grid
    item.positions = (
        video_patch_positions(grid, t_positions) if kind == "video" else grid_positions(torch.tensor([grid]))
    )


# --------------------------------------------------------------------------------------------------
# loading many inputs in worker processes
# --------------------------------------------------------------------------------------------------


def default_workers() -> int:
    """Decoding processes when none are asked for: up to 4, leaving a core to the model (per local rank)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, max(0, (os.cpu_count() or 1) // local_world - 1))


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
                    done[culprit] = LoadedItem(index, spec_path(path), error=_death_reason(worker.process.exitcode))
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
                        error = f"loaded, but not received from its worker: {describe_error(e)}"
                        done[pos] = LoadedItem(index, spec_path(path), error=error)
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
