"""What a new user meets in the first hour: the quickstart, validate, predict and export print no warning
and no noise we can avoid, leave no empty run folder, and write a portable, documented adapter with normal
file permissions; training from one's own file keeps the prompts the embedded model expects, and prompts
that do not end as it expects are reported with the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cepo.cli import main
from helpers import runs

ROOT = runs.ROOT
SMALL = ["--data.prompts_per_step", "4", "--data.eval_batch_size", "8", "--model.init_args.group_size", "4",
         "--model.init_args.micro_batch_size", "8", "--trainer.limit_val_batches", "1",
         "--trainer.limit_predict_batches", "1"]
# Lines that would mean noise is back: warnings of any kind, Lightning's epoch counter and version number,
# its logger advertisement, checkpoint-loading notices, transformers' generation-flag complaint and
# weight-loading progress bars.
NOISE = re.compile(r"Warning|warn\(|Epoch 0/|v_num|💡|weights_only|generation flags|Loading weights|Writing model")


def cepo(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    result = subprocess.run([sys.executable, "-m", "cepo", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_quickstart_validate_predict_export_are_quiet_and_tidy(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    out = cepo(tmp_path, "fit", "--config", "configs/quickstart.yaml", *SMALL, "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "2")
    assert not NOISE.findall(out), [line for line in out.splitlines() if NOISE.search(line)]
    assert "Rollout steps" in out
    # The quickstart validates before the first rollout too: step 0 is in the results file.
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    steps = {json.loads(line)["rollout_step"] for line in (run_dir / "val_results.jsonl").read_text().splitlines()}
    assert steps == {0, 2}

    ckpt = "runs/quickstart/version_0/checkpoints/last.ckpt"
    out = cepo(tmp_path, "validate", "--config", "configs/quickstart.yaml", *SMALL, "--ckpt_path", ckpt)
    assert not NOISE.findall(out), [line for line in out.splitlines() if NOISE.search(line)]
    assert out.count("val results") == 1 and "Validate metric" not in out and "DataLoader" not in out

    folders = set((tmp_path / "runs" / "quickstart").iterdir())
    out = cepo(tmp_path, "predict", "--config", "configs/quickstart.yaml", *SMALL, "--ckpt_path", ckpt,
               "--prediction.output", "answers.jsonl")
    out += cepo(tmp_path, "export", "--config", "configs/quickstart.yaml", "--ckpt_path", ckpt)
    assert not NOISE.findall(out), [line for line in out.splitlines() if NOISE.search(line)]
    assert set((tmp_path / "runs" / "quickstart").iterdir()) == folders, "predict/export left a run folder"
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 24

    # The adapter: portable base model name, a real card, files as readable as any other output.
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded:tiny-shortcut-llama"
    card = (adapter / "README.md").read_text()
    for fact in ("LoRA adapter for embedded:tiny-shortcut-llama", "grpo, trained for 2 rollout steps",
                 "accuracy: weight 1", "PeftModel.from_pretrained", "At rollout step 2"):
        assert fact in card, fact
    umask = os.umask(0)
    os.umask(umask)
    for folder in (adapter, run_dir / "checkpoints" / "last-merged"):
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path

    # Loading it as the card says gives the trained policy (the merged export holds the same weights).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cepo.policy.loading import resolve_model_path

    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model_path(config["base_model_name_or_path"])), str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "last-merged").eval()
    ids = torch.tensor([[30, 31, 32, 33, 34]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture()
def cli_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cepo"])


def own_file_run(tmp_path, path: Path):
    args = runs.small_run_args(tmp_path, "--config", str(ROOT / "examples" / "own_file.yaml"),
                               "--data.train.init_args.path", str(path), "--trainer.max_steps", "1",
                               "--trainer.limit_val_batches", "0")
    return main(["fit", *args])


@pytest.mark.slow
def test_training_from_the_example_file_keeps_the_prompts_as_written(tmp_path, cli_argv, recwarn):
    example = ROOT / "examples" / "shortcut_questions.jsonl"
    cli = own_file_run(tmp_path, example)
    questions = [json.loads(line)["question"] for line in example.read_text().splitlines()]
    source = cli.datamodule.train_source
    assert source.name == "my_questions" and [ex.question for ex in source.load()] == questions
    assert all(q.endswith("\n") for q in questions)
    assert not [w for w in recwarn if "do not end with" in str(w.message)]
    assert cli.model.rollout_step == 1


@pytest.mark.slow
def test_prompts_without_the_expected_newline_are_reported_with_the_fix(tmp_path, cli_argv):
    rows = [json.loads(line) for line in (ROOT / "examples" / "shortcut_questions.jsonl").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({**row, "question": row["question"].rstrip("\n")}) + "\n" for row in rows))
    with pytest.warns(UserWarning, match=r"4 of 4 prompts from 'bare' do not end with '\\n'.*End each question with"):
        own_file_run(tmp_path, bare)
