"""The vision path of a LLaVA model: native resolution (this library) against transformers' fixed anyres tiling.

    PYTHONPATH=src python benchmarks/llava_vision_path.py --rounds 3

Both paths use the same encoder (the ``small`` preset: ViT-S/16, 6 layers, width 384) and the same projector
(``mlp2x_gelu``) on the same images (7 of mixed real-world sizes, 320x240 ... 1280x960), on the CPU:

* ``native``: :class:`HEVCViTLlavaForConditionalGeneration`'s ``get_image_features`` — every image at its own
  size (sides rounded to 16 px, up to ``--max-tokens`` patches), all packed in one tower and projector call;
* ``anyres``: transformers' ``LlavaOnevisionForConditionalGeneration`` with :class:`HEVCViTModel` as its vision
  tower (``vision_feature_select_strategy="full"``: no CLS token) at its fixed tiling: the base image at
  ``--tile`` px plus the tiles of the best of ``image_grid_pinpoints`` (LLaVA-OneVision's, 1x1 to 6x6 tiles),
  through its ``get_image_features`` (tower on every tile, projector, then — transformers 5 — its
  ``pack_image_features``: unpadding, ``anyres_max_9`` down-sampling and the newline tokens).

The text model (a 1-layer Qwen2 of width 64) is built but not timed. Preprocessing is done once, before the
timing. Reported per path: vision tokens produced (what the LLM reads), encoder tokens computed (patches the
tower ran), seconds (median of interleaved rounds, after one warm-up each; also the best round), tokens/s
(encoder tokens per second) and images/s; and the ratios. On a shared machine, ``--threads 1 --clock cpu``
times this process's CPU time instead of the wall clock. Random weights: speed only. Prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor

from hevc_vit import HEVCViTConfig, HEVCViTImageProcessor, HEVCViTLlavaConfig, HEVCViTLlavaForConditionalGeneration

SIZES = [(320, 240), (480, 640), (640, 480), (800, 600), (1024, 768), (1280, 720), (1280, 960)]  # (W, H)
TEXT = dict(
    model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def make_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Smooth random pictures (coarse noise, bicubic-upsampled) of ``sizes`` ``(W, H)``."""
    rng = np.random.default_rng(seed)
    images = []
    for w, h in sizes:
        coarse = rng.integers(0, 256, size=(h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    return images


def build_native(vision: HEVCViTConfig, max_tokens: int) -> tuple[torch.nn.Module, HEVCViTImageProcessor]:
    config = HEVCViTLlavaConfig(vision_config=vision, text_config=dict(TEXT), projector_type="mlp2x_gelu")
    processor = HEVCViTImageProcessor(patch_size=vision.patch_size, min_tokens=1, max_tokens=max_tokens)
    return HEVCViTLlavaForConditionalGeneration(config).eval(), processor


def build_anyres(vision: HEVCViTConfig, tile: int) -> tuple[torch.nn.Module, LlavaOnevisionImageProcessor]:
    pinpoints = [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]  # LLaVA-OneVision's grid
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=dict(TEXT), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-2, projector_hidden_act="gelu",
        image_token_index=TEXT["vocab_size"] - 2, video_token_index=TEXT["vocab_size"] - 1,
    )  # fmt: skip
    processor = LlavaOnevisionImageProcessor(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, do_pad=True,
        image_mean=HEVCViTImageProcessor().image_mean, image_std=HEVCViTImageProcessor().image_std,
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor


def _count(features) -> int:
    """Rows of the LLM tokens a ``get_image_features`` returned (a tensor, a list, or an output object)."""
    features = getattr(features, "pooler_output", features)
    if isinstance(features, torch.Tensor):
        return features.shape[0] if features.dim() == 2 else features.shape[0] * features.shape[1]
    return sum(_count(f) for f in features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path, interleaved (default 3)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the image sizes and the tile (default 1)")
    parser.add_argument("--tile", type=int, default=None, help="the anyres tile side in px (default 384 x scale)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="native: most patches per image (8192)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (with --threads 1, for a shared "
                        "machine: other processes' load does not count)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = loadavg()
    torch.manual_seed(0)
    p = HEVCViTConfig.from_preset("small").patch_size
    tile = args.tile or max(1, round(384 * args.scale / p)) * p  # a whole number of patches
    sizes = [(round(w * args.scale), round(h * args.scale)) for w, h in SIZES]
    vision = HEVCViTConfig.from_preset("small", image_size=tile)
    images = make_images(sizes)
    native, native_processor = build_native(vision, args.max_tokens)
    anyres, anyres_processor = build_anyres(vision, tile)
    x = native_processor(images)  # preprocessing: not timed
    y = anyres_processor(images, return_tensors="pt")
    patches_per_tile = (tile // p) ** 2
    layer, strategy = anyres.config.vision_feature_layer, anyres.config.vision_feature_select_strategy

    def run_native():
        return native.get_image_features(x["pixel_values"], x["image_grid_thw"])

    def run_anyres():
        return anyres.model.get_image_features(
            y["pixel_values"], y["image_sizes"], vision_feature_layer=layer, vision_feature_select_strategy=strategy
        )

    paths = {"native": run_native, "anyres": run_anyres}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with torch.inference_mode():
        produced = {name: _count(fn()) for name, fn in paths.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                start = clock()
                fn()
                times[name].append(clock() - start)
    tiles = [int(n) for n in (y["pixel_values"].abs().flatten(2).sum(-1) > 0).sum(1)]  # the non-padding tiles
    computed = {"native": int(x["image_grid_thw"].prod(-1).sum()), "anyres": sum(tiles) * patches_per_tile}
    result: dict = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "images": [f"{w}x{h}" for w, h in sizes], "preset": "small",
        "scale": args.scale, "tile": tile, "anyres_tiles": tiles, "native_grids": x["image_grid_thw"][:, 1:].tolist(),
        "rounds": args.rounds, "clock": args.clock, "loadavg_before": load_before, "paths": {},
    }  # fmt: skip
    for name in paths:
        seconds = statistics.median(times[name])
        result["paths"][name] = {
            "vision_tokens": produced[name], "encoder_tokens": computed[name], "seconds": round(seconds, 4),
            "tokens_per_s": round(computed[name] / seconds, 1), "images_per_s": round(len(images) / seconds, 3),
            "best_seconds": round(min(times[name]), 4), "all_seconds": [round(t, 4) for t in times[name]],
        }  # fmt: skip
    a, b = result["paths"]["native"], result["paths"]["anyres"]
    result["ratios"] = {
        "native_vs_anyres_images_per_s": round(a["images_per_s"] / b["images_per_s"], 3),
        "native_vs_anyres_encoder_tokens": round(a["encoder_tokens"] / b["encoder_tokens"], 3),
        "native_vs_anyres_vision_tokens": round(a["vision_tokens"] / b["vision_tokens"], 3),
        "native_vs_anyres_tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
    }
    result["loadavg_after"] = loadavg()
    print(f"{'path':8} {'vision tok':>10} {'encoder tok':>11} {'seconds':>8} {'tokens/s':>9} {'images/s':>8}")
    for name, r in result["paths"].items():
        print(f"{name:8} {r['vision_tokens']:>10,} {r['encoder_tokens']:>11,} {r['seconds']:>8.3f} "
              f"{r['tokens_per_s']:>9,.0f} {r['images_per_s']:>8.3f}")  # fmt: skip
    print("ratios:", result["ratios"], "| loadavg before", load_before, "after", result["loadavg_after"])
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
