"""``--video-backend torchcodec``: refused with what to install when torchcodec is missing or cannot load, before
the output folder is made; where it loads, its frames at the sampled indices equal PyAV's, and so do the
features."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit.cli import main as cli_main
from hevc_vit.encode import EncodeOptions, encode, iter_features
from hevc_vit.media.video import read_video
from hevc_vit.media.video_torchcodec import require_torchcodec
from tests.helpers import cli_args

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

# decoders may round the YUV -> RGB conversion differently: pixels within 3 levels of 255 (mean within 0.5)
PIXEL_MAX, PIXEL_MEAN = 3, 0.5
FEATURES_RTOL = 2e-2  # max |a - b| / max |b| of the features of such frames


def _textured_clip(path: Path, frames: int = 24, width: int = 64, height: int = 48) -> Path:
    """A near-lossless clip whose frames are a moving diagonal pattern (each frame unlike its neighbours)."""
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            rgb = np.stack([(x * 4 + i * 9) % 256, (y * 5 + i * 7) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_image(Image.fromarray(rgb))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class _Unloadable(types.ModuleType):
    def __getattr__(self, name):
        raise OSError("libavutil.so.59: cannot open shared object file: No such file or directory")


@pytest.fixture(params=["missing", "unloadable"])
def without_torchcodec(monkeypatch, request):
    """torchcodec as if not installed (its import raises ImportError), or installed without the FFmpeg libraries
    it loads (its import raises OSError)."""
    if request.param == "missing":
        monkeypatch.setitem(sys.modules, "torchcodec", None)
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    else:
        monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", _Unloadable("torchcodec.decoders"))
    require_torchcodec.cache_clear()
    yield
    require_torchcodec.cache_clear()


def test_torchcodec_missing_is_refused_before_anything_is_created(without_torchcodec, ckpt, tmp_path, capsys):
    with pytest.raises(ImportError, match="pip install torchcodec.*FFmpeg"):
        EncodeOptions(video_backend="torchcodec")
    out = tmp_path / "out"
    with pytest.raises(ImportError, match="pip install torchcodec"):
        encode([tmp_path], out, model=str(ckpt), video_backend="torchcodec")
    assert cli_main(cli_args(tmp_path, out, ckpt, "--video-backend", "torchcodec")) == 2
    assert "pip install torchcodec" in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_backend_and_torchcodec_with_codec_sparse_are_refused():
    with pytest.raises(ValueError, match="video_backend='decord'; expected one of"):
        EncodeOptions(video_backend="decord")
    with pytest.raises(ValueError, match="codec_sparse"):
        EncodeOptions(video_backend="torchcodec", codec_sparse=True)


def _torchcodec_or_skip() -> None:
    try:
        require_torchcodec()
    except ImportError as e:
        pytest.skip(f"torchcodec cannot be used here: {e}")


@pytest.mark.video
def test_torchcodec_frames_and_features_equal_pyav(model, tmp_path):
    _torchcodec_or_skip()
    clip = _textured_clip(tmp_path / "clip.mp4")
    pyav, codec = read_video(clip, 6, "pyav"), read_video(clip, 6, "torchcodec")
    assert codec.indices == pyav.indices and codec.total_frames == pyav.total_frames
    for i, (a, b) in zip(pyav.indices, zip(pyav.frames, codec.frames)):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN, f"frame {i}: {diff.max()=}, {diff.mean()=}"
    with open(clip, "rb") as f:  # a clip's bytes, as from a tar shard or a URL
        from_bytes = read_video(io.BytesIO(f.read()), 6, "torchcodec")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(codec.frames, from_bytes.frames))

    options = dict(model=model, frames=6, workers=0, progress=False, log=lambda m: None)
    encode([clip], tmp_path / "pyav", **options)
    encode([clip], tmp_path / "codec", video_backend="torchcodec", **options)
    ((row_a, a),), ((row_b, b),) = list(iter_features(tmp_path / "pyav")), list(iter_features(tmp_path / "codec"))
    assert row_a["frames"] == row_b["frames"] and torch.equal(a["grid_thw"], b["grid_thw"])
    for name in ("patches", "pooled"):
        err = (a[name].double() - b[name].double()).abs().max().item()
        assert err <= FEATURES_RTOL * b[name].double().abs().max().item(), f"{name}: {err:.3e}"
