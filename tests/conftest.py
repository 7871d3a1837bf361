"""The suite's fixtures (the shared helpers are in ``tests/helpers``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from hevc_vit import HEVCViTPackingModel
from tests.helpers import FIXTURES, write_image

# The tests expect dtype "auto" to mean float32 on the CPU, which a CPU where bf16 measures faster would make
# bfloat16: pin it for the suite and the processes it starts (torchrun). tests/test_devices.py checks the rule
# itself, both ways.
os.environ.setdefault("HEVC_VIT_CPU_DTYPE", "float32")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The suite's models are tiny: their matmuls gain nothing from a second intra-op thread, and on a shared CPU
    they lose much to it (measured at load ~6 on 2 cores: tests/llava/test_towers.py and tests/test_model.py took
    45 s with 2 threads, 15 s with 1). ``HEVC_VIT_TEST_THREADS`` sets another count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("HEVC_VIT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny matmuls only contend on a shared CPU (measured 30x slower with 2
    threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_sidecar_warning():
    """Silence the warning about descriptive keys in the legacy fixture's side-car JSON."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not HEVC ViT hyper-parameters")
        yield


@pytest.fixture
def quiet_transformers():
    """transformers' loading reports (missing / unexpected keys, notes) off for a test: they are asserted on."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(70, 42), (100, 30), (56, 56), (41, 97), (30, 30), (90, 60)]):
        write_image(root / f"{i}.png", w, h, i)
    return root


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def small_matmul_peak(monkeypatch):
    """The benchmark's matmul peak measured on 256 x 256 products: the 2048 x 2048 default (10 products per dtype,
    before and after the timing) is most of a tiny benchmark's time on a CPU, and the report's arithmetic is the
    same whatever the size (the default size is what ``hevc-vit bench`` itself runs)."""
    import hevc_vit.bench as bench
    import hevc_vit.bench.dtypes as dtypes
    from hevc_vit.bench.measure import matmul_peak_flops

    def small(device, dtype=torch.bfloat16, n=None, iters=10):
        return matmul_peak_flops(device, dtype, n=256, iters=3)

    monkeypatch.setattr(bench, "matmul_peak_flops", small)
    monkeypatch.setattr(dtypes, "matmul_peak_flops", small)


# Parametrized tests whose cases each take a few hundred ms: the fast core (-m "not slow ...") runs their first case,
# the full suite runs them all. One place, so that what the fast core leaves out is visible.
FAST_CORE_RUNS_FIRST_CASE_ONLY = {
    "tests/llava/test_llava_checkpoints.py::test_from_pretrained_restores_the_tower_or_refuses",
    "tests/llava/test_llava_checkpoints.py::test_load_state_dict_restores_the_tower",
    "tests/llava/test_towers.py::test_every_select_feature_against_the_encoder",
    "tests/llava/test_towers.py::test_select_layer_minus_2_matches_golden",
    "tests/seams/test_durability.py::test_a_full_disk_in_any_format_ends_with_one_line_and_resumes",
    "tests/seams/test_durability.py::test_a_fixed_failure_resumed_has_one_ok_row_and_the_summary_agrees",
    "tests/seams/test_processes.py::test_whatever_stops_a_run_leaves_an_index_of_what_it_wrote",
    "tests/convert/test_convert.py::test_an_error_inside_the_commit_is_finished_by_the_run_itself",
    "tests/codec/assets/test_frames.py::test_prepare_square_matches_the_reference_within_one_level",
    "tests/encode/readers/test_expand.py::test_every_source_gives_the_features_and_rows_of_loose_files",
    "tests/encode/output/test_folder.py::test_resume_on_a_damaged_folder_says_what_and_what_to_do",
    "tests/encode/output/test_folder.py::test_a_full_disk_ends_the_run_with_one_line_and_resume_continues",
}


def pytest_collection_modifyitems(config, items):
    seen: set[str] = set()
    for item in items:
        function = item.nodeid.split("[", 1)[0]
        if function in FAST_CORE_RUNS_FIRST_CASE_ONLY and "[" in item.nodeid:
            if function in seen:
                item.add_marker(pytest.mark.slow)
            seen.add(function)
    files = {item.nodeid.split("::", 1)[0] for item in items}
    stale = {name for name in FAST_CORE_RUNS_FIRST_CASE_ONLY - seen if name.split("::", 1)[0] in files}
    if stale and not config.option.keyword:  # its file was collected whole, and the test was not in it
        raise pytest.UsageError(f"FAST_CORE_RUNS_FIRST_CASE_ONLY names tests that are gone: {sorted(stale)}")
