"""``hevc-vit encode``: the command line of :func:`hevc_vit.encode.encode`.

The options come from :class:`~hevc_vit.encode.EncodeOptions`: every field the command line may set
becomes ``--field-name`` with the field's help, type, choices and default, so an option is declared once.
Only what is not an encode option is added here: the inputs (``--hf-dataset``, ``--split``), ``--out``, and how
the command reports (``--quiet``, ``--json``, ``--allow-failures``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from hevc_vit.cli.common import EXIT_OK, printable, run_guarded
from hevc_vit.encode import DEFAULT_OUT, EncodeOptions, encode
from hevc_vit.encode.readers.memory import open_hf_dataset

_EPILOG = """\
examples:
  hevc-vit encode                                   # the demo: sample images + clip, random small model
  hevc-vit encode photos/ clips/*.mp4 --model ./ckpt --out feats
  hevc-vit encode list.txt --model ./ckpt --out feats --resume
  hevc-vit encode 'shards/data-{000000..000099}.tar' s3://bucket/more/ --model ./ckpt --out feats
  hevc-vit encode urls.parquet --path-column url --keep-columns caption --retries 3 --out feats
  hevc-vit encode --hf-dataset ./saved_ds --split train --image-column image --out feats --json
  torchrun --nproc-per-node 8 -m hevc_vit encode data/ --model ./ckpt --out feats
  hevc-vit encode s3://bucket/images/ --model ./ckpt --out feats --engine ray --ray-address auto
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
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, folders (recursive), globs, .txt lists of paths, webdataset .tar shards (data-{000..009}.tar), "
        ".parquet/.csv/.tsv/.jsonl tables of paths, URLs (s3://, gs://, hf://, https://, file://, memory://), "
        "codec-assets folders (OUT/assets/KEY, or OUT: mosaics at their positions_thw)",
    )
    p.add_argument("--out", "-o", metavar="DIR", help=f"output folder (default: ./{DEFAULT_OUT}, numbered if taken)")
    p.add_argument(
        "--hf-dataset",
        metavar="PATH|NAME",
        help="also encode a Hugging Face dataset: a folder saved with save_to_disk, or a Hub name",
    )
    p.add_argument("--split", metavar="NAME", help="--hf-dataset: the split (default: train, or the only one)")
    add_option_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notices; the summary only")
    p.add_argument(
        "--allow-failures", action="store_true", help="exit 0 when some inputs fail (not all); default: exit 1"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout (text: stderr)")
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
            type=_argument_type(meta["parse"], meta["check"]),
            choices=meta["choices"],
            metavar=meta["metavar"],
            default=argparse.SUPPRESS,
            help=help_text,
        )


def _argument_type(parse, check=None):
    """``parse``, then the option's ``check`` (its range), at parse time: an error is argparse's (exit 2, the
    option, the value and what was expected), and its ``ValueError`` is shown as it is (argparse would print
    only ``invalid <name> value``)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError as e:
            if parse is int:
                raise argparse.ArgumentTypeError(f"{text!r}; expected an integer") from None
            if parse is float:
                raise argparse.ArgumentTypeError(f"{text!r}; expected a number") from None
            raise argparse.ArgumentTypeError(str(e)) from None
        expected = check(value) if check is not None else ""
        if expected:
            raise argparse.ArgumentTypeError(f"{text!r}; expected {expected}")
        return value

    return convert


def options_from_args(args: argparse.Namespace) -> EncodeOptions:
    """The :class:`EncodeOptions` the parsed command line asks for (``--quiet``: no progress bar, no notices)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EncodeOptions) if hasattr(args, f.name)}
    if args.quiet:
        given.update(progress=False, log=lambda message: None)
    return EncodeOptions(**given)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit encode``; returns the exit status: 0 when every input was encoded, 1 when at least one failed
    (``--allow-failures``: only when every input failed) or the output could not be written, 2 for invalid
    arguments or a refused or damaged folder, 130 when interrupted."""
    return run_guarded("encode", lambda: _encode(args), interrupted=_INTERRUPTED)


def _encode(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    inputs = list(args.inputs)
    if args.hf_dataset is not None:
        inputs.append(open_hf_dataset(args.hf_dataset, args.split))
    elif args.split is not None:
        raise ValueError(f"--split {args.split} was given without --hf-dataset; it chooses a split of the dataset")
    result = encode(inputs, args.out, options)
    if int(os.environ.get("RANK", "0")) != 0:  # the totals and the summary are rank 0's
        return EXIT_OK
    status = result.exit_status(args.allow_failures)
    if args.json:
        if not args.quiet:
            print(printable(result.summary()), file=sys.stderr)
        print(json.dumps({**result.as_dict(), "exit_status": status}))
    else:
        print(printable(result.summary()))
    return status
