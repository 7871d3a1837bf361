"""The part both LLaVA-NeXT vision towers share: loading and freezing, feature selection, the size
properties, the dummy forward for ranks without images (see :mod:`hevc_vit.llava.towers`).

Legend: ``D`` width, ``p`` patch, ``C`` channels.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.llava.config import (
    SELECT_FEATURES,
    SPATIAL_MERGE_PROJECTOR,
    STACK_AS_CLIP_SETTING,
    default_image_processor,
    llava_arg,
    load_image_processor,
    read_tower_config,
    select_layer_indices,
)
from hevc_vit.llava.inputs import ImagesInput, TowerInput, resolve_tower_input
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel

logger = logging.getLogger(__name__)


class HEVCViTVisionTowerBase(nn.Module):
    """What both towers share: loading, freezing, feature selection, the size properties, the dummy input.

    Args:
        vision_tower: checkpoint folder (or Hub name) of any format ``hevc_vit.checkpoints`` reads.
        args: the LLaVA config / arguments (attributes or a dict):
            ``mm_vision_select_layer`` (default -1, LLaVA-NeXT's) — index into ``hidden_states``;
            ``mm_vision_select_feature`` (default ``"patch"``) — one of :data:`SELECT_FEATURES`;
            ``mm_projector_type`` (default ``"patch_merger"``) — ``"spatial_merge"`` divides the patch counts;
            ``unfreeze_mm_vision_tower`` / ``mm_tunable_parts`` — with ``delay_load``, load the weights anyway
            when the first is set or the second contains ``"mm_vision_tower"``.
            ``hevc_vit_stack_as_clip`` (default 0: off) — opt-in: a ``(k, C, H, W)`` stack of exactly this many
            square frames with nothing saying otherwise is one clip (the reference fork's tower does this
            for 8 frames unasked; 8 square images would silently become a video, hence off by default).
        delay_load: read only the config now; :meth:`load_model` reads the weights later.
        vision_tower_cfg: the same as ``args`` (the keyword the current LLaVA fork's builder passes).
    """

    model_class: type[HEVCViTModel] | type[HEVCViTPackingModel]

    def __init__(
        self,
        vision_tower: str | os.PathLike,
        args: Any = None,
        delay_load: bool = False,
        *,
        vision_tower_cfg: Any = None,
        model: HEVCViTModel | HEVCViTPackingModel | None = None,
    ):
        super().__init__()
        if args is not None and vision_tower_cfg is not None and args is not vision_tower_cfg:
            raise ValueError("pass the LLaVA config once, as args or as vision_tower_cfg (the current fork's name)")
        args = args if args is not None else vision_tower_cfg if vision_tower_cfg is not None else {}
        self.is_loaded = False
        self.vision_tower_name = os.fspath(vision_tower)
        self.select_layer = int(llava_arg(args, "mm_vision_select_layer", -1))
        self.select_feature = llava_arg(args, "mm_vision_select_feature", "patch") or "patch"
        self.projector_type = llava_arg(args, "mm_projector_type", "patch_merger") or "patch_merger"
        self.stack_as_clip = int(llava_arg(args, STACK_AS_CLIP_SETTING, 0) or 0)
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r}; expected one of {list(SELECT_FEATURES)}"
            )
        self.cfg_only: HEVCViTConfig | None = None
        self.image_processor: Any = None  # a transformers CLIP image processor once loaded
        self.vision_tower: HEVCViTModel | HEVCViTPackingModel | None = None

        tunable_parts = llava_arg(args, "mm_tunable_parts", None) or ()
        if model is not None:  # an encoder already in memory (see from_model): used as it is, not frozen
            if not isinstance(model, self.model_class):
                raise ValueError(
                    f"model is a {type(model).__name__}; {type(self).__name__} runs a {self.model_class.__name__}"
                )
            self.vision_tower = model
            in_folder = os.path.isdir(self.vision_tower_name)
            self.image_processor = (
                load_image_processor(self.vision_tower_name, model.config)
                if in_folder
                else default_image_processor(model.config)
            )
            self.is_loaded = True
        elif not delay_load:
            logger.info("Loading vision tower %s (%s)", self.vision_tower_name, type(self).__name__)
            self.load_model()
        elif llava_arg(args, "unfreeze_mm_vision_tower", False):
            logger.info("unfreeze_mm_vision_tower is set: loading the weights of %s now", self.vision_tower_name)
            self.load_model()
        elif "mm_vision_tower" in tunable_parts:
            logger.info("mm_tunable_parts has mm_vision_tower: loading the weights of %s now", self.vision_tower_name)
            self.load_model()
        else:
            self.cfg_only = read_tower_config(self.vision_tower_name)
        # fail at construction, not at the first batch, when the selection does not fit the model
        select_layer_indices(self.select_feature, self.select_layer, self.config.num_hidden_layers + 1)
        self.register_load_state_dict_pre_hook(_load_before_weights_arrive)

    @classmethod
    def from_model(cls, model: HEVCViTModel | HEVCViTPackingModel, args: Any = None) -> HEVCViTVisionTowerBase:
        """A tower around an encoder already in memory (being trained, or built from a preset), without
        reading a checkpoint; its weights keep their ``requires_grad`` as they are."""
        name = getattr(model.config, "name_or_path", "") or f"<{type(model).__name__} in memory>"
        return cls(name, args if args is not None else {}, model=model)

    # -- loading -------------------------------------------------------------------------------------

    def load_model(self, device_map: str | torch.device | dict | None = None) -> None:
        """Load the weights and the image processor, and freeze the weights (``requires_grad_(False)``).

        The weights take torch's default dtype — float32, unless the tower is built inside a model being
        loaded in another dtype (``from_pretrained(..., dtype=torch.bfloat16)`` sets the default while it
        builds), so the tower follows the model it sits in. Idempotent: a second call logs a warning and
        returns without reading anything.
        """
        if self.is_loaded:
            logger.warning("%s is already loaded; load_model() called again, skipping", self.vision_tower_name)
            return
        self.vision_tower = self.model_class.from_pretrained(
            self.vision_tower_name, device_map=device_map, dtype=torch.get_default_dtype()
        )
        self.vision_tower.requires_grad_(False)
        self.image_processor = load_image_processor(self.vision_tower_name, self.vision_tower.config)
        self.cfg_only = None
        self.is_loaded = True

    def _require_loaded(self) -> nn.Module:
        if not self.is_loaded:
            raise RuntimeError(
                f"vision tower {self.vision_tower_name} was built with delay_load and its weights are not loaded; "
                f"call load_model() first"
            )
        return self.vision_tower

    # -- features ------------------------------------------------------------------------------------

    def feature_select(self, image_forward_outs: BaseModelOutputWithPooling) -> torch.Tensor:
        """The selected ``hidden_states`` entries, concatenated on the last axis.

        Works on packed ``(T, D)`` and batched ``(B, N, D)`` states alike; returns ``(..., D')`` with
        ``D' = hidden_size`` (``D`` times 1, 4 or 5). Raises ``ValueError`` for an unknown select feature.
        """
        hidden_states = image_forward_outs.hidden_states
        layers = select_layer_indices(self.select_feature, self.select_layer, len(hidden_states))
        if len(layers) == 1:
            return hidden_states[layers[0]]
        return torch.cat([hidden_states[i] for i in layers], dim=-1)  # (..., len(layers)·D)

    def resolve(
        self,
        images: ImagesInput,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> TowerInput:
        """What a call means: which frames form which item, with which positions (see
        :mod:`hevc_vit.llava.inputs`); validates the input and raises ``ValueError`` naming what is wrong."""
        return resolve_tower_input(
            images,
            num_channels=self.config.num_channels,
            patch_size=self.config.patch_size,
            grid_thw=grid_thw,
            patch_positions=patch_positions,
            num_frames=num_frames,
            stack_as_clip=self.stack_as_clip,
        )

    def forward(
        self,
        images: ImagesInput,
        return_spatial_dims: bool = False,
        grid_thw: Any = None,
        patch_positions: Any = None,
        num_frames: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor] | tuple[Any, Any, Any]:
        """Features of a batch or a list of images and videos, in the input's dtype, on the tower's device.

        images: ``(B, C, H, W)`` -> ``(B, h·w, D')``; ``(B, C, T, H, W)`` -> ``(B, T·h·w, D')``; a list ->
            a list with one tensor per element: image ``(C, H, W)`` -> ``(h·w, D')``, image stack
            ``(n, C, H, W)`` -> ``(n, h·w, D')``, video ``(C, T, H, W)`` -> ``(T·h·w, D')``. ``H`` and ``W``
            are multiples of ``p``; ``h = H/p``, ``w = W/p``; ``D' = hidden_size``. A stack whose frames form
            one clip (see below) still comes back as ``(B, h·w, D')``, frame by frame, as LLaVA splits it.
        return_spatial_dims: also return ``h`` and ``w`` in patches: ``(features, h, w)`` with ints when every
            element has the same ``(h, w)``, else with lists of per-element ints (``h[i]``, ``w[i]``).
        grid_thw: optional ``(n, 3)`` int rows ``(t, h, w)``; checked against the pixels (``ValueError``
            naming both when they disagree); rows with ``t > 1`` group a stack's frames into clips.
        patch_positions: optional explicit ``(t, h, w)`` RoPE positions — a per-sample list of ``(1, M, 3)`` /
            ``(M, 3)`` int tensors (or ``[None]``), as the current LLaVA fork passes them. For a stack of ``B``
            frames: ``M = h·w`` gives every image those positions; ``M = B·h·w`` makes the stack one clip
            (e.g. 8 frames spread over a 64-frame context, t = 0, 9, ..., 63); per-sample entries of
            ``k·h·w`` take the next ``k`` frames each. For a list: one entry per element.
        num_frames: the stack is consecutive clips of this many frames (the current fork's keyword).
        """
        call = dict(grid_thw=grid_thw, patch_positions=patch_positions, num_frames=num_frames)
        features, layout, _ = self.forward_with_outputs(images, **call)
        if return_spatial_dims:
            h, w = layout.spatial_dims()
            return features, h, w
        return features

    # -- distributed safety --------------------------------------------------------------------------

    @property
    def dummy_input(self) -> torch.Tensor:
        """``(1, C, 2p, 2p)`` zeros in the tower's dtype, on its device: the smallest image a 2x2 spatial
        merge still accepts."""
        side = 2 * self.config.patch_size
        return torch.zeros(1, self.config.num_channels, side, side, dtype=self.dtype, device=self.device)

    def dummy_forward(self) -> torch.Tensor:
        """Zero features ``(1, 4, hidden_size)`` that depend on every weight of the encoder.

        For a rank with no images: it runs :attr:`dummy_input` through the same forward as real images,
        so every module runs (ZeRO-3 / FSDP gather the same parameters on every rank), and the result is
        tied with weight zero to the last hidden state and the pooled output, so after
        ``loss + tower.dummy_forward().sum()`` every trainable parameter receives a (zero) gradient.
        The loss value does not change.
        """
        features, _, outputs = self.forward_with_outputs(self.dummy_input)
        anchor = features.new_zeros(())
        for out in outputs if isinstance(outputs, list) else [outputs]:
            anchor = anchor + out.last_hidden_state.sum()
            if out.pooler_output is not None:
                anchor = anchor + out.pooler_output.sum()
        return features * 0 + anchor * 0  # (1, 4, hidden_size), all zeros

    # -- properties ----------------------------------------------------------------------------------

    @property
    def dummy_feature(self) -> torch.Tensor:
        """``(1, hidden_size)`` zeros in the tower's dtype, on its device."""
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (float32 while the weights are not loaded)."""
        return self.vision_tower.dtype if self.is_loaded else torch.float32

    @property
    def device(self) -> torch.device:
        """The weights' device (the CPU while the weights are not loaded)."""
        return self.vision_tower.device if self.is_loaded else torch.device("cpu")

    @property
    def config(self) -> HEVCViTConfig:
        """The encoder config: the loaded model's, or the one read alone under ``delay_load``."""
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        """Width of the features: ``D`` times 1 (``patch``), 4 (``slicefour_*``) or 5 (``slice_m25811_f6_*``)."""
        return self.config.hidden_size * SELECT_FEATURES[self.select_feature]

    @property
    def num_patches_per_side(self) -> int:
        """Patches per side of an ``image_size`` image; halved for the ``spatial_merge`` projector."""
        per_side = self.config.image_size // self.config.patch_size
        return per_side // 2 if self.projector_type == SPATIAL_MERGE_PROJECTOR else per_side

    @property
    def num_patches(self) -> int:
        """Patches of an ``image_size`` image (no CLS token); a quarter for the ``spatial_merge`` projector."""
        patches = (self.config.image_size // self.config.patch_size) ** 2
        return patches // 4 if self.projector_type == SPATIAL_MERGE_PROJECTOR else patches

    @property
    def image_size(self) -> int:
        return self.config.image_size


def _load_before_weights_arrive(tower: HEVCViTVisionTowerBase, state_dict, prefix, *args) -> None:
    """``load_state_dict`` of a model holding a tower built with ``delay_load``: when the state holds tower
    weights, load the tower first, so that they have weights to go to instead of being dropped."""
    if not tower.is_loaded and any(key.startswith(prefix + "vision_tower.") for key in state_dict):
        logger.info(
            "the weights being loaded hold %s's tower weights: loading the tower first", tower.vision_tower_name
        )
        tower.load_model()
