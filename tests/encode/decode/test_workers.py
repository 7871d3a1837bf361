"""The decoding workers on their own: the same items in the same order as loading here, plain pickling of the
items they send back, and the reason a worker's death gives its input."""

from __future__ import annotations

import pickle
import signal

import numpy as np
import torch
from PIL import Image

from hevc_vit.encode.decode.item import LoadOptions
from hevc_vit.encode.decode.workers import _death_reason, default_workers, dumps_plain, load_items
from hevc_vit.processing.processors import NativeResolutionProcessor

PROCESSOR = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48)


def test_workers_yield_what_loading_here_does_in_order(tmp_path):
    rng = np.random.default_rng(0)
    work = []
    for i, (w, h) in enumerate([(40, 30), (70, 28), (30, 60)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        work.append((i, str(path)))
    work.append((3, str(tmp_path / "missing.png")))
    options = LoadOptions(PROCESSOR, 14)
    here = list(load_items(work, options, workers=0))
    there = list(load_items(work, options, workers=2, prefetch=1))
    assert [item.index for item in there] == [0, 1, 2, 3]
    for a, b in zip(here, there):
        assert (a.path, a.grid_thw, a.error, a.info) == (b.path, b.grid_thw, b.error, b.info)
        assert (a.patches is None and b.patches is None) or torch.equal(a.patches, b.patches)
    assert here[3].error.startswith("FileNotFoundError") and here[0].error == ""


def test_dumps_plain_round_trips_tensors_by_value():
    item = {"patches": torch.arange(6, dtype=torch.uint8).view(2, 3), "half": torch.ones(2, dtype=torch.bfloat16)}
    back = pickle.loads(dumps_plain(item))
    assert torch.equal(back["patches"], item["patches"]) and back["half"].dtype == torch.bfloat16
    back["patches"][0, 0] = 9  # writable, and a copy
    assert item["patches"][0, 0] == 0


def test_a_dead_workers_reason_and_the_default_count(monkeypatch):
    assert "was killed by SIGKILL (often: out of memory)" in _death_reason(-signal.SIGKILL)
    assert "exited with code 3" in _death_reason(3)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 3  # 8 cores over 2 ranks, one left to the model
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 0
