"""One forward of the packing model over a group of items: each item's index row and features, returned.

Legend: ``T`` packed tokens, ``n`` items, ``N`` tokens of one item, ``D`` width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hevc_vit.encode.decode.item import LoadedItem
from hevc_vit.encode.output.index import failed_row, make_row
from hevc_vit.packing import PackingPlan
from hevc_vit.processing.pixels import normalize_patches


@dataclass
class EncodedItem:
    """One item's result: its index row and, when it was encoded, its tensors.

    tensors: ``grid_thw`` ``(3,)`` int64; ``positions`` ``(N, 3)`` int64 (codec-sparse clips); ``patches``
    ``(N, D)`` (unless pooled only); ``pooled`` ``(D,)`` (with pooling). Empty for a failed item.
    tokens: the patches encoded (0 for a failed item)."""

    row: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.tensors)

    def counts(self) -> tuple[int, int, int]:
        """``(encoded, failed, tokens)``: what the item adds to a run's tally."""
        return (1, 0, self.tokens) if self.tensors else (0, 1, 0)


class GroupEncoder:
    """Runs groups of items through the model and returns each item's row and features.

    A group's results come back one group later (from the next :meth:`run`, or from :meth:`close`): on a GPU the
    next group is prepared and queued while the previous one's features come back, so the device does not wait
    for the host. Each forward's results are one list, so that a caller can keep a forward together (a shard per
    forward)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        pool: str,
        pooled_only: bool,
        keys: Sequence[str],
        extras: Sequence[dict[str, Any]] | None = None,
        normalize: bool = False,
    ):
        """pool: ``"head"``, ``"mean"`` or ``"none"``. keys: the shard key of item ``index``; extras: its fields from
        the source, which a failed row is given too. normalize: the pooled vectors are L2-normalised (computed in
        float32, returned in float32; the output stage casts them to the storage dtype)."""
        self.model, self.device, self.dtype = model, device, dtype
        self.pool, self.pooled_only, self.normalize = pool, pooled_only, normalize
        self.keys, self.extras = keys, extras
        self._pending = None

    def key(self, item: LoadedItem) -> str:
        return self.keys[item.index]

    def failure_row(self, item: LoadedItem, error: str | None = None) -> dict[str, Any]:
        """The index row of an item that failed (by default, for the reason it failed to load)."""
        extra = self.extras[item.index] if self.extras is not None else None
        return failed_row(item.path, self.key(item), error or item.error, extra)

    def failed(self, item: LoadedItem, error: str | None = None) -> EncodedItem:
        """The result of an item that failed (by default, for the reason it failed to load)."""
        return EncodedItem(self.failure_row(item, error))

    def run(self, items: list[LoadedItem]) -> list[list[EncodedItem]]:
        """Start the forward of one group (a GPU out-of-memory error halves it until it fits, or fails the single
        item); returns the results of the forwards finished meanwhile, one list per forward, in order."""
        done: list[list[EncodedItem]] = []
        try:
            outputs = self._forward(items)
        except torch.cuda.OutOfMemoryError:
            done += self.close()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) > 1:  # smaller forwards may fit
                half = len(items) // 2
                return done + self.run(items[:half]) + self.run(items[half:])
            item = items[0]
            return done + [[self.failed(item, f"out of memory on {self.device} ({item.num_tokens} patches)")]]
        done += self.close()
        self._pending = (items, outputs)
        return done

    def _forward(self, items: list[LoadedItem]):
        patches = model_input(items, self.device, self.dtype)  # (T, C·p·p)
        positions = torch.cat([it.positions for it in items]) if len(items) > 1 else items[0].positions  # (T, 3)
        # token counts of the items (a codec-sparse clip runs only its kept patches, not its whole grid)
        plan = PackingPlan.from_seqlens([it.num_tokens for it in items], positions, device=self.device)
        with torch.inference_mode():
            out = self.model(patches, plan=plan, return_dict=True)
            last = out.last_hidden_state  # (T, D)
            pooled = None
            if self.pool == "head":
                pooled = out.pooler_output  # (n, D)
            elif self.pool == "mean":
                counts = torch.tensor(plan.seqlens, dtype=torch.float32, device=self.device)[:, None]  # (n, 1)
                sums = last.new_zeros(plan.num_items, last.shape[1], dtype=torch.float32)
                pooled = (sums.index_add_(0, plan.segment_ids, last.float()) / counts).to(last.dtype)  # (n, D)
            if pooled is not None and self.normalize:
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)  # (n, D) float32, unit length
            non_blocking = self.device.type == "cuda"
            last_host = None if self.pooled_only else last.to("cpu", non_blocking=non_blocking)
            pooled_host = None if pooled is None else pooled.to("cpu", non_blocking=non_blocking)
            event = None
            if non_blocking:
                event = torch.cuda.Event()
                event.record()
        return plan.seqlens, last_host, pooled_host, event

    def close(self) -> list[list[EncodedItem]]:
        """The results of the forward still pending (none or one list)."""
        if self._pending is None:
            return []
        items, (seqlens, last, pooled, event) = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        per_item = torch.split(last, list(seqlens)) if last is not None else [None] * len(items)
        return [
            [
                self._result(item, features, pooled[i] if pooled is not None else None)
                for i, (item, features) in enumerate(zip(items, per_item))
            ]
        ]

    def _result(self, item: LoadedItem, features: torch.Tensor | None, pooled: torch.Tensor | None) -> EncodedItem:
        """An item's row and tensors (each with its own storage, for safetensors); NaN or inf features are never
        returned as ok."""
        tensors = {"grid_thw": torch.tensor(item.grid_thw, dtype=torch.int64)}
        if "codec" in item.info:  # which patches of the grid the features are, (K, 3) (t, h, w)
            tensors["positions"] = item.positions.clone()
        if features is not None:
            tensors["patches"] = features.clone()  # (N, D)
        if pooled is not None:
            tensors["pooled"] = pooled.clone()  # (D,)
        bad = [name for name in ("patches", "pooled") if name in tensors and not tensors[name].isfinite().all()]
        if bad:
            error = f"non-finite features: the {' and '.join(bad)} hold NaN or inf values (not stored)"
            return self.failed(item, error)
        shape = list(tensors["patches"].shape) if features is not None else list(tensors["pooled"].shape)
        row = make_row(
            item.path,
            status="ok",
            key=self.key(item),
            shape=shape,
            grid_thw=list(item.grid_thw),
            kind=item.kind,
            **item.info,
        )
        return EncodedItem(row, tensors, item.num_tokens)


def model_input(items: Sequence[LoadedItem], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The items' patches, concatenated, ``(T, C·p·p)`` on ``device`` in ``dtype``. 8-bit patches travel as bytes
    and are normalised on the device: all at once when they share one normalisation, else item by item (a group
    with float patches, e.g. a codec-sparse clip's, or with items of other processors)."""
    first = items[0].normalization
    if first is not None and all(it.normalization == first for it in items):
        samples = torch.cat([it.patches for it in items]) if len(items) > 1 else items[0].patches  # (T, C·p·p) uint8
        return normalize_patches(samples.to(device, non_blocking=True), *first).to(dtype)
    return torch.cat([it.float_patches(device) for it in items]).to(dtype)
