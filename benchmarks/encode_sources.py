"""Throughput of ``hevc-vit encode`` reading the same small JPEGs as loose files and from webdataset tar shards.

    PYTHONPATH=src python benchmarks/encode_sources.py --images 2000 --shards 4

Writes ``--images`` small JPEGs (sides 64..192 px) once as loose files and once packed into ``--shards`` tar
shards (each sample a ``.jpg`` and a ``.txt``), then encodes each source with the ``small`` preset (random
weights: speed only) on the CPU, ``--repeats`` times in alternating order after one untimed warm-up run (the
first run of a process is faster on a shared machine, whatever its source), and prints the median time of each
and the ratio. Both sources must give the same features (checked on the pooled vectors). Prints one JSON object
at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hevc_vit.encode import encode, iter_features


def make_images(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        w, h = (int(v) for v in rng.integers(64, 193, size=2))
        coarse = rng.integers(0, 256, size=(h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def write_sources(root: Path, blobs: list[bytes], shards: int) -> tuple[Path, str]:
    loose = root / "loose"
    loose.mkdir()
    for i, data in enumerate(blobs):
        (loose / f"{i:06d}.jpg").write_bytes(data)
    per_shard = -(-len(blobs) // shards)
    for s in range(shards):
        with tarfile.open(root / f"data-{s:06d}.tar", "w") as tar:
            for i in range(s * per_shard, min(len(blobs), (s + 1) * per_shard)):
                for name, data in ((f"{i:06d}.jpg", blobs[i]), (f"{i:06d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return loose, str(root / f"data-{{000000..{shards - 1:06d}}}.tar")


def time_run(inputs, out: Path, args) -> tuple[float, object]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = encode(
        inputs,
        out,
        model="small",
        device="cpu",
        workers=args.workers,
        min_image_tokens=args.min_tokens,
        max_image_tokens=args.max_tokens,
        pooled_only=True,
        progress=False,
        log=lambda m: None,
    )
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: encode's)")
    parser.add_argument("--min-tokens", type=int, default=16, help="native processor bounds: a light model load")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    blobs = make_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loose, shard_pattern = write_sources(root, blobs, args.shards)
        sources = {"loose files": [loose], f"{args.shards} tar shards": [shard_pattern]}
        time_run([loose], root / "out", args)  # warm-up, untimed
        times: dict[str, list[float]] = {name: [] for name in sources}
        pooled: dict[str, torch.Tensor] = {}
        for repeat in range(args.repeats):
            for name, inputs in sorted(sources.items(), reverse=repeat % 2 == 1):
                seconds, result = time_run(inputs, root / "out", args)
                assert result.encoded == args.images and result.failed == 0, result.summary()
                times[name].append(seconds)
                pooled[name] = torch.stack([t["pooled"] for _, t in iter_features(root / "out")])
                print(f"{name:>14}: {seconds:6.2f} s, {args.images / seconds:7.1f} images/s", flush=True)
        a, b = pooled.values()
        assert torch.equal(a, b), "the two sources gave different features"
    median = {name: float(np.median(t)) for name, t in times.items()}
    figures = {name: {"seconds": round(s, 2), "images_per_s": round(args.images / s, 1)} for name, s in median.items()}
    loose_s, tar_s = median.values()
    summary = {
        "images": args.images,
        "shards": args.shards,
        "threads": torch.get_num_threads(),
        "median": figures,
        "tar_vs_loose": round(loose_s / tar_s, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
