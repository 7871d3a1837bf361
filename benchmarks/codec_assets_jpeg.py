"""What the reference's JPEG mosaics cost: pixels and features of JPEG mosaics against the lossless ones.

    PYTHONPATH=src python benchmarks/codec_assets_jpeg.py [--quality 95] [--frames 64] [--square-size 576]
        [--num-images 8] [--models tiny small]

For each clip, :func:`hevc_vit.codec.assets.compute_assets` gives the mosaics before JPEG (what
``--mosaic-format png`` writes); they are encoded as the writer encodes them (Pillow, quality ``--quality``,
4:2:0) and decoded again. Reported per clip: the mean and max absolute pixel difference (levels, over every
pixel of the mosaics), the PSNR, and for each model (random weights, seed 0, float32; ``tiny``: hidden 64, 2
layers; ``small``: the preset) the cosine between the features of the two versions, per token (mean and min)
and of the pooled output, and the relative L2 of the token features.

Clips: ``ball`` — the package's own ``hevc_vit/assets/ball.mp4`` (H.264, 64×48, 16 frames: enlarged 9× to the
square, so very smooth); ``pink`` — a synthetic clip with natural images' spectrum (1/f "pink" noise texture,
panning, with a moving blurred disc; 640×360, 80 frames); ``blocks`` — the worst case for JPEG's 4:2:0 chroma
(the codec tests' random colour blocks, 4- and 8-px). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from hevc_vit import HEVCViTConfig, HEVCViTPackingModel
from hevc_vit.codec.assets import AssetSettings, compute_assets, encode_mosaics, mosaic_pixels
from hevc_vit.codec.assets.writer import jpeg_bytes
from hevc_vit.encode import sample_inputs

MODELS = {
    "tiny": lambda: HEVCViTConfig(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128, patch_size=16
    ),
    "small": lambda: HEVCViTConfig.from_preset("small"),
}


def _codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except ValueError:  # UnknownCodecError: a wheel built without libx264
        return "mpeg4"


def _write(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(_codec(), rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.bit_rate, stream.options = "yuv420p", 4_000_000, {"g": "32"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pink_clip(path: Path, frames: int = 80, width: int = 640, height: int = 360, seed: int = 0) -> None:
    """1/f noise (the power spectrum of natural images) panning 2 px a frame, with a blurred disc moving over it."""
    rng = np.random.default_rng(seed)
    H, W = height + 64, width + 2 * frames + 64
    fy, fx = np.fft.fftfreq(H)[:, None], np.fft.rfftfreq(W)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(H, W))  # 1/f amplitude
    channels = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random((H, W // 2 + 1)))
        field = np.fft.irfft2(amplitude * phase, s=(H, W))
        channels.append((field - field.mean()) / field.std())
    texture = np.clip(128 + 40 * np.stack(channels, -1), 0, 255)  # (H, W, 3)
    yy, xx = np.mgrid[:height, :width]
    out = []
    for i in range(frames):
        frame = texture[32 : 32 + height, 2 * i : 2 * i + width].copy()
        cy, cx = 80 + (3 * i) % (height - 160), 80 + (6 * i) % (width - 160)
        disc = np.clip(1.0 - (np.hypot(yy - cy, xx - cx) - 40) / 8, 0, 1)[..., None]  # soft edge
        frame = frame * (1 - disc) + disc * np.array([220.0, 60.0, 40.0])
        out.append(np.round(frame).astype(np.uint8))
    _write(path, out)


def blocks_clip(path: Path, frames: int = 80, width: int = 640, height: int = 360, seed: int = 0) -> None:
    """Random 8-px colour blocks panning, a square of random 4-px blocks moving over them."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, ((height + frames) // 8 + 1, (width + 2 * frames) // 8 + 1, 3), dtype=np.uint8)
    background = np.kron(coarse, np.ones((8, 8, 1), np.uint8))
    square = np.kron(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
    out = []
    for i in range(frames):
        frame = background[i : i + height, 2 * i : 2 * i + width].copy()
        y, x = (8 + 3 * i) % (height - 64), (8 + 5 * i) % (width - 64)
        frame[y : y + 64, x : x + 64] = square
        out.append(frame)
    _write(path, out)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def measure(video: str, settings: AssetSettings, models: dict[str, HEVCViTPackingModel], quality: int) -> dict:
    assets = compute_assets(video, settings)
    lossless = assets.mosaics  # (N, S, S, 3) uint8
    jpeg = np.stack([np.asarray(Image.open(io.BytesIO(jpeg_bytes(m, quality))).convert("RGB")) for m in lossless])
    diff = np.abs(jpeg.astype(np.int16) - lossless.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    row = dict(
        tokens=int(len(assets.positions)),
        pixel_mean=round(float(diff.mean()), 3),
        pixel_max=int(diff.max()),
        psnr_db=round(10 * np.log10(255.0**2 / mse), 2) if mse else None,
    )
    for name, model in models.items():
        with torch.no_grad():
            a, pa = encode_mosaics(model, mosaic_pixels(lossless), assets.positions)
            b, pb = encode_mosaics(model, mosaic_pixels(jpeg), assets.positions)
        cos = _cosine(a, b)
        row[name] = dict(
            token_cosine_mean=round(float(cos.mean()), 5),
            token_cosine_min=round(float(cos.min()), 5),
            pooled_cosine=None if pa is None else round(float(_cosine(pa, pb).mean()), 5),
            relative_l2=round(float((a - b).norm() / a.norm()), 5),
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--square-size", type=int, default=576)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=["tiny", "small"], choices=sorted(MODELS))
    args = parser.parse_args()
    settings = AssetSettings(
        frames=args.frames, num_images=args.num_images, square_size=args.square_size, jpeg_quality=args.quality
    )
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = HEVCViTPackingModel(MODELS[name]()).eval()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        clips = {"ball": next(str(p) for p in sample_inputs() if p.name == "ball.mp4")}
        for name, make in (("pink", pink_clip), ("blocks", blocks_clip)):
            make(Path(folder) / f"{name}.mp4")
            clips[name] = str(Path(folder) / f"{name}.mp4")
        for name, video in clips.items():
            results[name] = measure(video, settings, models, args.quality)
    print(json.dumps(dict(settings=settings.as_dict(), codec=_codec(), clips=results), indent=1))


if __name__ == "__main__":
    main()
