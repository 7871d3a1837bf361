"""Cost of codec-sparse encoding against dense, end to end, on the CPU.

    PYTHONPATH=src python benchmarks/codec_cost.py [--frames 64] [--size 224] [--ratio 0.125] [--repeats 3]

Writes a synthetic clip (a textured square moving over a textured background, ``libx264`` when present, else
``mpeg4``), then times, interleaved round-robin and reported as medians:

    sparse  select_patches (decode + scores + top-K) + encode_selection (decode again, preprocess the frames
            with kept patches, the model on K tokens)
    dense   decode + preprocess every sampled frame + the model on all T·h·w tokens

Model: ``HEVCViTConfig.from_preset("small")``, random weights (speed only), float32. Prints one JSON object.
Timings on a shared machine are noisy: read the ratio, not the last digit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from hevc_vit import HEVCViTConfig, HEVCViTPackingModel, patchify
from hevc_vit.codec import CodecSparseConfig, default_preprocess, encode_selection, select_patches


def write_clip(path: Path, frames: int, size: int) -> str:
    codec = "libx264"
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # UnknownCodecError: a wheel built without libx264
        codec = "mpeg4"
    rng = np.random.default_rng(0)
    background = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    square = np.kron(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))  # 48 px
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.bit_rate = 1_000_000
        stream.options = {"g": "16"}
        for i in range(frames):
            frame = background.copy()
            y, x = (8 + 3 * i) % (size - 48), (8 + 5 * i) % (size - 48)
            frame[y : y + 48, x : x + 48] = square
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def run_sparse(model, path: Path, config: CodecSparseConfig, p: int) -> dict:
    start = time.perf_counter()
    selection = select_patches(path, p, config)
    selected = time.perf_counter()
    with torch.no_grad():
        last, _ = encode_selection(model, path, selection)
    end = time.perf_counter()
    return dict(
        total=end - start,
        select=selected - start,
        encode=end - selected,
        tokens=last.shape[0],
        frames=selection.grid_thw[0],
    )


def run_dense(model, path: Path, size: tuple[int, int], p: int) -> dict:
    start = time.perf_counter()
    preprocess = default_preprocess(size)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [preprocess(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    video = torch.stack(frames, dim=1)[None]  # (1, C, T, H, W)
    patches, grid = patchify(video, p)  # (T·h·w, C·p·p)
    loaded = time.perf_counter()
    with torch.no_grad():
        last = model(patches, grid_thw=grid).last_hidden_state
    end = time.perf_counter()
    return dict(total=end - start, load=loaded - start, encode=end - loaded, tokens=last.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.125)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = HEVCViTPackingModel(HEVCViTConfig.from_preset("small")).eval()
    p = model.config.patch_size
    config = CodecSparseConfig(frames=args.frames, budget=args.ratio)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        codec = write_clip(path, args.frames, args.size)
        run_sparse(model, path, config, p)  # warm-up: imports, allocator, kernels
        runs: dict[str, list[dict]] = {"sparse": [], "dense": []}
        for r in range(args.repeats):
            for mode in ("sparse", "dense") if r % 2 == 0 else ("dense", "sparse"):
                if mode == "sparse":
                    runs[mode].append(run_sparse(model, path, config, p))
                else:
                    runs[mode].append(run_dense(model, path, (args.size, args.size), p))

    def median(mode: str, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[mode]), 4)

    frames = runs["sparse"][0]["frames"]
    result = dict(
        clip=f"{frames} frames {args.size}x{args.size} {codec}",
        model="small (random weights), float32, CPU",
        threads=torch.get_num_threads(),
        repeats=args.repeats,
        tokens=dict(sparse=runs["sparse"][0]["tokens"], dense=runs["dense"][0]["tokens"]),
        selection_ms_per_frame=round(1000 * median("sparse", "select") / frames, 2),
        sparse_s=dict(
            total=median("sparse", "total"),
            select=median("sparse", "select"),
            gather_and_model=median("sparse", "encode"),
        ),
        dense_s=dict(
            total=median("dense", "total"),
            decode_and_preprocess=median("dense", "load"),
            model=median("dense", "encode"),
        ),
        speedup_end_to_end=round(median("dense", "total") / median("sparse", "total"), 2),
        note="shared, noisy machine: orders of magnitude, not digits",
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
