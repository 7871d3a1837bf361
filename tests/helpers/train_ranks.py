"""Train a tiny LLaVA-like model (tower trainable, gradient checkpointing on) for a few steps, in one process
or as one rank of a run under DeepSpeed ZeRO-3 or PyTorch FSDP2; the test compares the runs.

Run as a rank: ``python -m tests.helpers.train_ranks --engine zero3|fsdp2|single --out DIR`` with the usual
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` environment (``single``: one process, the union of
every rank's samples in one batch). Rank 0 writes ``DIR/result.json`` (loss and gradient norm per step, what was
sharded) and ``DIR/initial.safetensors`` / ``DIR/weights.safetensors`` (every weight before the first step and
after the last, gathered).

The loss is normalised so that the runs are exactly comparable: every rank's loss is its sum of token
cross-entropies divided by the number of label tokens of the *whole* step (all ranks, an all-reduce), times the
world size. Both engines average gradients over ranks, so the averaged gradient is the sum over all ranks' tokens
divided by the global token count — the single process's mean over the same samples.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from hevc_vit import HEVCViTPackingModel
from hevc_vit.llava.projector import build_projector
from hevc_vit.packing import grid_positions
from tests.helpers import FIXTURES

TOWER_DIR = FIXTURES / "llava_vit_packing_tiny"
VOCAB, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, PAD_ID = 128, 120, 121, 0
PATCH_DIM = 3 * 14 * 14
LR, TOWER_LR = 1e-3, 2e-4  # the recipe's ratio (lr 1e-5, mm_vision_tower_lr 2e-6), scaled so 3 steps move weights
STEPS = 3
MAX_GRAD_NORM = 1.0  # the recipe's max_grad_norm; DeepSpeed's gradient_clipping (whose default is 1.0 too)
COLLECTIVE_TIMEOUT_S = 60  # a collective that waits longer raises (a rank that never comes)


# --------------------------------------------------------------------------------------------------
# the model: ONE factory, HEVCViTLlavaForConditionalGeneration or (a tree without it) a stand-in (LLAVA_SPEC.md)
# --------------------------------------------------------------------------------------------------


class StandInLlava(nn.Module):
    """The LLAVA_SPEC forward on HEVCViTPackingModel + ``build_projector`` + a causal LM, with its state-dict names
    (``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``, ``lm_head``)."""

    def __init__(self, tower: HEVCViTPackingModel, projector: nn.Module, lm: nn.Module, vision_feature_layer: int = -2):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_tower = tower
        self.model.multi_modal_projector = projector
        self.model.language_model = lm.model
        self.lm_head = lm.lm_head
        self.vision_feature_layer = vision_feature_layer

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.vision_tower.gradient_checkpointing_enable(**kwargs)
        self.model.language_model.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, patch_positions=None, attention_mask=None):
        embeds = self.model.language_model.embed_tokens(input_ids)  # (B, S, L)
        if pixel_values is not None:
            out = self.model.vision_tower(
                hidden_states=pixel_values, grid_thw=image_grid_thw, patch_positions=patch_positions,
                output_hidden_states=True,
            )  # fmt: skip
            feats = self.model.multi_modal_projector(out.hidden_states[self.vision_feature_layer], image_grid_thw)
            mask = (input_ids == IMAGE_TOKEN_ID) | (input_ids == VIDEO_TOKEN_ID)  # (B, S)
            found = int(mask.sum())  # input_ids are on the host here
            if found == 0:  # the fork's zero-image convention: the tower runs, its features enter x0
                embeds = embeds + 0 * feats.sum()
            elif found != feats.shape[0]:
                raise ValueError(f"input_ids hold {found} placeholders; the items give {feats.shape[0]} tokens")
            else:
                embeds = embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model every run trains, identical in every process: HEVCViTLlavaForConditionalGeneration where this
    tree has it (else :class:`StandInLlava`), its tower from the fixture checkpoint — built apart, as the fork's
    ``initialize_vision_modules`` builds it — the projector and the text model seeded."""
    tower = HEVCViTPackingModel.from_pretrained(TOWER_DIR, attn_implementation="eager")
    torch.manual_seed(seed)  # after the tower: whether loading draws random numbers depends on how it loads
    text = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    text._attn_implementation = "eager"
    try:
        from hevc_vit.llava.vlm import HEVCViTLlavaForConditionalGeneration
        from hevc_vit.llava.vlm_config import HEVCViTLlavaConfig
    except ImportError:  # a tree from before the class (issue 24): the stand-in with its forward
        projector = build_projector({"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 64, "hidden_size": 64})
        return StandInLlava(tower, projector, Qwen2ForCausalLM(text)).to(dtype)
    config = HEVCViTLlavaConfig(
        vision_config=tower.config, text_config=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
    )  # fmt: skip
    model = HEVCViTLlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    return model.to(dtype)


# --------------------------------------------------------------------------------------------------
# the data: per step, per rank, a list of samples
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixels: list[torch.Tensor] = field(default_factory=list)  # per item (t·h·w, C·p·p)
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    positions: list[torch.Tensor | None] = field(default_factory=list)  # per item (t·h·w, 3) or None


def make_sample(seed: int, items: list[tuple[tuple[int, int, int], list[int] | None]]) -> Sample:
    """Random text around one placeholder run per item; ``items``: ``(grid, frame positions or None)``."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(1, IMAGE_TOKEN_ID, (n,), generator=g).tolist()  # noqa: E731
    ids, labels, sample = words(3), [-100] * 3, Sample([], [])
    for grid, frames in items:
        t, h, w = grid
        token = VIDEO_TOKEN_ID if t > 1 else IMAGE_TOKEN_ID
        ids += [token] * (t * h * w)
        labels += [-100] * (t * h * w)
        sample.pixels.append(torch.randn(t * h * w, PATCH_DIM, generator=g))
        sample.grids.append(grid)
        pos = None
        if frames is not None:  # frames spread over a longer context: explicit RoPE positions
            pos = grid_positions(torch.tensor([grid]))
            pos[:, 0] = torch.tensor(frames).repeat_interleave(h * w)
        sample.positions.append(pos)
        text = words(4)
        ids, labels = ids + text, labels + text
    text = words(5)
    sample.input_ids, sample.labels = ids + text, labels + text
    return sample


SPREAD = [0, 21, 42, 63]  # 4 frames over a 64-frame context


def step_samples() -> list[list[list[Sample]]]:
    """``[step][rank]`` -> samples. Step 0: a video with patch_positions vs text only; step 1: two images vs
    one; step 2: text only vs a video and an image."""
    return [
        [[make_sample(10, [((4, 2, 2), SPREAD)])], [make_sample(11, [])]],
        [[make_sample(20, [((1, 2, 3), None), ((1, 3, 2), None)])], [make_sample(21, [((1, 2, 2), None)])]],
        [[make_sample(30, [])], [make_sample(31, [((2, 2, 2), None), ((1, 2, 2), None)])]],
    ]


def collate(samples: list[Sample], dummy_image: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded rows; the items of all rows packed. A batch without items gets the fork's dummy image (a
    zero 2x2-patch image, no placeholder) so that the tower runs on every rank; ``dummy_image=False``: none."""
    S = max(len(s.input_ids) for s in samples)
    pad = lambda xs, v: xs + [v] * (S - len(xs))  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(s.input_ids, PAD_ID) for s in samples]),
        "labels": torch.tensor([pad(s.labels, -100) for s in samples]),
        "attention_mask": torch.tensor([pad([1] * len(s.input_ids), 0) for s in samples]),
    }
    pixels = [p for s in samples for p in s.pixels]
    grids = [g for s in samples for g in s.grids]
    positions = [p for s in samples for p in s.positions]
    if not pixels and not dummy_image:
        return batch
    if not pixels:
        pixels, grids, positions = [torch.zeros(4, PATCH_DIM)], [(1, 2, 2)], [None]
    batch["pixel_values"] = torch.cat(pixels)  # (T, C·p·p)
    batch["image_grid_thw"] = torch.tensor(grids)  # (n, 3)
    if any(p is not None for p in positions):
        defaults = [grid_positions(torch.tensor([g])) for g in grids]
        batch["patch_positions"] = torch.cat([p if p is not None else d for p, d in zip(positions, defaults)])
    return batch


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the label tokens, and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, VOCAB), shift_labels.reshape(-1), reduction="sum")  # -100 ignored
    return loss, int((shift_labels != -100).sum())


