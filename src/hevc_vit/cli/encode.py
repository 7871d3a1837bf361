"""``hevc-vit encode``: the command line of :func:`hevc_vit.encode.encode`.

The options come from :class:`~hevc_vit.encode.EncodeOptions`: every field the command line may set
becomes ``--field-name`` with the field's help, type, choices and default, so an option is declared once.
Only what is not an encode option is added here: the inputs, ``--out`` and ``--quiet``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..encode import DEFAULT_OUT, EncodeOptions, encode
from .common import EXIT_FAILED, EXIT_OK, printable, run_guarded

_EPILOG = """\
examples:
  hevc-vit encode                                   # the demo: sample images + clip, random small model
  hevc-vit encode photos/ clips/*.mp4 --model ./ckpt --out feats
  hevc-vit encode list.txt --model ./ckpt --out feats --resume
  torchrun --nproc-per-node 8 -m hevc_vit encode data/ --model ./ckpt --out feats
"""
_INTERRUPTED = "finished shards are kept: rerun with --resume to continue"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``encode`` to the ``hevc-vit`` command line."""
    p = subparsers.add_parser(
        "encode",
        help="encode images and videos to native-resolution features (safetensors shards + index.jsonl)",
        description=(
            "Encode images and videos at their native resolution with the packing model. With no INPUT, encodes "
            "the sample images and clip shipped with the package; with no --model, uses a small demo model with "
            "random weights."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files, folders (recursive), globs, or .txt lists of paths"
    )
    p.add_argument("--out", "-o", metavar="DIR", help=f"output folder (default: ./{DEFAULT_OUT}, numbered if taken)")
    add_option_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notices; the summary only")
    p.set_defaults(run=run)


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` per field of :class:`EncodeOptions` the command line may set. Unset options are left out
    of the parsed namespace (``SUPPRESS``), so the dataclass's defaults apply."""
    for f in dataclasses.fields(EncodeOptions):
        meta = f.metadata
        if not meta["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = meta["help"].format(default=f.default)
        if meta["parse"] is None:  # a switch, off by default
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        parser.add_argument(
            flag,
            type=meta["parse"],
            choices=meta["choices"],
            metavar=meta["metavar"],
            default=argparse.SUPPRESS,
            help=help_text,
        )


def options_from_args(args: argparse.Namespace) -> EncodeOptions:
    """The :class:`EncodeOptions` the parsed command line asks for (``--quiet``: no progress bar, no notices)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EncodeOptions) if hasattr(args, f.name)}
    if args.quiet:
        given.update(progress=False, log=lambda message: None)
    return EncodeOptions(**given)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit encode``; returns the exit status: 0 when inputs were encoded (some may have failed rows), 1 when
    every input failed or the output could not be written, 2 for invalid arguments or a refused or damaged
    folder, 130 when interrupted."""
    return run_guarded("encode", lambda: _encode(args), interrupted=_INTERRUPTED)


def _encode(args: argparse.Namespace) -> int:
    result = encode(args.inputs, args.out, options_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:  # the totals and the summary are rank 0's
        return EXIT_OK
    print(printable(result.summary()))
    return EXIT_FAILED if result.nothing_encoded else EXIT_OK
