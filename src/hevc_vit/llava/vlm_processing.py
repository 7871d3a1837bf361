"""The processor of the native-resolution LLaVA model: images and videos at their own sizes -> packed patches,
text with every ``<image>`` / ``<video>`` expanded to exactly the tokens its item takes.

Legend: ``T`` packed patches, ``n`` items, ``p`` patch size, ``C`` channels, ``B`` batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessorMixin

from hevc_vit.llava.vlm_config import SPATIAL_MERGE, projected_grid_thw
from hevc_vit.processing.image_processing import as_pil_image

URL_TIMEOUT = 60.0  # seconds an http(s) image may take to arrive (transformers' load_image waits forever on None)


def _is_frame(x: Any) -> bool:
    """One image / frame: a PIL image, or a 2-D / 3-D array or tensor."""
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _flat_images(images: Any) -> list[Any]:
    """One image, a list, or a list per sample -> one flat list of images."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple, np.ndarray, torch.Tensor)) or _is_frame(images):
        return [images]  # one image; a str (a path) is not iterated letter by letter, as_pil_image names it
    out = []
    for item in images:
        out += _flat_images(item) if isinstance(item, (list, tuple)) else [item]
    return out


def _is_video(x: Any) -> bool:
    """One video: a list of frames or a ``(t, ...)`` 4-D array / tensor."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 4
    return isinstance(x, (list, tuple)) and bool(x) and all(_is_frame(f) for f in x)


def _flat_videos(videos: Any) -> list[list[Any]]:
    """One video (a list of frames, or a ``(t, ...)`` array / tensor), a list of them, or a list per sample ->
    one flat list of videos, each a list of frames."""
    if videos is None:
        return []
    if isinstance(videos, str):  # a path (a chat's video entry): iterating it letter by letter never ends
        raise ValueError(f"a video is the str {videos!r:.80}; expected its frames (a list of images or a "
                         f"(t, H, W, C) array): decode it first (hevc_vit.media.video.read_video)")  # fmt: skip
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4:
        return [list(videos)]
    if isinstance(videos, (list, tuple)) and videos and all(_is_frame(f) for f in videos):
        return [list(videos)]
    out = []
    for item in videos:
        out += _flat_videos(item)
    return out


def _load(image: Any, what: str, timeout: float | None) -> Any:
    """A path or http(s) URL (a chat's ``{"type": "image", "url" | "path": ...}``, as transformers' own processors
    take them) -> a PIL image by transformers' ``load_image`` (EXIF orientation applied, RGB, as the pipeline
    loads); anything else is returned as it is."""
    if not isinstance(image, str):
        return image
    try:
        return load_image(image, timeout=timeout)
    except Exception as error:  # httpx / requests / PIL / base64 errors: say which item and what it was
        raise ValueError(f"{what} is a str; expected a PIL image, a numpy array or a torch tensor, or the path or "
                         f"http(s) URL of an image: {image!r:.120} could not be read ({error})") from error  # fmt: skip


def _as_positions(value: Any, what: str) -> torch.Tensor:
    """``(N, 3)`` integer positions, as the model takes them (a float or reshaped input is refused, not cast)."""
    positions = torch.as_tensor(value)
    if positions.dim() != 2 or positions.shape[-1] != 3:
        raise ValueError(f"{what} has shape {tuple(positions.shape)}; expected (N, 3), one (t, h, w) per patch")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"{what} has dtype {positions.dtype}; expected integers")
    return positions


class HEVCViTLlavaProcessor(ProcessorMixin):
    """Image processor (:class:`~hevc_vit.processing.image_processing.HEVCViTImageProcessor`) + any tokenizer.

    ``__call__(images=..., text=..., videos=..., patch_positions=...)`` returns ``input_ids``,
    ``attention_mask``, ``pixel_values (T, C·p·p)`` (all items packed, in the order of their placeholders),
    ``image_grid_thw (n, 3)`` and, when given, ``patch_positions (T, 3)``. Each ``<image>`` / ``<video>`` becomes
    ``tokens(item)`` placeholder tokens — :func:`~hevc_vit.llava.vlm_config.projected_grid_thw` with the
    model's ``projector_type``, ``video_pool_mode`` and ``video_pool_stride`` (saved with the processor),
    the function the model checks its input with.
    """

    attributes = ["image_processor", "tokenizer"]  # transformers 4 reads these; 5 reads __init__'s signature
    if int(transformers.__version__.split(".")[0]) < 5:  # 5 warns at every load of a processor naming them
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        projector_type: str = "mlp2x_gelu",
        video_pool_mode: str | None = None,
        video_pool_stride: int = 2,
        **kwargs: Any,
    ):
        self.image_token, self.video_token = image_token, video_token
        self.projector_type = projector_type
        self.video_pool_mode, self.video_pool_stride = video_pool_mode, video_pool_stride
        projected_grid_thw([[1, 8, 8]], projector_type, [True], video_pool_mode, video_pool_stride)  # validates
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        for token in (image_token, video_token):
            if tokenizer is None:
                continue
            ids = tokenizer.encode(token, add_special_tokens=False)
            # one id that is the unknown word's would expand every placeholder into <unk>: the images never reach
            # the model, with no error
            unknown = len(ids) == 1 and tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id
            if len(ids) != 1 or unknown:
                raise ValueError(
                    f"the tokenizer encodes {token!r} as {ids}{' (its unknown token)' if unknown else ''}; expected "
                    f"one token of its own (add it: tokenizer.add_special_tokens({{'additional_special_tokens': "
                    f"[{token!r}]}}) and resize the model's embeddings)"
                )

    @classmethod
    def from_model_config(
        cls, image_processor: Any, tokenizer: Any, config: Any, **kwargs: Any
    ) -> HEVCViTLlavaProcessor:
        """A processor whose token counts follow ``config`` (:class:`HEVCViTLlavaConfig`)."""
        settings = {name: getattr(config, name) for name in ("projector_type", "video_pool_mode", "video_pool_stride")}
        return cls(image_processor, tokenizer, **settings, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.video_token)

    def tokens_per_item(self, image_grid_thw: Any, is_video: Sequence[bool] | None = None) -> list[int]:
        """Placeholder tokens of every item of ``image_grid_thw (n, 3)``."""
        grid = projected_grid_thw(
            image_grid_thw, self.projector_type, is_video, self.video_pool_mode, self.video_pool_stride
        )
        return grid.prod(-1).tolist()

    def native_processor(self) -> Any:
        """The image processor's native-resolution rule; for ``spatial_merge`` and ``patch_merger`` on blocks of
        ``2 x 2`` patches (every side an even number of patches, the patch bounds divided by 4), so every item
        merges (``patch_merger`` groups 4 tokens: an item's ``t·h·w`` must be a multiple of 4)."""
        ip = self.image_processor
        if self.projector_type not in ("spatial_merge", "patch_merger"):
            return ip.native_processor()
        m = SPATIAL_MERGE
        return ip.native_processor(patch_size=ip.patch_size * m, min_tokens=max(1, -(-ip.min_tokens // m**2)),
                                   max_tokens=max(1, ip.max_tokens // m**2),
                                   max_video_tokens=max(1, ip.max_video_tokens // m**2))  # fmt: skip

    def _patches(
        self, frames: Any, what: str, timeout: float | None = URL_TIMEOUT
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image (``frames`` one image, or its path / URL) or video (a list of frames) ->
        ``(t·h·w, C·p·p)``, ``(t, h, w)``."""
        if isinstance(frames, list):
            if not frames:
                raise ValueError(f"{what} has no frames; expected at least one")
            pil: Any = [as_pil_image(frame, f"{what} frame {k}") for k, frame in enumerate(frames)]
        else:
            pil = as_pil_image(_load(frames, what, timeout), what)
        try:
            return self.native_processor().patchify(pil, self.image_processor.patch_size)
        except ValueError as error:  # say which item (the image processor sees one)
            raise ValueError(f"{what}: {error}") from error

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        patch_positions: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_tensors: str | None = "pt",
        timeout: float | None = URL_TIMEOUT,
        **kwargs: Any,
    ) -> BatchFeature:
        """images: one image or a list (or a list per sample; PIL, numpy, torch, or a path or http(s) URL, read
        with transformers' ``load_image`` waiting at most ``timeout`` seconds). videos: one video (a list of
        frames or a ``(t, H, W, C)`` / ``(t, C, H, W)`` array) or a list of them. text: one string or a batch;
        the k-th ``<image>`` of the batch (row by row) is ``images[k]``, the j-th ``<video>`` is ``videos[j]``.
        patch_positions: explicit ``(t, h, w)`` positions: ``(T, 3)`` for all items in placeholder order, or one
        ``(N_i, 3)`` per item; without any item ``pixel_values`` is ``(0, C·p·p)`` and ``image_grid_thw``
        ``(0, 3)`` (the model reads them as none). Other keywords go to the tokenizer (``padding`` defaults to
        True for a batch: one text needs none, and a tokenizer without a pad token could not pad it)."""
        if kwargs.pop("audio", None) is not None:  # transformers 4's apply_chat_template passes audio=None
            raise ValueError("audio was given; this processor takes images, videos and text only")
        if text is None:
            raise ValueError("text is None; expected a string or a list of strings holding the placeholders")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text is {text!r:.80}; expected a string or a non-empty list of strings")
        pattern = f"({re.escape(self.image_token)}|{re.escape(self.video_token)})"
        self._check_per_sample(images, texts, self.image_token, "images", lambda item: True)
        self._check_per_sample(videos, texts, self.video_token, "videos", _is_video)
        images, videos = _flat_images(images), _flat_videos(videos)
        found = [m for t in texts for m in re.findall(pattern, t)]
        counts = {"image": found.count(self.image_token), "video": found.count(self.video_token)}
        for kind, items in (("image", images), ("video", videos)):
            if counts[kind] != len(items):
                token = self.image_token if kind == "image" else self.video_token
                raise ValueError(f"text holds {counts[kind]} {token} placeholders and {kind}s has {len(items)} "
                                 f"{kind}s; expected one {token} per {kind}")  # fmt: skip
        patches, grids, is_video = [], [], []
        pending = {"image": iter(range(len(images))), "video": iter(range(len(videos)))}
        for token in found:
            video = token == self.video_token
            i = next(pending["video" if video else "image"])
            x, thw = self._patches(videos[i] if video else images[i], f"{'video' if video else 'image'} {i}", timeout)
            patches.append(x)
            grids.append(torch.tensor(thw))
            is_video.append(video)
        data: dict[str, Any] = {}
        expanded = texts
        if grids:
            grid = torch.stack(grids).long()  # (n, 3)
            tokens = iter(self.tokens_per_item(grid, is_video))
            expanded = [
                re.sub(pattern, lambda m: m.group(0) * next(tokens), t) for t in texts
            ]  # in placeholder order, as the items
            data["pixel_values"] = torch.cat(patches)  # (T, C·p·p)
            data["image_grid_thw"] = grid
            if patch_positions is not None:
                data["patch_positions"] = self._positions(patch_positions, grid)
        elif patch_positions is not None:
            raise ValueError("patch_positions was given without any image or video")
        else:  # no item: empty pixels, so that transformers' collator can batch this with a multimodal sample
            ip = self.image_processor
            channels = len(ip.image_mean) if isinstance(ip.image_mean, (list, tuple)) else 3
            data["pixel_values"] = torch.zeros(0, channels * ip.patch_size**2)  # (0, C·p·p)
            data["image_grid_thw"] = torch.zeros(0, 3, dtype=torch.long)  # (0, 3)
        kwargs.setdefault("padding", len(texts) > 1 or kwargs.get("pad_to_multiple_of") is not None)
        kwargs.setdefault("return_token_type_ids", False)  # the model takes none
        encoded = self.tokenizer(expanded, return_tensors=return_tensors, **kwargs)
        if grids:
            wanted = [len(re.findall(pattern, t)) for t in expanded]  # placeholder tokens per row, as expanded
            self._check_runs(encoded["input_ids"], wanted)
        data.update(encoded)
        return BatchFeature(data=data, tensor_type=None if return_tensors in (None, "pt") else return_tensors)

    @staticmethod
    def _check_per_sample(items: Any, texts: list[str], token: str, what: str, is_item: Any) -> None:
        """With items as one list per sample (every element of every list an item: ``is_item``), sample ``b``'s
        list must hold its text's ``token`` count (the items are matched to placeholders in flat order: a list
        on the wrong sample would go to another sample's placeholder)."""
        if not isinstance(items, (list, tuple)) or len(items) != len(texts) or len(texts) < 2:
            return
        if not all(isinstance(sample, (list, tuple)) and all(map(is_item, sample)) for sample in items):
            return
        for b, (sample, t) in enumerate(zip(items, texts)):
            count = t.count(token)
            if len(sample) != count:
                raise ValueError(f"{what}[{b}] holds {len(sample)} {what} and text[{b}] {count} {token} "
                                 f"placeholders; expected one per placeholder of its sample")  # fmt: skip

    def _check_runs(self, input_ids: Any, wanted: list[int]) -> None:
        """Every row keeps all of its placeholder tokens after tokenization (truncation may not cut a run)."""
        ids = {self.image_token_id, self.video_token_id}
        for b, (row, want) in enumerate(zip(input_ids, wanted)):
            found = sum(int(i) in ids for i in np.asarray(row).reshape(-1).tolist())
            if found != want:
                raise ValueError(f"text[{b}] holds {found} placeholder tokens after tokenization; its items take "
                                 f"{want} (truncation cut a run: raise max_length or shorten the text)")  # fmt: skip

    @staticmethod
    def _positions(patch_positions: Any, grid: torch.Tensor) -> torch.Tensor:
        sizes = grid.prod(-1).tolist()
        if isinstance(patch_positions, (list, tuple)):
            if len(patch_positions) != len(sizes):
                raise ValueError(f"patch_positions has {len(patch_positions)} entries; expected one per item, "
                                 f"{len(sizes)}")  # fmt: skip
            parts = [_as_positions(p, f"patch_positions[{i}]") for i, p in enumerate(patch_positions)]
            for i, (part, size) in enumerate(zip(parts, sizes)):
                if len(part) != size:
                    raise ValueError(f"patch_positions[{i}] has {len(part)} rows; item {i} has {size} patches")
            positions = torch.cat(parts)
        else:
            positions = _as_positions(patch_positions, "patch_positions")
        if len(positions) != sum(sizes):
            raise ValueError(f"patch_positions has {len(positions)} rows; the items hold {sum(sizes)} patches")
        return positions.long()  # (T, 3)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs):
        """The generated ids as text (what ``pipeline("image-text-to-text")`` decodes with)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + ["pixel_values", "image_grid_thw", "patch_positions"]
        return list(dict.fromkeys(names))
