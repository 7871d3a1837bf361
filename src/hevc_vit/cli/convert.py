"""``hevc-vit convert`` and ``hevc-vit info``: front ends of :mod:`hevc_vit.convert`."""

from __future__ import annotations

import argparse

from hevc_vit.cli.common import EXIT_FAILED, EXIT_OK, print_notice, run_guarded
from hevc_vit.configuration import PRESETS
from hevc_vit.convert import (
    DTYPES,
    TARGET_FORMATS,
    TOLERANCES,
    ConversionInterrupted,
    VerificationFailed,
    convert_checkpoint,
    describe_checkpoint,
)
from hevc_vit.convert.llava_fork import FORK_MODEL_TYPES, TARGET_MODEL_TYPE, convert_llava_fork, is_fork_checkpoint

# for convert and info every OSError is about the input (unreadable SRC, DST refused, a commit in the way)
INVALID_INPUT = (ValueError, OSError, ImportError)

_CONVERT_EPILOG = """\
formats:
  standard  Hugging Face OneVision encoder folder (model_type onevision_encoder or llava_vit)
  packing   reference packing folder (model_type llava_vit_packing)
  hevc_vit  this library's save_pretrained folders (read only)
  legacy    training .pt file without config: keys conv1, ln_pre, transformer.layers.N.*, ln_post, head.*
            (architecture from --preset / --config, else the .json beside the file, checked against
            the tensor shapes; LayerNorm eps 1e-5 kept)
  llava     the reference's LLaVA-NeXT fork (model_type llava_qwen / llava_qwen3, save_pretrained of
            LlavaQwenForCausalLM): always written as hevc_vit_llava (HEVCViTLlavaForConditionalGeneration).
            The tower's config.json comes from --vision-tower, else from SRC's mm_vision_tower when that is
            a folder here; the placeholder ids from --image-token-id / --video-token-id, else SRC's
            image_token_index / video_token_index; with a tokenizer in SRC, the ids of <image> / <video>
            (added to it when missing) and a processor AutoProcessor opens. Only mm_patch_merge_type=flat,
            no resampler, no add_faster_video; the tower's features and every weight are checked before
            DST is moved in.

DST is written in a temporary folder beside it, reloaded and compared with SRC on generated inputs
(two image sizes, a non-square image, a video, a mixed packed batch), and moved into place only when
every case passes. A failure or an interrupt leaves no DST; SRC is only read.

exit status: 0 verified and written, 1 verification failed, 2 invalid input (nothing written),
130/143 interrupted (nothing written)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``info`` to the ``hevc-vit`` command line."""
    _register_convert(subparsers)
    info = subparsers.add_parser(
        "info",
        help="show a checkpoint's format, architecture, parameter count, dtype and file sizes",
        description="Show the format, architecture (and the preset it matches), parameter count, dtype and "
        "file sizes of a checkpoint of any format, and whether its weights load strictly.",
    )
    info.add_argument("path", metavar="PATH", help="checkpoint folder, or legacy .pt / bare .safetensors file")
    _add_arch_options(info)
    info.set_defaults(run=run_info)


