"""The decoding workers on their own: the same items in the same order as loading here, plain pickling of the
items they send back, the reason a worker's death gives its input, and the bound on one input's load."""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
import torch
from PIL import Image

import hevc_vit.encode.decode.workers
from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
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


def _load_or_hang(index, path, options):
    """``load_item`` as a decoder stuck in C code would be on one input: it never returns, whatever it is told."""
    if path == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        while True:
            time.sleep(3600)
    return LoadedItem(index, path, kind="image", info={"pid": os.getpid()})


def test_a_worker_stuck_on_an_input_is_ended_and_its_queue_goes_to_another(monkeypatch):
    """One worker holding the stuck input and the three queued behind it (prefetch 4): after decode_timeout the
    worker is killed, the stuck input alone fails with the reason, the queued ones are loaded by its replacement,
    in order; the killed worker is gone. (Worker processes fork, so they see this patch.)"""
    monkeypatch.setattr(hevc_vit.encode.decode.workers, "load_item", _load_or_hang)
    work = [(0, "a"), (1, "stuck"), (2, "b"), (3, "c"), (4, "d")]
    options = LoadOptions(PROCESSOR, 14, decode_timeout=1.5)
    start = time.monotonic()
    items = list(load_items(work, options, workers=1, prefetch=4))
    assert time.monotonic() - start < 60  # bounded: the limit plus a check interval and a restart, not forever
    assert [item.index for item in items] == [0, 1, 2, 3, 4]
    assert [item.error == "" for item in items] == [True, False, True, True, True]
    assert items[1].error.startswith("TimeoutError: loading this input took longer than 1.5 s (decode_timeout")
    first, second = items[0].info["pid"], items[2].info["pid"]
    assert first != second and all(item.info["pid"] == second for item in items[2:])
    try:
        os.kill(first, 0)
        alive = os.waitpid(first, os.WNOHANG) == (0, 0)
    except (ProcessLookupError, ChildProcessError):
        alive = False
    assert not alive


def test_no_input_is_ended_under_the_limit_and_the_limit_can_be_off(monkeypatch):
    monkeypatch.setattr(hevc_vit.encode.decode.workers, "load_item", _load_or_hang)
    work = [(i, name) for i, name in enumerate("abcdef")]
    for limit in (None, 30.0):
        items = list(load_items(work, LoadOptions(PROCESSOR, 14, decode_timeout=limit), workers=2, prefetch=2))
        assert [item.error for item in items] == [""] * 6
        assert len({item.info["pid"] for item in items}) <= 2  # no worker was replaced
