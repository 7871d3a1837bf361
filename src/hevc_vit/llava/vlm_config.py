"""The config of the whole native-resolution LLaVA model (tower + projector + any causal LM), and the one
function that says how many placeholder tokens an item takes: the model and the processor both call it.

Legend: ``n`` items (images / videos), ``t`` frames, ``h`` / ``w`` sides in patches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.llava.projector import PROJECTOR_TYPES, merged_grid_thw
from hevc_vit.packing import GridLike, as_grid_thw

VIDEO_POOL_MODES = ("average", "max", "bilinear")  # the fork's mm_spatial_pool_mode values
SPATIAL_MERGE = 2  # SpatialMergeProjector's and PatchMergerProjector's default merge: 2 x 2 patches per token


def _is_known_projector(kind: Any) -> bool:
    return kind in PROJECTOR_TYPES[:4] or (isinstance(kind, str) and re.fullmatch(r"mlp\d+x_gelu", kind) is not None)


def projected_grid_thw(
    grid_thw: GridLike,
    projector_type: str,
    is_video: Sequence[bool] | torch.Tensor | None = None,
    video_pool_mode: str | None = None,
    video_pool_stride: int = 2,
) -> torch.Tensor:
    """The ``(t, h, w)`` of every item's tokens after the projector (and, for video items, the 2D pool).

    grid_thw: ``(n, 3)`` — the tower's grid per item. Returns ``(n, 3)`` int64 on the CPU; an item takes
    ``t·h·w`` placeholder tokens. ``spatial_merge`` halves ``h`` and ``w``; ``patch_merger`` groups 4
    consecutive tokens (its rows are ``(1, 1, t·h·w/4)``); the per-token projectors keep the grid. Video items
    (``is_video[i]``) are then pooled frame by frame as the reference fork's ``get_2dPool``: ``average`` /
    ``max`` floor ``h / stride`` (``avg_pool2d``), ``bilinear`` rounds up (``ceil``). Raises ``ValueError``
    naming the item when its grid does not fit.
    """
    grid = as_grid_thw(grid_thw)
    if not _is_known_projector(projector_type):
        raise ValueError(f"projector_type={projector_type!r}; expected one of {', '.join(PROJECTOR_TYPES)}")
    if projector_type == "spatial_merge":
        grid = merged_grid_thw(grid, SPATIAL_MERGE)
    elif projector_type == "patch_merger":
        tokens = grid.prod(-1)  # (n,)
        bad = (tokens % SPATIAL_MERGE**2 != 0).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(f"item {i} has {int(tokens[i])} tokens; patch_merger needs a multiple of 4")
        grid = torch.stack([torch.ones_like(tokens), torch.ones_like(tokens), tokens // 4], -1)
    if video_pool_mode is None or is_video is None:
        return grid
    video = torch.as_tensor(is_video, dtype=torch.bool).reshape(-1)
    if len(video) != len(grid):
        raise ValueError(f"is_video has {len(video)} entries; expected one per item of grid_thw, {len(grid)}")
    if not video.any():
        return grid
    if projector_type == "patch_merger":
        raise ValueError("video_pool_mode with projector_type='patch_merger': its tokens have no 2D grid to pool")
    s = video_pool_stride
    if video_pool_mode == "bilinear":
        pooled = (grid[:, 1:] + s - 1) // s  # ceil, as the fork's interpolate size
    else:
        small = video & ((grid[:, 1] < s) | (grid[:, 2] < s))
        if small.any():
            i = int(small.nonzero()[0, 0])
            raise ValueError(f"video item {i} has {tuple(grid[i, 1:].tolist())} tokens per frame after the projector; "
                             f"the {video_pool_mode} pool with stride {s} needs both sides >= {s}")  # fmt: skip
        pooled = grid[:, 1:] // s  # floor, as avg_pool2d / max_pool2d
    out = grid.clone()
    out[video, 1:] = pooled[video]
    return out


class HEVCViTLlavaConfig(PretrainedConfig):
    """LLaVA on the packing HEVC ViT: a vision tower, a projector and any causal language model.

    Args:
        vision_config: the tower's :class:`HEVCViTConfig` (or its dict).
        text_config: any causal LM config (or its dict with ``model_type``); default a Qwen2 config.
        projector_type: the fork's ``mm_projector_type`` (``"mlp2x_gelu"``, default; ``"spatial_merge"``,
            ``"linear"``, ``"patch_merger"``, ``"identity"``, ``mlp{k}x_gelu``), built by ``build_projector``.
        vision_feature_layer: the fork's ``mm_vision_select_layer`` (default -2): the ``hidden_states`` entry
            (``num_hidden_layers + 1`` of them, before the final norm) the projector reads; a list concatenates.
        image_token_id / video_token_id: the placeholder ids (defaults: the two last ids of the vocabulary).
        video_pool_mode: ``None`` (default, no pool), ``"average"``, ``"max"`` or ``"bilinear"``: the fork's
            ``get_2dPool`` (``mm_spatial_pool_mode``) on video items, frame by frame, after the projector.
        video_pool_stride: the pool's stride (default 2, the fork's flat path).
        tie_word_embeddings: tie ``lm_head`` to the input embeddings (default: the text config's).
    """

    model_type = "hevc_vit_llava"
    sub_configs = {"text_config": AutoConfig, "vision_config": HEVCViTConfig}

    def __init__(
        self,
        vision_config: HEVCViTConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projector_type: str = "mlp2x_gelu",
        vision_feature_layer: int | list[int] = -2,
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        video_pool_mode: str | None = None,
        video_pool_stride: int = 2,
        tie_word_embeddings: bool | None = None,
        **kwargs: Any,
    ):
        if isinstance(vision_config, dict):
            vision_config = HEVCViTConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config if vision_config is not None else HEVCViTConfig()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "qwen2"), **text_config)
        self.text_config = text_config if text_config is not None else AutoConfig.for_model("qwen2")
        if not _is_known_projector(projector_type):
            raise ValueError(f"projector_type={projector_type!r}; expected one of {', '.join(PROJECTOR_TYPES)}")
        if video_pool_mode is not None and video_pool_mode not in VIDEO_POOL_MODES:
            raise ValueError(f"video_pool_mode={video_pool_mode!r}; expected None or one of {VIDEO_POOL_MODES}")
        if isinstance(video_pool_stride, bool) or not isinstance(video_pool_stride, int) or video_pool_stride < 1:
            raise ValueError(f"video_pool_stride={video_pool_stride!r}; expected a positive int")
        layers = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
        n = self.vision_config.num_hidden_layers + 1
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
                raise ValueError(
                    f"vision_feature_layer={vision_feature_layer!r}; expected ints indexing the {n} hidden_states "
                    f"(num_hidden_layers + 1), from {-n} to {n - 1}"
                )
        self.projector_type = projector_type
        self.vision_feature_layer = list(vision_feature_layer) if len(layers) > 1 else layers[0]
        vocab = self.text_config.vocab_size
        self.image_token_id = vocab - 2 if image_token_id is None else image_token_id
        self.video_token_id = vocab - 1 if video_token_id is None else video_token_id
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise ValueError(f"{name}={value!r}; expected an id of the text vocabulary, in [0, {vocab})")
        if self.image_token_id == self.video_token_id:
            raise ValueError(f"image_token_id and video_token_id are both {self.image_token_id}; expected two ids")
        self.video_pool_mode = video_pool_mode
        self.video_pool_stride = video_pool_stride
        if tie_word_embeddings is None:
            tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.text_config.tie_word_embeddings = tie_word_embeddings  # transformers 4 reads the text config's
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def vision_feature_layers(self) -> list[int]:
        """``vision_feature_layer`` as a list."""
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    @property
    def mm_hidden_size(self) -> int:
        """Width of the tower features the projector reads: the tower's width times the layers selected."""
        return self.vision_config.hidden_size * len(self.vision_feature_layers)

    def projector_args(self) -> dict[str, Any]:
        """What ``build_projector`` reads, in the fork's names."""
        return {
            "mm_projector_type": self.projector_type,
            "mm_hidden_size": self.mm_hidden_size,
            "hidden_size": self.text_config.hidden_size,
        }

    def tokens_per_item(self, grid_thw: GridLike, is_video: Sequence[bool] | torch.Tensor | None = None) -> list[int]:
        """Placeholder tokens of every item: the projector's (and video pool's) output length for its grid."""
        grid = projected_grid_thw(grid_thw, self.projector_type, is_video, self.video_pool_mode, self.video_pool_stride)
        return grid.prod(-1).tolist()

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict, with the two sub-configs as dicts (both major versions write them so)."""
        out = super().to_dict()
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            out[name] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return out
