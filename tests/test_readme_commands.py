"""The README's predict, export and coherence-override commands, run as written (plus size limits) in a
fresh working directory, in the order a user would type them."""

import io
import json
import shlex
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from cepo.cli import main
from cepo.training.coherence_callback import CoherenceRewardCallback

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CKPT = "runs/quickstart/version_0/checkpoints/last.ckpt"
FIT_MERGED = "cepo fit --config configs/quickstart.yaml --merge.at_fit_end true"
EXPORT = f"cepo export --config configs/quickstart.yaml --ckpt_path {CKPT}"
PREDICT = f"cepo predict --config configs/quickstart.yaml --ckpt_path {CKPT}"
PREDICT_FILE = (f"cepo predict --config configs/quickstart.yaml --ckpt_path {CKPT} --data.predict+=cepo.PromptFile "
                "--data.predict.path questions.jsonl --prediction.output answers.jsonl --prediction.coherence true")
PREDICT_STDIN = ("""printf '%s\\n' '{"question": "Q: 7+5-3 hint: 9\\n", "answer": "9"}' | cepo predict --config """
                 "configs/quickstart.yaml --model.init_args.policy.adapter_path runs/quickstart/version_0/adapter "
                 "--data.predict+=cepo.PromptFile --prediction.output - --trainer.enable_progress_bar false")
OVERRIDE = ("cepo fit --config configs/quickstart.yaml --config configs/rewards/cepo.yaml "
            "--trainer.callbacks.scorer.num_counterfactuals 2 --trainer.callbacks.network policy "
            "--trainer.callbacks.weight_zx 0.2 --trainer.callbacks.weight_xy 0.1 --trainer.callbacks.weight_zy 0.05")
CALLBACK_HELP = "cepo fit --trainer.callbacks.help CoherenceRewardCallback"
SMALL = ["--data.prompts_per_step", "4", "--data.eval_batch_size", "8", "--model.init_args.group_size", "4",
         "--model.init_args.micro_batch_size", "8", "--trainer.limit_val_batches", "1",
         "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false"]
SMALL_FIT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


def run(command: str, *extra: str):
    words = shlex.split(command)
    assert words[0] == "cepo"
    return main([*words[1:], *extra])


def test_the_commands_are_the_readmes():
    for command in (FIT_MERGED, EXPORT, PREDICT, PREDICT_FILE, PREDICT_STDIN, OVERRIDE, CALLBACK_HELP):
        assert command in README, command


def test_readme_callback_help_lists_the_overridden_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(CALLBACK_HELP)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--trainer.callbacks.scorer", "--trainer.callbacks.network", "--trainer.callbacks.weight_zx",
                   "--trainer.callbacks.weight_xy", "--trainer.callbacks.weight_zy"):
        assert option in text, option


@pytest.mark.slow
def test_readme_predict_and_export_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    fit = run(FIT_MERGED, *SMALL, *SMALL_FIT)
    assert Path(fit.trainer.log_dir).resolve() == (tmp_path / "runs/quickstart/version_0").resolve()
    AutoModelForCausalLM.from_pretrained("runs/quickstart/version_0/merged")
    run(EXPORT)
    AutoModelForCausalLM.from_pretrained("runs/quickstart/version_0/checkpoints/last-merged")

    predicted = run(PREDICT, *SMALL)
    records = [json.loads(line) for line in (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in records} == {"in_distribution", "flipped", "edited"}

    (tmp_path / "questions.jsonl").write_text('{"question": "Q: 7+5-3 hint: 9\\n", "answer": "9"}\n'
                                               '{"question": "Q: 2+6-1 hint: 7\\n"}\n')
    run(PREDICT_FILE, *SMALL)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [("correct" in a, "coherence_zy" in a) for a in answers] == [(True, True), (False, True)]

    shell_input, command = PREDICT_STDIN.split(" | ")
    line = shlex.split(shell_input)[2]  # printf '%s\n' LINE
    monkeypatch.setattr("sys.stdin", io.StringIO(line + "\n"))
    capsys.readouterr()
    run(command, *SMALL)
    (answer,) = [json.loads(out) for out in capsys.readouterr().out.splitlines() if out.startswith("{")]
    assert answer["question"] == "Q: 7+5-3 hint: 9\n" and answer["gold"] == ["9"]
    # The adapter written at the end of fit holds last.ckpt's weights: the same greedy answer as from the file
    # (both questions have the same length, so batching adds no padding).
    assert answer["completion"] == answers[0]["completion"] and answer["correct"] == answers[0]["correct"]


@pytest.mark.slow
def test_readme_coherence_override_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    cli = run(OVERRIDE, *SMALL, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
    assert callback.scorer.num_counterfactuals == 2
    assert callback.network == "policy"
    assert callback.weights == {"zx": 0.2, "xy": 0.1, "zy": 0.05}
    assert float(cli.trainer.callback_metrics["train/rewards/coherence_zy_mean"]) >= 0.005 - 1e-6
