"""LLaVA-NeXT vision towers around the HEVC ViT encoder, and the builder that picks one by name.

Both towers keep the interface of LLaVA-NeXT's vision towers (constructor ``(vision_tower, args,
delay_load)``, ``load_model``, ``feature_select``, ``image_processor`` and the size properties), so a LLaVA
model switches between them by changing only the vision tower's name:

* :class:`HEVCViTPackingVisionTower` converts whatever it is handed — a batch ``(B, C, H, W)``, a video
  batch ``(B, C, T, H, W)``, or a list mixing images ``(C, H, W)`` of any size, image stacks
  ``(n, C, H, W)`` and videos ``(C, T, H, W)`` — to one packed sequence, runs
  :class:`~hevc_vit.modeling.HEVCViTPackingModel` once, and splits the features back per item.
* :class:`HEVCViTVisionTower` runs :class:`~hevc_vit.modeling.HEVCViTModel` on batches of one size
  (and a list item by item): the reference the packing tower is tested against.

Nothing in a tower reads a device tensor on the host (no ``.item()``, ``.tolist()``, ``.cpu()``, no
data-dependent branch): every size comes from tensor shapes, so ranks of a distributed job never wait on
each other inside the tower. A rank without images calls :meth:`dummy_forward` to run the same weights.

Legend: ``T`` packed tokens, ``n`` items, ``B`` batch, ``N`` tokens per item, ``D`` width, ``p`` patch,
``C`` channels, ``L`` entries of ``hidden_states`` (``num_hidden_layers + 1``).
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hevc_vit.llava.base import HEVCViTVisionTowerBase
from hevc_vit.llava.config import llava_arg, select_layer_indices  # noqa: F401 — select_layer_indices: public here too
from hevc_vit.llava.inputs import Element, ImagesInput, TowerInput
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.packing import PackingPlan, as_batch, patchify, patchify_items, unpack

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# the towers
# --------------------------------------------------------------------------------------------------


class HEVCViTPackingVisionTower(HEVCViTVisionTowerBase):
    """LLaVA-NeXT vision tower on :class:`HEVCViTPackingModel`: every image and video of a call, at its own
    size, packed into one sequence and encoded in one forward."""

    model_class = HEVCViTPackingModel

    def to_packing_input(self, images: ImagesInput, **call: Any) -> tuple[torch.Tensor, PackingPlan, TowerInput]:
        """A tower call (``call``: ``grid_thw``, ``patch_positions``, ``num_frames``, as for :meth:`forward`) as
        packing input: ``patches (T, C·p·p)`` on the tower's device, the :class:`PackingPlan` (one row per
        image and per clip, explicit positions when given) and the resolved call. Public so benchmarks and
        data loaders can build the input once."""
        layout = self.resolve(images, **call)
        device = self.device
        p = self.config.patch_size
        # ==========================================================================================
        # INPUT CONVERSION: LLaVA images -> packing input
        #   from: a batch (B, C, H, W) / (B, C, T, H, W), or a list of images (C, H, W), image stacks
        #         (n, C, H, W) and videos (C, T, H, W) of any sizes
        #   to:   patches (T, C·p·p) — the flattened (C, p, p) patches of all frames, back to back, which is
        #         already the frame-major order of any clip of consecutive frames — and the plan, whose
        #         grid_thw (n, 3) has one (k, h, w) row per image (k = 1) and per clip of k frames
        # ==========================================================================================
        if layout.batched:  # cut on the tower's device: one copy of the pixels, then one reshape there
            patches, _ = patchify(images.to(device, non_blocking=True), p)  # (B·T·h·w, C·p·p)
        else:  # cut where the items are, then one copy of the packed patches
            patches, _ = patchify_items(images, p, self.config.num_channels)
            patches = patches.to(device, non_blocking=True)  # (T, C·p·p)
        plan = PackingPlan.from_grid_thw(layout.grid_thw(), device=device, patch_positions=layout.positions())
        return patches, plan, layout

    # the seed's documented helpers, kept for code written against it: thin views of to_packing_input

    def _image_to_packing_input(self, image_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image ``(C, H, W)`` -> ``hidden_states (seq_len, patch_dim)`` (its flattened ``(C, p, p)`` patches,
        row-major, ``seq_len = h·w``, ``patch_dim = C·p·p``) on the tower's device and ``grid_thw (1, 3)`` int64,
        ``[[1, h, w]]``."""
        if not isinstance(image_tensor, torch.Tensor) or image_tensor.dim() != 3:
            shape = tuple(image_tensor.shape) if isinstance(image_tensor, torch.Tensor) else type(image_tensor)
            raise ValueError(f"image_tensor has shape {shape}; expected one image ({self.config.num_channels}, H, W)")
        patches, plan, _ = self.to_packing_input([image_tensor])
        return patches, plan.grid_thw

    def _batch_images_to_packing_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(B, C, H, W)`` (or videos ``(B, C, T, H, W)``) -> ``hidden_states (total_seq_len, patch_dim)``
        (the images' patches back to back) on the tower's device and ``grid_thw (B, 3)`` int64, ``(t, h, w)``
        per row."""
        if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images has shape {shape}; expected a batch (B, C, H, W) or videos (B, C, T, H, W)")
        patches, plan, _ = self.to_packing_input(images)
        return patches, plan.grid_thw

    def forward_with_outputs(
        self, images: ImagesInput, **call: Any
    ) -> tuple[torch.Tensor | list[torch.Tensor], TowerInput, BaseModelOutputWithPooling]:
        """:meth:`forward`'s features, the resolved call and the model's packed outputs (one forward)."""
        model = self._require_loaded()
        patches, plan, layout = self.to_packing_input(images, **call)
        outputs = model(patches, plan=plan, output_hidden_states=True, return_dict=True)
        packed = self.feature_select(outputs).to(layout.dtype)  # (T, D')
        # ==========================================================================================
        # OUTPUT CONVERSION: packed features -> what the projector expects
        #   from: features (T, D'), the elements back to back in input order
        #   to:   a batch -> (B, h·w, D') or (B, T·h·w, D'); a list -> one tensor per element: image (h·w, D'),
        #         image stack (n, h·w, D'), video (T·h·w, D') — split by sizes known on the host
        # ==========================================================================================
        D = packed.shape[-1]
        if layout.batched:
            return packed.view(*layout.elements[0].shape, D), layout, outputs
        parts = unpack(packed, layout.tokens)  # per element: (tokens, D')
        return [part.view(*e.shape, D) for part, e in zip(parts, layout.elements)], layout, outputs


class HEVCViTVisionTower(HEVCViTVisionTowerBase):
    """LLaVA-NeXT vision tower on :class:`HEVCViTModel`: one forward per run of items of one shape (a batch
    of images is one forward, a list goes element by element) — the standard path the packing tower must
    equal."""

    model_class = HEVCViTModel

    def forward_with_outputs(
        self, images: ImagesInput, **call: Any
    ) -> tuple[torch.Tensor | list[torch.Tensor], TowerInput, list[BaseModelOutputWithPooling]]:
        """:meth:`forward`'s features, the resolved call and the model outputs of every forward it ran."""
        model = self._require_loaded()
        layout = self.resolve(images, **call)
        elements = [images] if layout.batched else [as_batch(x, self.config.num_channels) for x in images]
        features, all_outputs = [], []
        for batch, element in zip(elements, layout.elements):
            batch = batch.to(self.device, non_blocking=True)  # (n, C, H, W) or (B, C, T, H, W)
            parts = []
            for pixels, positions in _runs(batch, element):
                outputs = model(pixels, patch_positions=positions, output_hidden_states=True, return_dict=True)
                parts.append(self.feature_select(outputs).to(layout.dtype).flatten(0, 1))  # (g·N, D')
                all_outputs.append(outputs)
            selected = torch.cat(parts) if len(parts) > 1 else parts[0]
            features.append(selected.view(*element.shape, selected.shape[-1]))
        return (features[0] if layout.batched else features), layout, all_outputs


def _runs(batch: torch.Tensor, element: Element) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The standard model's inputs for one element: one batch per run of consecutive items with the same
    frame count — images ``(g, C, H, W)``, clips ``(g, C, k, H, W)`` — with their positions ``(g, N, 3)``."""
    if batch.dim() == 5:  # videos (B, C, T, H, W): one run
        positions = element.positions
        return [(batch, None if positions is None else positions.reshape(batch.shape[0], -1, 3))]
    hw = element.h * element.w
    runs, frame = [], 0
    for k, group in itertools.groupby(element.frames):
        g = len(list(group))
        pixels = batch[frame : frame + g * k]  # (g·k, C, H, W)
        if k > 1:  # consecutive frames -> clips (g, C, k, H, W)
            pixels = pixels.view(g, k, *pixels.shape[1:]).transpose(1, 2)
        positions = element.positions
        if positions is not None:
            positions = positions[frame * hw : (frame + g * k) * hw].reshape(g, k * hw, 3)
        runs.append((pixels, positions))
        frame += g * k
    return runs


# --------------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------------

# (substring of the lower-cased name, tower class), tried in order
TOWER_PATTERNS: tuple[tuple[str, type[HEVCViTVisionTowerBase]], ...] = (
    ("hevc_vit_packing", HEVCViTPackingVisionTower),
    ("packing", HEVCViTPackingVisionTower),
    ("hevc_vit", HEVCViTVisionTower),
)


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> HEVCViTVisionTowerBase:
    """The tower a LLaVA config names, built with ``args=vision_tower_cfg`` and ``kwargs`` (e.g. ``delay_load``).

    The name is ``mm_vision_tower`` (else ``vision_tower``); matched case-insensitively, a name containing
    ``hevc_vit_packing`` or ``packing`` gives :class:`HEVCViTPackingVisionTower`, else one containing
    ``hevc_vit`` gives :class:`HEVCViTVisionTower`; anything else raises ``ValueError``.
    """
    name = llava_arg(vision_tower_cfg, "mm_vision_tower", None)
    if name is None:
        name = llava_arg(vision_tower_cfg, "vision_tower", None)
    accepted = ", ".join(f"{pattern!r} -> {cls.__name__}" for pattern, cls in TOWER_PATTERNS)
    if name is None:
        raise ValueError(
            f"vision_tower_cfg has neither mm_vision_tower nor vision_tower; expected a name containing one of: "
            f"{accepted}"
        )
    for pattern, cls in TOWER_PATTERNS:
        if pattern in os.fspath(name).lower():
            return cls(name, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"vision tower {os.fspath(name)!r} is unknown; expected a name containing one of: {accepted}")
