"""Training the tower across ranks: a tiny LLaVA-like model (tower trainable, gradient checkpointing on, the
recipe's two learning rates and max_grad_norm) trained 3 steps under DeepSpeed ZeRO-3 and under FSDP2 on 2 CPU
ranks (gloo) equals one process trained on the union of the ranks' samples.

The ranks are uneven on purpose: a video with explicit patch positions (4 frames over a 64-frame context) against a
text-only sample (the fork's dummy image, its features entering x0, so every rank runs the tower), two images
against one, text only against a video and an image. Every rank process has a deadline and every collective a
timeout: a hang fails the test with the ranks' logs. See ``tests/helpers/train_ranks.py`` for the loss
normalisation that makes the runs comparable.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hevc_vit.checkpoints.pretrained import TRANSFORMERS_LOADS_FOLDERS
from tests.helpers import RTOL, subprocess_env
from tests.helpers.train_ranks import LR, STEPS, TOWER_LR

ROOT = Path(__file__).resolve().parents[2]
RANK_DEADLINE_S = 180  # a rank still running after this is hung (a run takes ~15 s on 2 busy cores)
TOWER = "model.vision_tower."

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(engine: str, out: Path, world: int, *extra: str, deadline_s: float = RANK_DEADLINE_S) -> dict:
    """Start ``world`` rank processes of ``tests.helpers.train_ranks``; wait for all of them, each under
    ``deadline_s``; fail with every rank's log if one fails or hangs. Returns rank 0's result."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"}  # fmt: skip
        log = out.parent / f"{out.name}.rank{rank}.log"
        logs.append(log)
        with open(log, "w") as f:
            command = [sys.executable, "-m", "tests.helpers.train_ranks", "--engine", engine, "--out", str(out), *extra]
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + deadline_s
    failure = None
    while failure is None and any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            failure = f"rank {failed[0]} exited with {procs[failed[0]].returncode}"
        elif time.monotonic() > deadline:
            hung = [r for r, p in enumerate(procs) if p.poll() is None]
            failure = f"ranks {hung} still running after {deadline_s} s (hung)"
        else:
            time.sleep(0.2)
    for p in procs:  # the processes this test started, by their handles
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
    if failure is None and any(p.returncode != 0 for p in procs):
        failure = f"exit codes {[p.returncode for p in procs]}"
    if failure is not None:
        tails = "\n".join(f"--- rank {r} ---\n{log.read_text()[-4000:]}" for r, log in enumerate(logs))
        pytest.fail(f"{engine}: {failure}\n{tails}")
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the union of both ranks' samples per step: result, final and initial weights."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = train("single", out, 1)
    return result, load_file(out / "weights.safetensors"), load_file(out / "initial.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a if n.startswith(prefix))


ENGINES = [  # both checkpointing kinds, whichever transformers runs (its default: 4.x reentrant, 5.x not)
    pytest.param("zero3", ["--checkpointing", "reentrant"], id="zero3"),  # the recipe: HF Trainer under 4.x
    pytest.param("fsdp2", ["--checkpointing", "non-reentrant"], id="fsdp2"),  # what FSDP2 documents
    # the recipe's bf16 (fp32 master weights in the optimizer): the same run, within bf16's precision
    pytest.param("zero3", ["--checkpointing", "reentrant", "--dtype", "bf16"], id="zero3-bf16"),
]


@pytest.mark.parametrize("engine, extra", ENGINES)
def test_two_ranks_train_the_tower_as_one_process_on_the_union(single, tmp_path, engine, extra):
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed (the 'test' extra) is not installed")
    want, want_weights, initial = single
    got = train(engine, tmp_path / "run", 2, *extra)
    got_weights = load_file(tmp_path / "run" / "weights.safetensors")
    # the run really shards: every parameter partitioned (ZeRO-3: shape [0] outside forward) or a DTensor
    assert got["sharded"] == got["parameters"] == len(want_weights)
    if engine == "zero3":
        # the recipe's path: with the HF Trainer's HfDeepSpeedConfig, from_pretrained builds the tower under
        # zero.Init — every tower weight partitioned from construction on, the checkpoint loaded into the shards
        # (the losses and weights below check what loaded). That is transformers' loader; under 4.x ours loads
        # the tower whole (on the meta device, then assigned), and deepspeed.initialize partitions it.
        tower = sorted(n for n in want_weights if n.startswith(TOWER)) if TRANSFORMERS_LOADS_FOLDERS else []
        assert sorted(n for n in got["partitioned_at_build"] if n.startswith(TOWER)) == tower
        # no tower weight is read outside its own module's forward (ZeRO-3 would gather it for a whole enclosing
        # module), but the pooling head's reads of its attention's in_proj, as that attention's forward is not run
        head = f"{TOWER}head"
        assert got["external"] == {head: [f"{head}.attention.in_proj_bias", f"{head}.attention.in_proj_weight"]}
    assert got["tokens"] == want["tokens"]  # the same label tokens, split across ranks
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], want["losses"]))
    norm_diff = max(abs(a - b) / b for a, b in zip(got["grad_norms"], want["grad_norms"]))
    tower_diff, all_diff = max_diff(got_weights, want_weights, TOWER), max_diff(got_weights, want_weights)
    tower_moved = max_diff(want_weights, initial, TOWER)
    print(
        f"\n{engine} {extra}: losses {got['losses']} (single {want['losses']}, max diff {loss_diff:.2e}); "
        f"grad norms {got['grad_norms']} (single {want['grad_norms']}, max rel diff {norm_diff:.2e}); "
        f"max |w - w_single| tower {tower_diff:.2e}, all {all_diff:.2e}; tower moved up to {tower_moved:.2e}"
    )
    if "bf16" in extra:  # against the fp32 run: bf16's tolerance. The weights are not compared: stored in bf16,
        # a weight near 1 has a step of 2**-8, above what 3 steps at these learning rates move it
        assert loss_diff <= RTOL[torch.bfloat16] * max(want["losses"])
        assert norm_diff <= RTOL[torch.bfloat16]  # a sum over ranks instead of a mean would still double it
        return
    # fp32: one process and two ranks sum the same terms in another order (~1e-7 relative)
    assert loss_diff <= 1e-5 * max(want["losses"])
    # the global norm (before clipping) is the scale of the averaged gradient: a sum over ranks instead of a
    # mean would double it, where Adam and clipping would hide it in the weights
    assert norm_diff <= 1e-5
    # AdamW moves a weight by at most ~lr per step whatever the gradient's scale, so a rank's gradient lost or
    # its direction wrong shows at the scale of lr; fp32 reordering noise stays far below lr / 20
    assert tower_moved >= STEPS * TOWER_LR / 2, "the tower did not train: the comparison would be empty"
    assert tower_diff <= TOWER_LR / 20
    assert all_diff <= LR / 20


