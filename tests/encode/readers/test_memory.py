"""In-memory inputs on their own: what counts as one, how arrays and tensors become images, the memory of a run
and the rows it gives back."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit.encode.readers.memory import (
    MemorySource,
    check_path_input,
    collect_memory,
    fetch_memory_row,
    is_memory_object,
    to_pil,
)
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import MemoryRow


def test_to_pil_takes_every_layout_and_dtype_to_the_same_pixels():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(hwc))
    assert np.array_equal(np.asarray(to_pil(hwc)), want)
    assert np.array_equal(np.asarray(to_pil(torch.from_numpy(hwc).permute(2, 0, 1))), want)  # (C, H, W)
    assert np.array_equal(np.asarray(to_pil(hwc.astype(np.float32) / 255)), want)  # floats in [0, 1]
    assert np.array_equal(np.asarray(to_pil(hwc[:, :, :1])), hwc[:, :, 0])  # one channel: grey
    assert to_pil(np.zeros((4, 4), np.uint16)).mode == "I;16"


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\); expected \(H, W\) or \(H, W, C\)"),
        (np.full((2, 2), np.nan, np.float32), "NaN or inf"),
        (np.zeros((2, 2), np.int32), "dtype int32"),
    ],
)
def test_to_pil_names_what_it_cannot_take(value, message):
    with pytest.raises(ValueError, match=message):
        to_pil(value)


def test_check_path_input_names_the_input():
    check_path_input(0, "a.jpg")
    with pytest.raises(TypeError, match=r"inputs\[2\] is 3 \(int\)"):
        check_path_input(2, 3)
    with pytest.raises(TypeError, match=r"inputs\[1\] is the path b'a.jpg' as bytes"):
        check_path_input(1, _BytesPath())
    with pytest.raises(ValueError, match=r"inputs\[0\] is an empty string"):
        check_path_input(0, "")


class _BytesPath:
    def __fspath__(self):
        return b"a.jpg"


def test_collect_memory_replaces_objects_by_sources_and_keeps_paths():
    image = Image.new("RGB", (3, 2))
    encoded = io.BytesIO(b"\xff\xd8jpeg")
    assert is_memory_object(image) and is_memory_object(b"x") and not is_memory_object("a.jpg")
    inputs, memory = collect_memory(["a.jpg", image, encoded], "image", ())
    assert inputs[0] == "a.jpg"
    assert [(s.number, s.paths, s.extras) for s in inputs[1:]] == [
        (0, ["object[1]"], [{"id": "1"}]),
        (1, ["object[2]"], [{"id": "2"}]),
    ]
    assert memory == [[image], [b"\xff\xd8jpeg"]]  # a stream is read into bytes
    spec = inputs[2].specs()[0]
    assert (spec.path, spec.ref) == ("object[2]", MemoryRow(1, 0))
    assert collect_memory(image, "image", ())[0][0].paths == ["object[0]"]  # one object is one input
    assert collect_memory(None, "image", ()) == (None, [])


def test_fetch_memory_row_bytes_and_objects():
    assert fetch_memory_row([b"abc"], 0, Network()).data == b"abc"
    got = fetch_memory_row([np.zeros((2, 3), np.uint8)], 0, Network())
    assert got.image.size == (3, 2) and got.data is None


def test_memory_source_specs_slice_its_rows():
    source = MemorySource(4, ["d[0]", "d[1]", "d[2]"], [{"id": "0"}, {"id": "1"}, {"id": "2"}])
    specs = source.specs(1, 3)
    assert [(s.path, s.ref, s.extra) for s in specs] == [
        ("d[1]", MemoryRow(4, 1), {"id": "1"}),
        ("d[2]", MemoryRow(4, 2), {"id": "2"}),
    ]
