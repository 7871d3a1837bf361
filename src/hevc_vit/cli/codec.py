"""``hevc-vit codec-preview``: draw the patches codec-aligned selection keeps (:mod:`hevc_vit.codec`)."""

from __future__ import annotations

import argparse
import json

from hevc_vit.cli.common import EXIT_OK, integer_in, number_in, run_guarded
from hevc_vit.codec import NORMALIZE, SIGNALS, CodecSparseConfig, render_preview, select_patches

MAX_SIDE = 1 << 16  # pixels of a frame side, patches of a sheet's row: far above any real clip


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``codec-preview`` to the ``hevc-vit`` command line."""
    p = subparsers.add_parser(
        "codec-preview",
        help="draw the patches codec-aligned selection keeps, as a contact sheet",
        description="Select the changing patches of VIDEO (see hevc_vit.codec) and draw the sampled frames as a "
        "PNG contact sheet, kept patches bright and the others dimmed. Prints the selection summary as JSON.",
    )
    p.add_argument("video", help="a video file")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--patch-size", type=integer_in(1, 1024), default=16, help="the model's patch size (default: 16)")
    p.add_argument("--frames", type=integer_in(1, 4096), default=64, help="frames sampled over the clip (default: 64)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--ratio", type=number_in(0, 1, low_open=True), help="fraction of the dense patches kept (default: 0.125)"
    )
    budget.add_argument("--tokens", type=integer_in(1, 1 << 24), help="number of patches kept")
    budget.add_argument(
        "--budget-frames", type=number_in(0, 4096, low_open=True), help="patches kept, in whole-frame equivalents"
    )
    p.add_argument("--signals", default="aligned_difference", help=f"comma-separated, from {', '.join(SIGNALS)}")
    p.add_argument("--normalize", choices=NORMALIZE, default="volume", help="signal normalisation (default: volume)")
    p.add_argument("--no-keep-first-frame", action="store_true", help="do not keep the first frame whole")
    p.add_argument(
        "--size", type=parse_size, help="frame size HxW in pixels, multiples of the patch size (default: the video's)"
    )
    p.add_argument(
        "--max-tokens-per-frame",
        type=integer_in(1, 1 << 20),
        help="shrink the default frame size to this many patches",
    )
    p.add_argument("--columns", type=integer_in(1, 4096), default=8, help="frames per row of the sheet (default: 8)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit codec-preview``: 0 when the sheet was written, 2 for invalid input."""
    return run_guarded("codec-preview", lambda: _preview(args))


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"HxW"`` -> ``(H, W)``, each side from 1 to ``MAX_SIDE`` pixels; None stays None."""
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 2 or not all(1 <= side <= MAX_SIDE for side in size):
        raise argparse.ArgumentTypeError(f"{text!r}; expected HxW, sides from 1 to {MAX_SIDE} pixels, e.g. 224x224")
    return size


def _preview(args: argparse.Namespace) -> int:
    budget = args.tokens if args.tokens is not None else args.ratio
    config = CodecSparseConfig(
        frames=args.frames,
        budget=budget,
        budget_frames=args.budget_frames,
        keep_first_frame=not args.no_keep_first_frame,
        signals=tuple(args.signals.split(",")),
        normalize=args.normalize,
        size=args.size,
        max_tokens_per_frame=args.max_tokens_per_frame,
    )
    selection = select_patches(args.video, args.patch_size, config)
    render_preview(args.video, selection, args.output, columns=args.columns)
    print(json.dumps({"preview": str(args.output), **selection.summary()}))
    return EXIT_OK
