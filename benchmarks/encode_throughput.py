"""Throughput of ``hevc-vit encode`` end to end, against the packing model alone on the same items.

    PYTHONPATH=src python benchmarks/encode_throughput.py --images 1500 --model large --workers 12

Writes synthetic JPEGs of random sizes (each side 256..1280 px), then times three runs over them:
``encode`` saving patch features and pooled vectors, ``encode --pooled-only`` (what the storage costs),
and the packing model alone on the same preprocessed groups, already in memory (the compute ceiling).
Prints one JSON object; with ``--json PATH`` also writes it there. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _write_image(args: tuple[str, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 1281, size=2))
    coarse = rng.integers(0, 256, size=(h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    image.save(path, quality=90)


def make_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{i:06d}.jpg"), i) for i in range(count)]
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_write_image, jobs, chunksize=16)
    return [path for path, _ in jobs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(model, out_dir: Path, processor, max_tokens: int, device, dtype) -> dict:
    """The packing model alone on the groups encode would form, items preprocessed beforehand."""
    from hevc_vit.encode import read_index
    from hevc_vit.encode.decode.item import LoadOptions
    from hevc_vit.encode.decode.load import load_item
    from hevc_vit.encode.model.batching import first_fit_decreasing
    from hevc_vit.encode.model.forward import model_input
    from hevc_vit.packing import PackingPlan

    rows = [r for r in read_index(out_dir) if r["status"] == "ok"][:400]
    options = LoadOptions(processor, model.config.patch_size, jpeg_draft=True)  # as encode loads them (its default)
    items = [load_item(i, r["path"], options) for i, r in enumerate(rows)]
    groups = first_fit_decreasing([it.num_tokens for it in items], max_tokens)
    batches = []
    for group in groups:
        patches = model_input([items[i] for i in group], device, dtype)  # normalised on the device, untimed
        grid = torch.tensor([items[i].grid_thw for i in group])
        batches.append((patches, PackingPlan.from_grid_thw(grid, device=device)))
    with torch.inference_mode():
        for patches, plan in batches[:3]:  # warm-up
            model(patches, plan=plan)
        _sync(device)
        start = time.perf_counter()
        for patches, plan in batches:
            model(patches, plan=plan)
        _sync(device)
        secs = time.perf_counter() - start
    tokens = sum(int(p.shape[0]) for p, _ in batches)
    return {
        "items": len(items),
        "forwards": len(batches),
        "tokens": tokens,
        "seconds": round(secs, 3),
        "tokens_per_s": round(tokens / secs),
        "items_per_s": round(len(items) / secs, 1),
    }


def check_against_cpu(images: list[str], work: Path, workers: int) -> dict:
    """The same items through ``encode`` on CUDA and on the CPU (float32, ``small`` preset): the largest
    difference relative to the CPU's largest value, per tensor kind."""
    from hevc_vit.encode import encode, iter_features

    runs = {}
    for device in ("cuda", "cpu"):
        encode(
            images,
            work / f"check_{device}",
            model="small",
            device=device,
            dtype="float32",
            workers=workers,
            max_tokens=8192,
            progress=False,
            log=lambda m: None,
        )
        runs[device] = {row["path"]: t for row, t in iter_features(work / f"check_{device}")}
    assert runs["cuda"].keys() == runs["cpu"].keys()
    worst = {}
    for path, ref in runs["cpu"].items():
        for name in ("patches", "pooled"):
            err = (runs["cuda"][path][name] - ref[name]).abs().max() / ref[name].abs().max()
            worst[name] = max(worst.get(name, 0.0), float(err))
    return {"items": len(runs["cpu"]), "max_rel_diff": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--model", default="large")
    parser.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="also compare encode on CUDA and on the CPU (float32) over N images",
    )
    args = parser.parse_args()

    from hevc_vit.encode import encode
    from hevc_vit.encode.model.loader import build_processor, load_model
    from hevc_vit.runtime.devices import default_dtype

    work = Path(args.dir or tempfile.mkdtemp(prefix="encode_bench_"))
    report: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": args.model,
        "workers": args.workers,
        "max_tokens": args.max_tokens,
    }
    try:
        t0 = time.perf_counter()
        make_images(work / "images", args.images)
        report["make_images_s"] = round(time.perf_counter() - t0, 1)
        quiet = dict(
            progress=False, log=lambda m: None, workers=args.workers, max_tokens=args.max_tokens, model=args.model
        )
        for name, extra in (("encode", {}), ("encode_pooled_only", {"pooled_only": True})):
            result = encode([work / "images"], work / name, **quiet, **extra)
            done = result.encoded + result.failed
            report[name] = {
                "items": done,
                "failed": result.failed,
                "tokens": result.tokens,
                "seconds": round(result.seconds, 2),
                "items_per_s": round(done / result.seconds, 1),
                "tokens_per_s": round(result.tokens / result.seconds),
                "shards": result.shards,
            }
            print(name, report[name], file=sys.stderr, flush=True)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = default_dtype(device)
        model, _, _ = load_model(args.model, device, dtype)
        processor = build_processor("native", model.config)
        report["model_only"] = model_only(model, work / "encode", processor, args.max_tokens, device, dtype)
        report["attention"] = model.config.attention_backend
        if args.check and device.type == "cuda":
            images = sorted(str(p) for p in (work / "images").iterdir())[: args.check]
            report["cuda_vs_cpu_float32"] = check_against_cpu(images, work, args.workers)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
