"""The CLI as a user runs it: separate processes, exit codes, and two-process DDP on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run(args, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def console_script() -> Path | None:
    """The ``cepo`` script of the environment running the tests: pip puts it next to the interpreter
    (``bin/`` or ``Scripts\\``), whether or not that folder is on PATH (a virtualenv used without
    activating it)."""
    folder = Path(sys.executable).parent
    for candidate in (folder / "cepo", folder / "cepo.exe", folder / "Scripts" / "cepo.exe"):
        if candidate.is_file():
            return candidate
    found = shutil.which("cepo")
    return Path(found) if found else None


def test_console_script_exits_zero():
    exe = console_script()
    assert exe is not None, (f"no `cepo` console script next to {sys.executable} or on PATH: install the "
                             "package with `pip install -e .` so that the script is created")
    result = run([str(exe), "fit", "--help"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--data.prompts_per_step" in result.stdout


@pytest.mark.slow
def test_two_process_ddp_fit_finishes_and_shards_the_data(tmp_path):
    # Every rank must run the same collectives; a rank-zero-only broadcast once hung this at fit end.
    result = run([
        sys.executable, "-m", "cepo", "fit", "--config", QUICKSTART,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--data.prompts_per_step", "4", "--data.eval_batch_size", "8",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "val_results.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in rows} == {"in_distribution", "flipped", "edited"}
    assert all(r["n"] == 16 for r in rows)  # 8 prompts on each of the two ranks
