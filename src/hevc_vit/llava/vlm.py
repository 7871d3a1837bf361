"""LLaVA on the packing HEVC ViT, in transformers' conventions: every image and video of a batch at its own
size, encoded in one forward, projected on the packed sequence and scattered into the text embeddings.

State-dict names (transformers 5's Llava layout, the same under 4.x since the classes are ours):
``model.vision_tower.*`` (:class:`HEVCViTPackingModel`), ``model.multi_modal_projector.*`` (``build_projector``,
the reference fork's names), ``model.language_model.*`` (the text base model), ``lm_head.weight``.

Legend: ``T`` packed patches, ``T'`` packed tokens after the projector, ``n`` items, ``B`` batch, ``S`` text
length, ``D`` tower width, ``L`` LLM width.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hevc_vit.llava.config import select_layer_indices
from hevc_vit.llava.projector import build_projector
from hevc_vit.llava.vlm_config import HEVCViTLlavaConfig, projected_grid_thw
from hevc_vit.modeling import HEVCViTPackingModel
from hevc_vit.packing import GridLike, as_grid_thw, split_sizes

logger = logging.getLogger(__name__)

# the cache's name in model inputs and outputs: "cache" from transformers 5.x's rename, "past_key_values" before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
VISION_INPUTS = ("pixel_values", "image_grid_thw", "patch_positions")  # given to the prefill step only
# transformers 5 says which step is the prefill (is_first_iteration); 4 says it with cache_position[0] == 0
_SAYS_FIRST = "is_first_iteration" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


class HEVCViTLlavaPreTrainedModel(PreTrainedModel):
    """Shared settings: the config class, the ``model`` prefix, what may not be split across devices."""

    config_class = HEVCViTLlavaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["HEVCViTEncoderLayer"]  # the language model's own are added by transformers
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class HEVCViTLlavaModel(HEVCViTLlavaPreTrainedModel):
    """Tower, projector and text base model: ``forward`` returns the language model's outputs."""

    def __init__(self, config: HEVCViTLlavaConfig):
        super().__init__(config)
        self.vision_tower = HEVCViTPackingModel(config.vision_config)
        self.multi_modal_projector = build_projector(config.projector_args())
        self.language_model = AutoModel.from_config(config.text_config)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # -- vision ------------------------------------------------------------------------------------

    def get_vision_features(
        self, pixel_values: torch.Tensor, image_grid_thw: GridLike, patch_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tower's selected ``hidden_states`` for packed patches: ``(T, C·p·p)`` -> ``(T, D')``.

        One forward of :class:`HEVCViTPackingModel` for all items; ``vision_feature_layer`` picks entries of
        ``hidden_states`` (before the final norm, as the fork's tower), concatenated on the last axis.
        """
        out = self.vision_tower.forward_packed(
            pixel_values, image_grid_thw, patch_positions, output_hidden_states=True, return_dict=True
        )
        hidden = out.hidden_states
        layers = [select_layer_indices("patch", layer, len(hidden))[0] for layer in self.config.vision_feature_layers]
        return hidden[layers[0]] if len(layers) == 1 else torch.cat([hidden[i] for i in layers], dim=-1)

    def project(
        self, features: torch.Tensor, image_grid_thw: GridLike, is_video: torch.Tensor | list[bool] | None = None
    ) -> torch.Tensor:
        """Tower features ``(T, D')`` -> LLM tokens ``(T', L)``: the projector on the packed sequence, then the
        fork's ``get_2dPool`` on every video item when ``video_pool_mode`` is set."""
        grid = as_grid_thw(image_grid_thw)
        weight = next(self.multi_modal_projector.parameters(), None)
        if weight is not None:
            features = features.to(weight.dtype)
        x = self.multi_modal_projector(features, grid)  # (T', L)
        mode = self.config.video_pool_mode
        video = torch.zeros(len(grid), dtype=torch.bool) if is_video is None else torch.as_tensor(is_video).bool()
        if mode is None or not video.any():
            return x
        out_grid = projected_grid_thw(grid, self.config.projector_type)  # before the pool
        parts = list(torch.split(x, split_sizes(out_grid)))  # per item: (t·h·w, L)
        for i in video.nonzero()[:, 0].tolist():
            parts[i] = self._pool(parts[i], *out_grid[i].tolist())
        return torch.cat(parts)  # (T'', L)

    def _pool(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """The fork's ``get_2dPool`` on one video item's frames: ``(t·h·w, L) -> (t·h'·w', L)``."""
        s, mode = self.config.video_pool_stride, self.config.video_pool_mode
        frames = x.view(t, h, w, -1).permute(0, 3, 1, 2)  # (t, L, h, w)
        if mode == "average":
            frames = F.avg_pool2d(frames, s)
        elif mode == "max":
            frames = F.max_pool2d(frames, s)
        else:  # bilinear, to the rounded-up size
            frames = F.interpolate(frames, size=[-(-h // s), -(-w // s)], mode="bilinear")
        return frames.permute(0, 2, 3, 1).reshape(-1, x.shape[-1])  # (t·h'·w', L)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: GridLike,
        patch_positions: torch.Tensor | None = None,
        is_video: torch.Tensor | list[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Every item's LLM tokens, one ``(tokens(item), L)`` tensor per item (one tower and projector call)."""
        grid = as_grid_thw(image_grid_thw)
        x = self.project(self.get_vision_features(pixel_values, grid, patch_positions), grid, is_video)
        return list(torch.split(x, self.config.tokens_per_item(grid, is_video)))

    # -- placeholders ------------------------------------------------------------------------------

    def placeholder_layout(self, input_ids: torch.Tensor, image_grid_thw: GridLike) -> tuple[torch.Tensor, list[bool]]:
        """Which item is a video, read from its placeholder run; checks every run's length.

        Items take the placeholder runs in order, row by row; item ``i`` takes ``tokens(item)`` consecutive ids
        all equal to ``image_token_id`` or all ``video_token_id`` in one row. Returns the ``(B, S)`` bool mask of
        the placeholders and ``is_video`` per item. Raises ``ValueError`` naming the item, expected and found.
        """
        mask, is_video, _ = self.item_layout(input_ids, image_grid_thw)
        return mask, is_video

    def item_layout(
        self, input_ids: torch.Tensor, image_grid_thw: GridLike
    ) -> tuple[torch.Tensor, list[bool], list[int]]:
        """:meth:`placeholder_layout` and the row of ``input_ids`` each item sits in."""
        grid = as_grid_thw(image_grid_thw)
        ids = input_ids.detach().cpu()
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        mask = (ids == image_id) | (ids == video_id)  # (B, S)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order
        kinds = ids[rows, cols] == video_id  # (P,)
        is_video, item_rows, at = [], [], 0
        for i in range(len(grid)):
            if at >= len(rows):
                raise ValueError(f"pixel_values holds {len(grid)} items; input_ids has placeholders for {i} of them "
                                 f"(item {i} (t, h, w) = {tuple(grid[i].tolist())} has none)")  # fmt: skip
            video, row = bool(kinds[at]), int(rows[at])
            need = self.config.tokens_per_item(grid[i : i + 1], [video])[0]
            # one unbroken run: same kind, same row, consecutive columns (text inside a run is no item's layout)
            step = torch.arange(min(need, len(rows) - at)) + int(cols[at])
            same = (kinds[at : at + need] == video) & (rows[at : at + need] == row) & (cols[at : at + need] == step)
            found = int(same.long().cumprod(0).sum())
            if found != need:
                token = "<video>" if video else "<image>"
                raise ValueError(f"item {i} ({'video' if video else 'image'}, (t, h, w) = {tuple(grid[i].tolist())}) "
                                 f"takes {need} {token} placeholder tokens; found a run of {found} consecutive ones in "
                                 f"row {row} from column {int(cols[at])}")  # fmt: skip
            is_video.append(video)
            item_rows.append(row)
            at += need
        if at != len(rows):
            raise ValueError(f"input_ids holds {len(rows)} placeholder tokens; the {len(grid)} items of pixel_values "
                             f"take {at}, expected equal")  # fmt: skip
        return mask, is_video, item_rows

    def _has_placeholders(self, ids: torch.Tensor) -> bool:
        return bool(((ids == self.config.image_token_id) | (ids == self.config.video_token_id)).any())

    def _ids_from_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Placeholder ids found in ``inputs_embeds`` (rows equal to the placeholders' embeddings), else -1."""
        embed = self.get_input_embeddings()
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long)
        for token in (self.config.image_token_id, self.config.video_token_id):
            row = embed(torch.tensor(token, device=inputs_embeds.device)).to(inputs_embeds.dtype)
            ids[(inputs_embeds == row).all(-1).cpu()] = token
        return ids

    def merge_vision(
        self,
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor,
        image_grid_thw: GridLike | None,
        patch_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``inputs_embeds (B, S, L)`` with every placeholder replaced by its item's token (masked_scatter).

        Without any placeholder (a text-only batch on a multimodal run) the tower and projector still run and
        enter as ``0 * sum`` — the fork's convention: the same graph on every rank, zero gradient. With gradients
        off (inference) that drops the items: a warning says so, once per model, since a processor whose
        placeholder ids are not the config's would otherwise drop every image without a word.
        """
        if image_grid_thw is None:
            raise ValueError("pixel_values was given without image_grid_thw; expected (n, 3) rows (t, h, w)")
        grid = as_grid_thw(image_grid_thw)
        ids = input_ids if input_ids is not None else self._ids_from_embeds(inputs_embeds)
        features = self.get_vision_features(pixel_values, grid, patch_positions)  # (T, D')
        if not self._has_placeholders(ids):
            if not torch.is_grad_enabled() and not getattr(self, "_warned_unplaced", False):
                self._warned_unplaced = True  # once per model: a text-only batch may come every step
                logger.warning(
                    "pixel_values holds %d items but input_ids has no placeholder (image_token_id=%d, "
                    "video_token_id=%d): the items are not used (the fork's text-only convention). If they were "
                    "meant, the processor's tokenizer ids are not the config's.",
                    len(grid), self.config.image_token_id, self.config.video_token_id,
                )  # fmt: skip
            anchor = self.project(features, grid).sum()
            return inputs_embeds + 0 * anchor.to(inputs_embeds.dtype)
        mask, is_video = self.placeholder_layout(ids, grid)
        tokens = self.project(features, grid, is_video).to(inputs_embeds.device, inputs_embeds.dtype)  # (T', L)
        mask = mask.to(inputs_embeds.device)[..., None].expand_as(inputs_embeds)  # (B, S, L)
        return inputs_embeds.masked_scatter(mask, tokens)

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: GridLike | None = None,
        patch_positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """See :meth:`HEVCViTLlavaForConditionalGeneration.forward`; returns the language model's outputs."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, S) and inputs_embeds (B, S, L)")
        cache = kwargs.pop("cache", None)
        cache = past_key_values if cache is None else cache
        if pixel_values is not None and not len(pixel_values) and (image_grid_thw is None or not len(image_grid_thw)):
            pixel_values = image_grid_thw = patch_positions = None  # the processor's text-only (0, C·p·p): no item
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, S, L)
        if pixel_values is not None:
            inputs_embeds = self.merge_vision(inputs_embeds, input_ids, pixel_values, image_grid_thw, patch_positions)
        elif input_ids is not None and not _is_decoding(cache) and self._has_placeholders(input_ids):
            raise ValueError("input_ids holds <image>/<video> placeholders but pixel_values is None (or holds no item)")
        if cache is not None:
            kwargs[self._cache_arg or "past_key_values"] = cache
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )


def _is_decoding(cache: Any) -> bool:
    """A cache that holds tokens: the placeholders were merged in the prefill."""
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


class HEVCViTLlavaForConditionalGeneration(HEVCViTLlavaPreTrainedModel, GenerationMixin):
    """:class:`HEVCViTLlavaModel` and the LM head; generates with a KV cache (vision inputs in the prefill only)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: HEVCViTLlavaConfig):
        super().__init__(config)
        self.model = HEVCViTLlavaModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """See :meth:`HEVCViTLlavaModel.get_image_features`."""
        return self.model.get_image_features(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: GridLike | None = None,
        patch_positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """
        input_ids: ``(B, S)``; each item's placeholder run is ``tokens(item)`` copies of ``image_token_id``
            (``video_token_id`` for a video), items in the order of their runs, row by row.
        pixel_values: ``(T, C·p·p)`` packed patches of all items; image_grid_thw: ``(n, 3)`` ``(t, h, w)`` per
            item; patch_positions: optional ``(T, 3)`` explicit positions (as :class:`HEVCViTPackingModel`).
        labels: ``(B, S)``, -100 ignored; logits_to_keep: keep the last this many positions (0: all).
        Returns ``logits (B, S, vocab)``, ``loss`` with labels, and the cache.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            patch_positions=patch_positions,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # (B, S, L)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])  # (B, S, vocab)
        loss = None
        if labels is not None:
            vocab = self.config.text_config.vocab_size
            loss = self.loss_function(logits, labels, vocab, num_items_in_batch=kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD, None)},
        )

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """transformers repeats every tensor along dim 0 (beams, ``num_return_sequences``); the packed vision
        inputs have items, not samples, on dim 0: each sample's items are repeated with it here instead."""
        vision = {name: kwargs.pop(name, None) for name in VISION_INPUTS}
        if expand_size > 1 and vision["pixel_values"] is not None and len(vision["pixel_values"]):  # 0: no item
            vision = self._expand_vision(vision, expand_size, input_ids, kwargs.get("inputs_embeds"))
        input_ids, kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **kwargs
        )
        return input_ids, {**kwargs, **vision}

    def _expand_vision(
        self, vision: dict[str, Any], expand_size: int, input_ids: torch.Tensor | None, embeds: torch.Tensor | None
    ) -> dict[str, Any]:
        """Packed items ``(T, ...)`` and ``(n, 3)`` in the order of the expanded batch: sample ``b``'s items,
        ``expand_size`` times, then sample ``b + 1``'s."""
        grid = as_grid_thw(vision["image_grid_thw"])
        ids = input_ids if input_ids is not None and input_ids.numel() else self.model._ids_from_embeds(embeds)
        if not self.model._has_placeholders(ids):
            return vision  # the zero-image convention: no sample owns the items
        _, _, rows = self.model.item_layout(ids, grid)
        starts = [0, *torch.cumsum(grid.prod(-1), 0).tolist()]
        items = [i for b in range(len(ids)) for _ in range(expand_size) for i in range(len(grid)) if rows[i] == b]
        patches = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in items])  # (T·expand,)
        out = dict(vision, image_grid_thw=grid[items].to(getattr(vision["image_grid_thw"], "device", "cpu")))
        for name in ("pixel_values", "patch_positions"):
            if vision[name] is not None:
                out[name] = vision[name][patches.to(vision[name].device)]
        return out

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """transformers' inputs for one step, with the vision inputs only where the prompt is encoded: the
        prefill, or every step without a cache (the placeholders are then in every step's input).
        ``inputs_embeds`` is named: transformers reads this signature to allow ``generate(inputs_embeds=...)``."""
        vision = {name: kwargs.pop(name, None) for name in VISION_INPUTS}
        if _SAYS_FIRST:
            first = kwargs.get("is_first_iteration", False)
        else:  # transformers 4: the prefill (and every step without a cache) starts at position 0
            position = kwargs.get("cache_position")
            first = position is None or int(position[0]) == 0
        first = bool(first) or not kwargs.get("use_cache", True)
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        for name, value in vision.items():
            inputs[name] = value if first else None
        return inputs
