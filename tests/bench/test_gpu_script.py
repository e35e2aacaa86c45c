"""scripts/gpu-checks.sh and bench/gpu.py are what a short GPU lease runs, so they have to work the first time.
Here on the CPU the script runs all its parts (the GPU-only tests, which pass or skip here, bench/gpu.py,
which runs its --small sizes on a CPU, and the GPU training rows, which say why they are skipped), and
bench/gpu.py goes through every section (the correctness checks against their references, attention,
training eager and compiled, the KV-cache sizing, packed prefill and every serving configuration): each must
finish without an error and with figures that hold on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-checks")
    run = subprocess.run([str(ROOT / "scripts" / "gpu-checks.sh"), str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "3 parts, 0 failed" in run.stdout
    return out


@pytest.fixture(scope="module")
def results(out) -> dict:
    return json.loads((out / "gpu.json").read_text())


def test_every_part_leaves_its_log(out):
    assert " passed" in (out / "tests.log").read_text()
    assert "GPU rows skipped: no CUDA device here" in (out / "train.log").read_text()
    assert "train_d2_compiled" in (out / "gpu.log").read_text()


def test_a_part_past_its_limit_is_stopped_and_counted(tmp_path):
    run = subprocess.run([str(ROOT / "scripts" / "gpu-checks.sh"), str(tmp_path), "tests", "nonsense"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable, "TESTS_S": "1"})  # pytest starts slower
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert "tests: stopped at its limit of 1s" in run.stdout and "unknown part 'nonsense'" in run.stderr


def test_the_figures_are_written_after_each_section(tmp_path):
    path = tmp_path / "results.json"
    results = gpu.Results(path, device="cpu")
    gpu.section("first", results, lambda: {"x": 1})
    assert json.loads(path.read_text()) == {"device": "cpu", "first": {"x": 1}}
    gpu.section("broken", results, lambda: 1 / 0)
    assert json.loads(path.read_text())["broken"] == {"error": "ZeroDivisionError: division by zero"}


def test_no_section_fails(results):
    failed = {name: value["error"] for name, value in results.items() if isinstance(value, dict) and "error" in value}
    assert not failed, failed
    expected = {"forward", "kv_cache", "paged", "train_step", "attention_window", "train_d2", "train_d2_compiled",
                "kv_cache_memory", "prefill_d2_packed_vs_padded"}
    assert expected <= set(results), expected - set(results)
    assert sum(name.startswith("serve_d2_") for name in results) == 7, "every serving configuration has its row"


def test_the_correctness_checks_hold(results):
    """float32 paths agree with their references to float32's precision; bfloat16 serving to bfloat16's."""
    assert results["forward"]["forward_fp32_vs_fp64"] < 1e-4
    assert results["kv_cache"]["kv_cache_fp32_vs_full"] < 1e-5
    paged = results["paged"]
    assert all(error < 1e-5 for name, error in paged.items() if "float32" in name), paged
    assert all(error < 0.05 for name, error in paged.items() if "bfloat16" in name), paged
    assert results["train_step"]["train_loss_rel_diff"] < 1e-5
    assert results["train_step"]["train_update_vs_cpu_fp32"] < 1e-4


def test_the_throughput_rows_measure_what_they_say(results):
    for name, row in results.items():
        if name.startswith("serve_d2_"):
            assert row["output_tokens"] == row["requests"] * row["max_tokens"], name
            assert row["output_tokens_per_second"] > 0 and row["single_request_decode_bytes_per_step"] > 0, name
    for name in ("train_d2", "train_d2_compiled"):
        assert results[name]["tokens_per_second"] > 0 and results[name]["loss"] > 0, name
    assert 0.9 < results["kv_cache_memory"]["again_over_first"] < 1.1
    for case in results["prefill_d2_packed_vs_padded"].values():
        assert case["tokens"] == sum(case["lengths"]) and case["padded_tokens"] == len(case["lengths"]) * max(case["lengths"])
