"""The GPU benchmark's CPU smoke mode, so the script cannot rot while no GPU is at hand."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_step_tiny_runs_every_phase_and_the_micro_batch_probe():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--tiny", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(generate|reference|coherence|update|step)\s+([\d.]+)", out, re.M)}
    assert set(seconds) == {"generate", "reference", "coherence", "update", "step"}
    assert all(v > 0 for v in seconds.values())
    assert abs(seconds["step"] - sum(v for k, v in seconds.items() if k != "step")) < 0.02
    tokens = re.search(r"(\d+) tokens, (\d+) tokens/s", out)
    assert tokens and 0 < int(tokens.group(1)) <= 2 * 2 * 12  # 2 prompts x G = 2 x 12 new tokens at most
    assert "largest coherence micro-batch that fits: 8 (--max-probe 8 reached)" in out
