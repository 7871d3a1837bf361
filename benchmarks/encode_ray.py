"""End-to-end throughput of ``encode --engine ray`` against the local engine on the same small JPEGs, each as a
fraction of what the model alone does on the same packed items (CPU only).

    PYTHONPATH=src python benchmarks/encode_ray.py --images 2000

Writes ``--images`` small JPEGs (those of ``encode_sources.py``), then in one process: the local engine
(``encode``, its default decoding workers), the Ray engine on a local Ray instance of ``--cpus`` CPUs
(loopback only, no dashboard; ``--decode-cpus`` decoding tasks at once, one model actor), and the model alone:
the items decoded beforehand, then packed to the same token budget and encoded by the Ray engine's model stage,
timed without decoding. Every figure is tokens (patches) per second of encoded items. The ``small`` preset (random
weights: speed only) on the CPU, float32. Both engines must give the same pooled vectors. Prints one JSON object
at the end. Run it on a quiet machine: anything else running changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from encode_sources import make_images

from hevc_vit.encode import EncodeOptions, encode, iter_features
from hevc_vit.encode.decode.workers import load_items

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def options(args, **extra) -> EncodeOptions:
    bounds = dict(min_image_tokens=args.min_tokens, max_image_tokens=args.max_tokens)
    return EncodeOptions(model=args.preset, device="cpu", pooled_only=True, progress=False, **bounds, **extra)


def run_engine(folder: Path, out: Path, opts: EncodeOptions) -> tuple[float, dict]:
    result = encode([folder], out, opts.replace(log=lambda message: None))
    assert result.failed == 0, result.summary()
    pooled = {row["path"]: tensors["pooled"] for row, tensors in iter_features(out)}
    return result.tokens / result.seconds, pooled


def model_alone(folder: Path, args) -> float:
    """Tokens/s of the Ray engine's model stage on the items, decoded beforehand (not timed)."""
    from hevc_vit.encode.engines.ray.dataset import Stages, prepare
    from hevc_vit.encode.engines.ray.stages import ModelStage

    opts = options(args, engine="ray")
    encoder, device, dtype = prepare(opts, lambda message: None)
    load = Stages(opts, encoder, device, dtype, [], None).load
    paths = sorted(str(p) for p in folder.iterdir())
    items = list(load_items(list(enumerate(paths)), load, 0))
    stage = ModelStage(opts.replace(model=encoder.model, processor=encoder.processor), "cpu")
    keys = [f"{i:08d}" for i in range(len(items))]
    start = time.perf_counter()
    results = stage.encode(items, keys, None)
    seconds = time.perf_counter() - start
    return sum(patches for _, _, patches in results) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    parser.add_argument("--decode-cpus", type=int, default=None, help="Ray: decoding tasks at once (default: Ray's)")
    parser.add_argument("--min-tokens", type=int, default=16, help="native processor bounds")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    os.environ.update(LOOPBACK)  # before Ray is imported: its servers bind 127.0.0.1
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, data in enumerate(make_images(args.images)):
            (folder / f"{i:06d}.jpg").write_bytes(data)
        local, local_pooled = run_engine(folder, Path(tmp) / "local", options(args))
        print(f"local engine: {local:,.0f} tokens/s", flush=True)
        ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            ray_opts = options(args, engine="ray", decode_cpus=args.decode_cpus)
            on_ray, ray_pooled = run_engine(folder, Path(tmp) / "ray", ray_opts)
        finally:
            ray.shutdown()
        print(f"ray engine:   {on_ray:,.0f} tokens/s", flush=True)
        for path, vector in local_pooled.items():
            assert torch.allclose(ray_pooled[path], vector, rtol=1e-4, atol=1e-5), f"{path}: the engines differ"
        alone = model_alone(folder, args)
        print(f"model alone:  {alone:,.0f} tokens/s", flush=True)
    summary = {
        "images": args.images,
        "preset": args.preset,
        "ray_cpus": args.cpus,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {"local": round(local), "ray": round(on_ray), "model_alone": round(alone)},
        "local_vs_model": round(local / alone, 3),
        "ray_vs_model": round(on_ray / alone, 3),
        "ray_vs_local": round(on_ray / local, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
