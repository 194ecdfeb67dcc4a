"""The analysis notebook runs end to end on the output of a tiny run, so it cannot rot."""

import json
from pathlib import Path

import pytest

from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"


def run_notebook(cwd: Path) -> tuple[str, int]:
    """Execute the notebook with Jupyter's working directory at ``cwd``: its text outputs and image count."""
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    text = "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", "")) + str(out.get("data", {}).get("text/html", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    images = sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))
    return text, images


@pytest.mark.slow
def test_analysis_notebook_executes_on_a_tiny_run(tmp_path, monkeypatch):
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    # A checkout as a user has it: pyproject.toml at the root, the runs under runs/, the notebook in notebooks/.
    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "cepo"\n')
    val = [{"class_path": "cepo.ShortcutTask", "init_args": {"split": s, "size": 4, "seed": 1}}
           for s in ("in_distribution", "flipped", "edited")]
    main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(ROOT / "configs" / "rewards" / "cepo.yaml"),
        "--config", str(ROOT / "configs" / "eval" / "diagnostics.yaml"),
        "--trainer.logger.init_args.save_dir", str(checkout / "runs"), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "1", "--trainer.log_every_n_steps", "1", "--data.prompts_per_step", "2",
        "--model.init_args.group_size", "2", "--model.init_args.micro_batch_size", "4", "--data.val", json.dumps(val),
    ])
    monkeypatch.delenv("CEPO_RUNS", raising=False)
    for cwd in (checkout / "notebooks", checkout):  # Jupyter started in notebooks/, or at the root
        text, images = run_notebook(cwd)
        assert "1 runs under" in text and str(checkout / "runs") in text
        # The quickstart validates before the first rollout: every accuracy curve starts at step 0.
        assert "validations at rollout steps 0, 1, 2" in text
        assert "flipped/cue" in text and "fused" in text  # the diagnostics table
        assert "p" in text and "in_distribution" in text  # the accuracy-vs-robustness table
        assert "scatter axes: x 0 to 1, y 0 to 1" in text  # accuracies: the axes stop at 1
        assert images >= 4  # reward, accuracy per split, channels, accuracy vs robustness