def test_gradient_checkpointing_recomputes_the_same_training(single, tmp_path):
    """The reference run checkpoints the tower's and the LM's layers; without checkpointing it is the same run
    (the recomputation in backward sees the same plan, positions and weights)."""
    want, want_weights, _ = single
    got = train("single", tmp_path / "run", 1, "--checkpointing", "off")
    got_weights = load_file(tmp_path / "run" / "weights.safetensors")
    assert max(abs(a - b) for a, b in zip(got["losses"], want["losses"])) <= 1e-6 * max(want["losses"])
    assert max(abs(a - b) / b for a, b in zip(got["grad_norms"], want["grad_norms"])) <= 1e-6
    assert max_diff(got_weights, want_weights) <= LR / 100


def test_without_the_dummy_image_the_ranks_fail_within_the_bound(tmp_path):
    """Why the zero-image convention: a text-only rank that skips the tower leaves ZeRO-3's gathers of the tower's
    weights unmatched. The run must end — an error or the deadline — with the ranks' logs, never hang the suite."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed (the 'test' extra) is not installed")
    extra = ["--checkpointing", "reentrant", "--no-dummy-image", "--collective-timeout", "20"]
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"zero3: (rank \d exited with|ranks .* still running)") as info:
        train("zero3", tmp_path / "run", 2, *extra, deadline_s=90)
    print(f"\nwithout the dummy image, after {time.monotonic() - started:.0f} s: {str(info.value).splitlines()[0]}")
    assert "--- rank 0 ---" in str(info.value) and "--- rank 1 ---" in str(info.value)