# --------------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module) -> list[dict]:
    """The recipe's two learning rates: the tower's (mm_vision_tower_lr) and the rest's."""
    tower = [p for n, p in model.named_parameters() if n.startswith("model.vision_tower.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    return [{"params": tower, "lr": TOWER_LR}, {"params": rest, "lr": LR}]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model), weight_decay=0.0, foreach=False)


def run(
    engine: str, out: Path, dtype: str = "fp32", checkpointing: str = "default", dummy_image: bool = True,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> None:  # fmt: skip
    """Train :data:`STEPS` steps as this process's rank; rank 0 writes the losses, gradient norms and weights."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    if engine == "zero3":
        import deepspeed  # the "test" extra: DeepSpeed ZeRO-3 on its CPU accelerator (DS_ACCELERATOR=cpu)
        from transformers.integrations import HfDeepSpeedConfig  # the same

        # DeepSpeed's shared-memory all-reduce serves only its inference_all_reduce (training collectives go
        # through gloo), and the op's JIT build (a C++ compile) costs ~70 s on first use. By module name:
        # ``import deepspeed.comm.torch as m`` binds the torch package, which deepspeed.comm re-exports.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
        config = zero3_config(dtype)
        start = build_model().state_dict()  # built plainly, as in every other run: the start all runs share
        # as the HF Trainer sets it under ZeRO-3: from_pretrained builds the tower under zero.Init, so its
        # parameters are partitioned (shape [0]) from construction on and the checkpoint loads into the shards.
        # A PreTrainedModel built under it is partitioned too, with zero.Init's own random init (other values)
        hf_zero3 = HfDeepSpeedConfig(config)  # noqa: F841 — transformers holds it by a weak reference
    elif engine == "fsdp2":
        dist.init_process_group("gloo", timeout=timeout)
    elif engine != "single":
        raise ValueError(f"engine={engine!r}; expected single, zero3 or fsdp2")
    # ZeRO-3 bf16 holds bf16 parameters (fp32 master copies in the optimizer), the tower built so by zero.Init
    model = build_model(dtype=torch.bfloat16 if engine == "zero3" and dtype == "bf16" else torch.float32)
    # parameters already partitioned (shape [0]) when built: the tower's, under ZeRO-3 (zero.Init)
    at_build = [n for n, p in model.named_parameters() if p.numel() == 0]
    if engine == "zero3":  # the shared start of the randomly initialised weights, written into their shards (rank
        # 0's copy, partitioned again on exit); the tower keeps what its checkpoint loaded under zero.Init
        rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
        with deepspeed.zero.GatheredParameters([p for _, p in rest], modifier_rank=0), torch.no_grad():
            for name, p in rest:
                p.copy_(start[name])
    if checkpointing != "off":  # "default": what the installed transformers does; else use_reentrant as named
        kwargs = {} if checkpointing == "default" else {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    model.train()
    initial = gather_weights(model, engine if engine == "zero3" else "single")
    if engine == "single":
        optimizer = make_optimizer(model)
        train = model
        sharded = 0
    elif engine == "zero3":
        train, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=config)
        sharded = sum(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())  # partitioned: shape [0]
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if dtype == "bf16" else MixedPrecisionPolicy()
        for layer in [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        optimizer = make_optimizer(model)
        train = model
        sharded = sum(isinstance(p, DTensor) for p in model.parameters())

    losses, counts, norms = [], [], []
    for step in step_samples():
        samples = [s for r in step for s in r] if engine == "single" else step[rank]
        batch = collate(samples, dummy_image)
        labels = batch.pop("labels")
        logits = train(**batch).logits
        loss_sum, count = token_loss_sum(logits, labels)
        total = torch.tensor([float(count), loss_sum.item()])
        if world > 1:
            dist.all_reduce(total)
        loss = loss_sum / total[0] * world  # the engines average over ranks: the union's token mean
        if engine == "zero3":
            train.backward(loss)
            train.step()  # clips at gradient_clipping, then steps
            norm = float(train.get_global_grad_norm())
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # global norm, all shards
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(total[1] / total[0]))
        counts.append(int(total[0]))
        norms.append(norm)

    external = external_parameters(model) if engine == "zero3" else {}
    weights = gather_weights(model, engine)
    if rank == 0:
        from safetensors.torch import save_file  # a dependency of hevc_vit

        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
        save_file(initial, str(out / "initial.safetensors"))
        result = {"engine": engine, "losses": losses, "tokens": counts, "grad_norms": norms, "sharded": sharded,
                  "parameters": len(weights), "partitioned_at_build": at_build, "external": external}  # fmt: skip
        (out / "result.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def zero3_config(dtype: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # threshold 0: every parameter is partitioned (the default keeps ones under 1e5 elements whole, which is
        # every parameter of this tiny model)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_allow_untested_optimizer": True,  # a torch AdamW: DeepSpeed's CPU Adam is a C++ op not built here
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
    }


def external_parameters(model: nn.Module) -> dict[str, list[str]]:
    """ZeRO-3's external parameters, by module: weights a module's forward read that are not its own, found by
    DeepSpeed during the forward and gathered for all of that module's forward."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for name, module in model.named_modules():
        params = [names[id(p)] for _, p in getattr(module, "ds_external_parameters", list)()]
        if params:
            found[name] = sorted(params)
    return found


def gather_weights(model: nn.Module, engine: str) -> dict[str, torch.Tensor]:
    """Every weight in full, on every rank (collectives: every rank calls this)."""
    named = list(model.named_parameters())
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().float().clone().contiguous() for n, p in named}
    if engine == "fsdp2":
        return {n: p.full_tensor().detach().float().contiguous() for n, p in named}
    return {n: p.detach().float().clone().contiguous() for n, p in named}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=["single", "zero3", "fsdp2"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--checkpointing", default="default", choices=["default", "reentrant", "non-reentrant", "off"])
    parser.add_argument("--no-dummy-image", action="store_true", help="text-only ranks skip the tower")
    parser.add_argument("--collective-timeout", type=float, default=COLLECTIVE_TIMEOUT_S)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    run(args.engine, args.out, args.dtype, args.checkpointing, not args.no_dummy_image, args.collective_timeout)


if __name__ == "__main__":
    main()
