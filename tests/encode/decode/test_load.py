"""Loading one input on its own: the processor's patches from a file, from bytes and from an image in memory
alike; what the spec carries goes into the row; a failure is returned, never raised."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from hevc_vit.encode.decode.item import LoadOptions
from hevc_vit.encode.decode.load import load_item
from hevc_vit.encode.readers.spec import InputSpec, MemoryRow
from hevc_vit.processing.processors import NativeResolutionProcessor

PROCESSOR = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48)


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))


def test_a_file_bytes_and_an_image_in_memory_load_to_the_processors_patches(tmp_path):
    image = _image()
    path = tmp_path / "a.png"
    image.save(path)
    expected, grid = PROCESSOR.patchify(image, 14)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    options = LoadOptions(PROCESSOR, 14, memory=[[buffer.getvalue()], [image]])
    from_file = load_item(3, str(path), options)
    from_bytes = load_item(4, InputSpec("object[0]", ref=MemoryRow(0, 0)), options)
    from_image = load_item(5, InputSpec("object[1]", ref=MemoryRow(1, 0), extra={"id": "1"}), options)
    for item in (from_file, from_bytes, from_image):
        assert item.error == "" and item.kind == "image"
        assert torch.equal(item.float_patches(), expected) and item.grid_thw == grid
        assert item.num_tokens == grid[0] * grid[1] * grid[2] == expected.shape[0]
    assert (from_file.index, from_file.path) == (3, str(path))
    assert from_image.info["id"] == "1"  # the spec's extra fields reach the row


def test_sidecars_are_read_into_the_row(tmp_path):
    _image().save(tmp_path / "1.png")
    (tmp_path / "1.txt").write_text("a caption")
    spec = InputSpec(str(tmp_path / "1.png"), sidecars={"txt": str(tmp_path / "1.txt")})
    assert load_item(0, spec, LoadOptions(PROCESSOR, 14)).info["txt"] == "a caption"


def test_failures_are_returned_with_their_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    options = LoadOptions(PROCESSOR, 14)
    empty = load_item(0, str(tmp_path / "empty.jpg"), options)
    assert empty.error == "empty file (0 bytes)" and empty.patches is None
    missing = load_item(1, str(tmp_path / "nothing.jpg"), options)
    assert missing.error.startswith("FileNotFoundError") and "nothing.jpg" in missing.error
    text = load_item(2, str(tmp_path / "text.jpg"), options)
    assert text.error and text.patches is None and text.positions is None


def test_a_named_pipe_is_refused_without_being_opened(tmp_path):
    """Opening a FIFO blocks until something writes to it: the loader looks at the file type first."""
    os.mkfifo(tmp_path / "pipe.png")
    item = load_item(0, str(tmp_path / "pipe.png"), LoadOptions(PROCESSOR, 14))
    assert item.error == "not a regular file but a named pipe (FIFO); expected an image or a video file"
