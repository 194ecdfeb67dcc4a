"""The GPU benchmark's CPU smoke mode, so the script cannot rot while no GPU is at hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_step_tiny_runs_every_phase_and_the_micro_batch_probe(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "step.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--tiny", "--device", "cpu",
                             "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert list(phases) == ["generate", "reference", "coherence", "update"]
    assert all(p["seconds"] > 0 for p in phases.values())  # unrounded, so any real work is > 0
    assert report["step_seconds"] == pytest.approx(sum(p["seconds"] for p in phases.values()), rel=1e-12)
    assert 0 < report["completion_tokens"] <= 2 * 2 * 12  # 2 prompts x G = 2 x 12 new tokens at most
    assert report["generate_tokens_per_s"] == pytest.approx(report["completion_tokens"] / phases["generate"]["seconds"])
    # --tiny sets no time budget and the CPU raises no CUDA out-of-memory, so the probe doubles 1 -> 8
    # whatever the machine's speed
    assert [p["micro_batch"] for p in report["probe"]] == [1, 2, 4, 8]
    assert report["largest_micro_batch"] == 8 and report["probe_limit"] == "--max-probe 8 reached"
    assert "largest coherence micro-batch that fits: 8 (--max-probe 8 reached)" in result.stdout
    assert report["segment_tokens"]["answer"] >= 1 and report["segment_tokens"]["prompt"] == 16 + 6


@pytest.mark.parametrize("which", ["update", "scorer"])
def test_logprob_memory_compares_full_and_chunked_passes_with_equal_results(which):
    """At a vocabulary where 2 x 300 scored tokens take two chunks, both variants run in their own
    process and give the same log-probs (update) or gradients (scorer)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "logprob_memory.py"), "--pass", which,
                             "--vocab", "40000", "--hidden", "16", "--batch", "2", "--tokens", "300"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    full, chunked = (float(part.split()[-1]) for part in last.split(":", 1)[1].split(","))
    assert full == pytest.approx(chunked, rel=1e-5) and full != 0, last
