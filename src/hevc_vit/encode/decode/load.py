"""Loading inputs for ``hevc-vit encode``: decode, preprocess and patchify one input (:func:`load_item`); many
are loaded in worker processes by :func:`hevc_vit.encode.decode.workers.load_items`. Loading never raises on a bad file:
the reason is returned with the item, so the run can record it and go on.

Test seam: :func:`open_image` is looked up when each image is opened, so a test may replace it
(``monkeypatch.setattr(hevc_vit.encode.decode.load, "open_image", ...)``); forked workers see the replacement.

Legend: ``N`` patches of one item, ``C`` channels, ``p`` patch size, ``T`` frames.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.decode.sparse import load_asset_folder, load_codec_video
from hevc_vit.encode.readers.fetch import fetch
from hevc_vit.encode.readers.sidecars import read_sidecars
from hevc_vit.encode.readers.spec import Fetched, InputSpec, describe_error
from hevc_vit.media.kinds import VIDEO_EXTENSIONS, special_file
from hevc_vit.media.sniff import read_head, refusal, sniff
from hevc_vit.media.video import read_video, temporal_positions, video_patch_positions
from hevc_vit.packing import grid_positions
from hevc_vit.processing.pixels import exif_orientation, upright_size

# --------------------------------------------------------------------------------------------------
# loading one input
# --------------------------------------------------------------------------------------------------


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
    if path.is_dir():  # a codec-assets folder (the expansion lists no other folder)
        load_asset_folder(item, options)
        return
    status = path.stat()
    if special := special_file(status.st_mode):
        item.error = f"not a regular file but {special}; expected an image or a video file"
        return
    if status.st_size == 0:
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