def _register_convert(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert a checkpoint of any format into a verified packing or standard folder (a LLaVA fork "
        "checkpoint: into hevc_vit_llava)",
        description="Convert SRC (HF standard or packing folder, or legacy training .pt) into a Hugging Face\n"
        "folder DST (config.json, model.safetensors, preprocessor_config.json), verified before it is\n"
        "moved into place. A LLaVA-NeXT fork checkpoint (llava_qwen) becomes an hevc_vit_llava folder.",
        epilog=_CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint folder, or legacy .pt / bare .safetensors file")
    convert.add_argument("dst", metavar="DST", help="output folder (must not exist unless --force)")
    convert.add_argument(
        "--to",
        choices=TARGET_FORMATS,
        default=None,
        help="format of DST for a vision tower SRC: packing (model_type llava_vit_packing, fused qkv) or standard "
        f"(model_type onevision_encoder, separate q/k/v); default: packing (a LLaVA fork SRC: {TARGET_MODEL_TYPE})",
    )
    _add_arch_options(convert)
    convert.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype of DST's weights; default: as stored in SRC. The verification thresholds depend on it: "
        + "; ".join(
            f"{name} max abs diff <= {TOLERANCES[d].max_abs:g} x max|src|, min/mean cosine >= "
            f"{TOLERANCES[d].min_cos}/{TOLERANCES[d].mean_cos}"
            for name, d in DTYPES.items()
        ),
    )
    convert.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DST folder; it is replaced only after the new checkpoint passes verification",
    )
    convert.add_argument(
        "--device",
        default="cpu",
        help="device for the verification forwards, e.g. cpu, cuda, cuda:1; default: %(default)s",
    )
    llava = convert.add_argument_group(f"LLaVA fork SRC (model_type {' / '.join(FORK_MODEL_TYPES)})")
    llava.add_argument(
        "--vision-tower",
        metavar="PATH",
        help="the tower's checkpoint folder (its config.json); needed when SRC's mm_vision_tower is not a folder here",
    )
    llava.add_argument("--image-token-id", type=int, metavar="ID", help="placeholder id of image features in input_ids")
    llava.add_argument("--video-token-id", type=int, metavar="ID", help="placeholder id of video features in input_ids")
    convert.set_defaults(run=run_convert)


def _add_arch_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        metavar="NAME",
        help=f"architecture of a weights-only SRC (legacy .pt): one of {', '.join(PRESETS)}; "
        "checked against the tensor shapes",
    )
    group.add_argument(
        "--config",
        dest="config_json",
        metavar="JSON",
        help="architecture of a weights-only SRC as a JSON file of hyper-parameters (HEVCViTConfig names, "
        "or head_dim); default: the .json beside SRC (model.json for model.pt) when it exists",
    )


def run_convert(args: argparse.Namespace) -> int:
    """``hevc-vit convert``: 0 verified and written, 1 verification failed, 2 invalid input, 128 + signal
    number when interrupted (DST left as it was unless the signal came once DST was complete)."""

    def convert() -> int:
        try:
            if is_fork_checkpoint(args.src):
                _convert_fork(args)
                return EXIT_OK
            llava_only = [f"--{k.replace('_', '-')}" for k in LLAVA_OPTIONS if getattr(args, k) is not None]
            if llava_only:
                raise ValueError(f"{', '.join(llava_only)} apply to a LLaVA fork SRC; {args.src} is a vision tower")
            convert_checkpoint(
                args.src,
                args.dst,
                to=args.to or "packing",
                preset=args.preset,
                config_json=args.config_json,
                dtype=args.dtype,
                force=args.force,
                device=args.device,
            )
        except VerificationFailed as e:
            print_notice("convert", f"FAIL: {e}; DST {args.dst} left as it was")
            return EXIT_FAILED
        return EXIT_OK

    def interrupted(e: KeyboardInterrupt) -> str:
        if not isinstance(e, ConversionInterrupted):
            return f"DST {args.dst} left as it was"
        outcome = "DST is complete and verified" if e.dst_complete else f"DST {args.dst} left as it was"
        return f"{outcome}, temporary files removed"

    return run_guarded("convert", convert, interrupted=interrupted, input_errors=INVALID_INPUT)


LLAVA_OPTIONS = ("vision_tower", "image_token_id", "video_token_id")


def _convert_fork(args: argparse.Namespace) -> None:
    """A LLaVA fork SRC: the tower-only options refused, the rest passed to :func:`convert_llava_fork`."""
    tower_only = {"--to": args.to, "--preset": args.preset, "--config": args.config_json}
    given = [name for name, value in tower_only.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to a vision tower SRC; {args.src} is a LLaVA fork checkpoint")
    convert_llava_fork(
        args.src,
        args.dst,
        vision_tower=args.vision_tower,
        image_token_id=args.image_token_id,
        video_token_id=args.video_token_id,
        dtype=args.dtype,
        force=args.force,
        device=args.device,
    )


def run_info(args: argparse.Namespace) -> int:
    """``hevc-vit info``: 0 described, 2 invalid input."""

    def info() -> None:
        print(describe_checkpoint(args.path, preset=args.preset, config_json=args.config_json).render())

    return run_guarded("info", info, input_errors=INVALID_INPUT)
