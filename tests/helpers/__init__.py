"""Helpers the tests share: fixture paths, tiny configs, the tolerance table, and small builders of inputs
and runs. Fixtures stay in ``tests/conftest.py``; no test module imports another."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit import HEVCViTConfig
from hevc_vit.encode import iter_features, read_index

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


FIXTURE_FOLDERS = ("onevision_encoder_tiny", "llava_vit_packing_tiny")


GOLDEN = FIXTURES / "golden_onevision_encoder_tiny.safetensors"


RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = ""):
    """``max|actual - expected| <= RTOL[dtype] * max|expected|``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= RTOL[dtype] * scale, f"{what}: max abs diff {err:.3e} > {RTOL[dtype]:.0e} x {scale:.3e}"


def features_by_path(out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """An encode output folder's tensors, by input path."""
    return {row["path"]: tensors for row, tensors in iter_features(out_dir)}


def without_shard(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "shard"} for row in rows]


def assert_same_output(got: Path, want: Path, features=None) -> None:
    """Two encode output folders hold the same index rows (but the shard names) and the same features, as
    ``features(folder)`` reads them (``{path: {name: tensor}}``; default :func:`features_by_path`), within the float32
    tolerance: pooled vectors of the head may differ by rounding (how many items share a forward)."""
    features = features or features_by_path
    assert without_shard(read_index(got)) == without_shard(read_index(want))
    a, b = features(got), features(want)
    assert a.keys() == b.keys()
    for path in b:
        assert a[path].keys() == b[path].keys()
        for name in b[path]:
            assert_close_rel(a[path][name].float(), b[path][name].float(), what=f"{path} {name}")


def tiny_config(**overrides) -> HEVCViTConfig:
    """A small random architecture: hidden 64, 2 heads (head_dim 32), 2 layers, patch 14."""
    values = dict(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128, patch_size=14, image_size=56
    )
    values.update(overrides)
    return HEVCViTConfig(**values)


class SimulatedCrash(RuntimeError):
    """What :func:`crash_on_forward` raises."""


@contextmanager
def crash_on_forward(model: torch.nn.Module, forward: int = 3) -> Iterator[None]:
    """Run the block with ``model``'s ``forward``-th call raising :class:`SimulatedCrash` (a run killed mid-way):
    the block must raise it; the hook is removed after."""
    calls = []

    def crash(module, args, kwargs):
        calls.append(1)
        if len(calls) == forward:
            raise SimulatedCrash("simulated crash")

    hook = model.register_forward_pre_hook(crash, with_kwargs=True)
    try:
        with pytest.raises(SimulatedCrash):
            yield
    finally:
        hook.remove()


def cli_args(inputs: Path | Sequence[Path], out: Path, ckpt: Path, *extra: str) -> list[str]:
    """``hevc-vit encode`` arguments for tiny test runs: no workers, 4..48 patches per image, quiet."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    common = ["--workers", "0", "--min-image-tokens", "4", "--max-image-tokens", "48", "-q"]
    return ["encode", *map(str, inputs), "--out", str(out), "--model", str(ckpt), *common, *extra]


def write_image(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> Path:
    """A random ``width x height`` image (seeded) saved at ``path`` in ``mode``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A webdataset-style tar shard at ``path`` holding ``members`` (name, bytes) in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def launch_command(world: int, entry: Sequence[str]) -> list[str]:
    """``python ENTRY...`` in one process (``world`` 1) or under ``torchrun --standalone`` with ``world`` ranks."""
    if world == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *entry]


def subprocess_env() -> dict[str, str]:
    """The environment of the processes a test starts: one thread each (ranks share the machine's cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_encode_cli(world: int, args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``hevc-vit ARGS`` in ``world`` processes (see :func:`launch_command`), its output captured."""
    command = launch_command(world, ["-m", "hevc_vit", *args])
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def disk_full_error(what: str) -> OSError:
    """The error a write meets on a full disk (ENOSPC), naming ``what`` was written."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def fill_the_disk_at_the_second_shard(monkeypatch) -> None:
    """From the second safetensors shard on, the disk is full: half the bytes land, then ENOSPC."""
    from hevc_vit.encode.output import shards

    real_save, calls = shards.save_shard, []

    def save_shard(tensors, path, mode):
        calls.append(path)
        if len(calls) == 1:
            return real_save(tensors, path, mode)
        path.write_bytes(b"half a shard")
        raise disk_full_error(str(path))

    monkeypatch.setattr(shards, "save_shard", save_shard)


def register_unlisting_filesystem(monkeypatch) -> list[str]:
    """Register ``nols://``, an fsspec filesystem whose folders exist but cannot be listed (fsspec's base ``ls``
    raises ``NotImplementedError``, as for a store without listing); returns the calls it gets, in order."""
    fsspec = pytest.importorskip("fsspec", reason="fsspec (the 'data' extra) is not installed")
    calls: list[str] = []

    class NoListing(fsspec.AbstractFileSystem):
        protocol = "nols"

        def info(self, path, **kwargs):
            calls.append("info")
            return {"name": path, "type": "directory", "size": 0}

        def ls(self, path, detail=True, **kwargs):
            calls.append("ls")
            return super().ls(path, detail=detail, **kwargs)  # the base: NotImplementedError

    registry = sys.modules["fsspec.registry"]._registry  # fsspec's table (public: a read-only view of it)
    monkeypatch.setitem(registry, "nols", NoListing)  # restored after the test
    return calls


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes (zombies aside) in process group ``pgid`` (Linux ``/proc``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
