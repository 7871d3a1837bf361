"""Throughput of ``hevc-vit codec-assets`` on the CPU: videos per second and where the time goes.

    PYTHONPATH=src python benchmarks/codec_assets.py [--clips 8] [--clip-frames 96] [--width 640] [--height 360]
        [--frames 64] [--square-size 576] [--workers 0 4] [--ray]

Writes ``--clips`` synthetic clips (a textured square moving over a textured, slowly panning background,
``libx264`` when present, else ``mpeg4``), then for each ``--workers`` value runs :func:`hevc_vit.codec.write_assets`
into a fresh folder and reports videos/s (wall clock, the whole run) and the share of the per-video time in
decode (+ frame preparation), signals (+ selection), mosaics and writing (JPEG + npy + meta), summed over the
videos; ``--ray`` adds a run on a local Ray instance (one task a video). It checks that every run wrote the same
bytes (``npy`` files and mosaics; the JPEG encoder is deterministic, so equal JPEG bytes mean equal canvases
before JPEG). Prints one JSON object.
Timings on a shared machine are noisy: read the split and the ratio, not the last digit.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from hevc_vit.codec import AssetSettings, write_assets


def write_clip(path: Path, frames: int, width: int, height: int, seed: int) -> str:
    codec = "libx264"
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # UnknownCodecError: a wheel built without libx264
        codec = "mpeg4"
    rng = np.random.default_rng(seed)
    span_h, span_w = height + frames, width + 2 * frames
    coarse = rng.integers(0, 256, (span_h // 8 + 1, span_w // 8 + 1, 3), dtype=np.uint8)
    background = np.kron(coarse, np.ones((8, 8, 1), np.uint8))
    square = np.kron(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))  # 64 px
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        stream.options = {"g": "32"}
        for i in range(frames):
            frame = background[i : i + height, 2 * i : 2 * i + width].copy()  # the camera pans 1 px down, 2 right
            y, x = (8 + 3 * i) % (height - 64), (8 + 5 * i) % (width - 64)
            frame[y : y + 64, x : x + 64] = square
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--clip-frames", type=int, default=96)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--square-size", type=int, default=576)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1])
    parser.add_argument("--ray", action="store_true", help="also run on a local Ray instance")
    args = parser.parse_args()
    settings = AssetSettings(frames=args.frames, num_images=args.num_images, square_size=args.square_size)
    result: dict = dict(
        clips=args.clips,
        clip=f"{args.width}x{args.height}x{args.clip_frames}",
        settings=dict(frames=args.frames, num_images=args.num_images, square_size=args.square_size),
        cpus=os.cpu_count(),
        runs=[],
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        folder.mkdir()
        for i in range(args.clips):
            result["codec"] = write_clip(folder / f"clip{i:03d}.mp4", args.clip_frames, args.width, args.height, i)
        arrays = None
        engines = [("local", w) for w in args.workers] + ([("ray", 0)] if args.ray else [])
        for engine, workers in engines:
            out = Path(tmp) / f"out-{engine}{workers}"
            start = time.perf_counter()
            report = write_assets([folder], out, settings, workers=workers, engine=engine)
            wall = time.perf_counter() - start
            assert not report.failed, report.failed
            split = {k: sum(r["timings"][k] for r in report.rows) for k in ("decode", "signals", "mosaics", "write")}
            total = sum(split.values())
            result["runs"].append(
                dict(
                    engine=engine,
                    workers=workers,
                    videos_per_s=round(len(report.rows) / wall, 3),
                    wall_s=round(wall, 2),
                    share={k: round(v / total, 3) for k, v in split.items()},
                    seconds_per_video={k: round(v / len(report.rows), 3) for k, v in split.items()},
                )
            )
            got = {
                (row["key"], name): (Path(row["asset_dir"]) / name).read_bytes()
                for row in report.rows
                for name in os.listdir(row["asset_dir"])
                if name != "meta.json"  # timings and the creation time differ
            }
            if arrays is not None:
                assert got == arrays, f"engine={engine} workers={workers} wrote other bytes"
            arrays = got
    result["identical_assets_across_runs"] = True
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
