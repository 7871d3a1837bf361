"""The processor of a converted LLaVA fork folder: what ``AutoProcessor.from_pretrained(DST)`` opens.

The fork has no processor of its own: its users write ``<image>`` in the prompt, ``tokenizer_image_token``
splits the prompt on that text and puts one ``-200`` between the tokenized chunks, and the model swaps the
``-200`` for the image's features. The converted model needs a real id repeated once per feature
(``image_token_id``), and :class:`~hevc_vit.llava.vlm_processing.HEVCViTLlavaProcessor` expands one placeholder
token of the tokenizer. So the placeholder text stays ``<image>`` (``<video>`` for videos — the transformers
convention; the fork marks a video with ``<image>`` and ``modalities=["video"]``), and ``<image>`` must be one
token whose id is ``image_token_id``:

* the tokenizer has ``<image>`` as one token: ``image_token_id`` is its id (a different id given is refused);
* it has not (the fork's usual Qwen tokenizer): ``<image>`` is added as a special token (never split, as the
  fork's ``prompt.split("<image>")``), taking the next id, ``len(tokenizer)``, which must be under the text
  model's ``vocab_size`` (Qwen's embedding has spare rows); a different id given is refused. The placeholder's
  embedding row is never read (every placeholder is replaced by a feature), so any free row serves.

The text around each placeholder then tokenizes as the fork's chunks do (a special token splits the text
there), so the ids are the fork's with each ``-200`` replaced by a run of ``image_token_id``.

The image processor (:class:`~hevc_vit.processing.image_processing.HEVCViTImageProcessor`) takes the tower's
normalisation (``image_mean`` / ``image_std`` / ``resample`` of its ``preprocessor_config.json``), its
``patch_size``, and the bounds of the fork's own native-resolution path (``process_native_image``:
``smart_resize`` with ``min_pixels`` under one patch and ``max_pixels`` 1600², i.e. 1 to 1600²/p² patches,
the sides rounded to the nearest patch); the projector's merge constraint (``spatial_merge``: sides in
2-patch blocks) comes from ``projector_type``, saved with the processor (``from_model_config``'s settings).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from tokenizers import AddedToken

from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.files import PREPROCESSOR_NAME
from hevc_vit.llava.vlm_processing import HEVCViTLlavaProcessor
from hevc_vit.processing.image_processing import HEVCViTImageProcessor

PLACEHOLDERS = {"image_token_id": "<image>", "video_token_id": "<video>"}  # the config field -> its text
FORK_NATIVE_MAX_PIXELS = 1600 * 1600  # llava/mm_utils.py smart_resize's default, as process_native_image calls it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# settings of the tower's preprocessor_config.json the image processor keeps (the normalisation and the filter)
TOWER_SETTINGS = ("image_mean", "image_std", "resample", "rescale_factor", "do_rescale", "do_normalize")


def read_tokenizer(src: Path) -> Any | None:
    """SRC's tokenizer (``AutoTokenizer``), or None when SRC holds no tokenizer files."""
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(src)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"SRC's tokenizer files do not load with AutoTokenizer: {e}") from None


def placeholder_ids(
    tokenizer: Any | None,
    fork: dict[str, Any],
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int | None, int | None]:
    """``(image_token_id, video_token_id)`` for ``tokenizer`` (see the module docstring), adding ``<image>`` /
    ``<video>`` to it when missing. The ids asked for: those given, else the fork config's ``image_token_index``
    / ``video_token_index``, else the tokenizer's. Raises ``ValueError`` naming an id asked for that is not
    the one ``<image>`` / ``<video>`` tokenizes to, or an added id outside the fork's ``vocab_size``.
    Without a tokenizer (None) the ids given are returned as they are (``llava_config_dict`` checks them)."""
    if tokenizer is None:
        return image_token_id, video_token_id
    given = {"image_token_id": image_token_id, "video_token_id": video_token_id}
    given = {k: v if v is not None else fork.get(k.replace("_id", "_index")) for k, v in given.items()}
    vocab_size = fork.get("vocab_size", 0)
    ids = {}
    for name, token in PLACEHOLDERS.items():
        found = tokenizer.encode(token, add_special_tokens=False)
        missing = len(found) != 1 or tokenizer.decode(found).strip() != token  # not one id, or an unknown word
        tid = len(tokenizer) if missing else found[0]
        where = (
            f"the tokenizer has no {token} token, so the processor adds it (the fork's prompts write {token}) "
            f"as the next id, {tid}"
            if missing
            else f"the tokenizer's {token} is id {tid}"
        )
        if given.get(name) is not None and given[name] != tid:
            raise ValueError(f"{name}={given[name]}; {where}: expected {tid}, or leave --{name.replace('_', '-')} out")
        if missing:
            if tid >= vocab_size:
                raise ValueError(f"{where}, but the text model's vocab_size is {vocab_size}: no embedding row for it; "
                                 f"expected a tokenizer shorter than the vocabulary, or one with {token}")  # fmt: skip
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
            log(f"{where}")
        ids[name] = tid
    return ids["image_token_id"], ids["video_token_id"]


def fork_image_processor(tower_dir: Path, vision_config: HEVCViTConfig) -> HEVCViTImageProcessor:
    """The tower's normalisation and patch size, the fork's native-resolution bounds (module docstring)."""
    path = tower_dir / PREPROCESSOR_NAME
    tower = json.loads(path.read_text()) if path.is_file() else {}
    settings = {name: tower[name] for name in TOWER_SETTINGS if name in tower}
    p = vision_config.patch_size
    return HEVCViTImageProcessor(patch_size=p, min_tokens=1, max_tokens=FORK_NATIVE_MAX_PIXELS // p**2, **settings)


def write_processor(
    folder: Path,
    tokenizer: Any | None,
    tower_dir: Path,
    vision_config: HEVCViTConfig,
    config: dict[str, Any],
    log: Callable[[str], None] = print,
) -> None:
    """Save the :class:`HEVCViTLlavaProcessor` of ``config`` (the converted ``config.json``) in ``folder``:
    ``processor_config.json``, ``preprocessor_config.json`` (:func:`fork_image_processor`), the tokenizer's
    files and SRC's chat template. Without a tokenizer (None) nothing is written: a processor needs one."""
    if tokenizer is None:
        log("SRC has no tokenizer files: no processor written (AutoProcessor needs the tokenizer)")
        return
    processor = HEVCViTLlavaProcessor(
        fork_image_processor(tower_dir, vision_config),
        tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None),
        projector_type=config["projector_type"],
        video_pool_mode=config["video_pool_mode"],
        video_pool_stride=config["video_pool_stride"] or 2,  # unused without a pool; the processor wants an int
    )
    processor.save_pretrained(folder)


def check_processor(folder: Path, config: dict[str, Any], written: bool = True) -> list[str]:
    """What ``AutoProcessor.from_pretrained(folder)`` gives that disagrees with ``config`` (empty: none);
    ``written=False``: no processor was written, nothing to check."""
    if not written:
        return []
    processor = transformers.AutoProcessor.from_pretrained(folder)
    if not isinstance(processor, HEVCViTLlavaProcessor):
        return [f"AutoProcessor: {type(processor).__name__}, expected {HEVCViTLlavaProcessor.__name__}"]
    return [
        f"processor {name}={getattr(processor, name)!r}; config.json {config[name]!r}"
        for name in ("image_token_id", "video_token_id", "projector_type", "video_pool_mode")
        if getattr(processor, name) != config[name]
    ]
