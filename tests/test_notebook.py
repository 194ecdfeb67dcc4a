"""The analysis notebook runs end to end on the output of a tiny run, so it cannot rot."""

import json
from pathlib import Path

import pytest

from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"


@pytest.mark.slow
def test_analysis_notebook_executes_on_a_tiny_run(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    val = [{"class_path": "cepo.ShortcutTask", "init_args": {"split": s, "size": 4, "seed": 1}}
           for s in ("in_distribution", "flipped", "edited")]
    main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(ROOT / "configs" / "rewards" / "cepo.yaml"),
        "--config", str(ROOT / "configs" / "eval" / "diagnostics.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "1", "--trainer.log_every_n_steps", "1", "--data.prompts_per_step", "2",
        "--model.init_args.group_size", "2", "--model.init_args.micro_batch_size", "4", "--data.val", json.dumps(val),
    ])
    monkeypatch.setenv("CEPO_RUNS", str(tmp_path / "runs"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", "")) + str(out.get("data", {}).get("text/html", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "1 runs under" in text
    assert "flipped/cue" in text and "fused" in text  # the diagnostics table
    assert "p" in text and "in_distribution" in text  # the accuracy-vs-robustness table
    images = sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))
    assert images >= 4  # reward, accuracy per split, channels, accuracy vs robustness
