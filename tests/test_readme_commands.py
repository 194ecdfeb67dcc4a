"""Every command the README and the documentation pages (docs/) show is checked. The short ones (predict, export, the coherence override, the
help pages, validate / test / resume on a checkpoint) are run as written, with size limits appended (SMALL,
SMALL_FIT), in a fresh working directory, in the order a user would type them. The long-running ones (full
training runs, hub models, GPU runs, benchmarks, the experiment grid) are parsed: a ``cepo`` line with
``--print_config`` appended must exit 0, which checks every option and config file it names; a script's
argument parser must accept the line's options. A README command in neither list fails the test."""

import argparse
import io
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from cepo.cli import main
from cepo.training.coherence_callback import CoherenceRewardCallback

ROOT = Path(__file__).resolve().parents[1]
# The README and every page of the documentation site, as one text.
README = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
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
SCORER_HELP = ("cepo fit --config configs/quickstart.yaml --config configs/rewards/cepo.yaml "
               "--trainer.callbacks.scorer.help CoherenceScorer")
FIT_HELP = "cepo fit --help"
MODEL_HELP = "cepo fit --model.help GRPO"
PRINT_CONFIG = "cepo fit --config configs/quickstart.yaml --print_config"
VALIDATE = f"cepo validate --config configs/quickstart.yaml --ckpt_path {CKPT}"
TEST = f"cepo test --config configs/quickstart.yaml --ckpt_path {CKPT}"
RESUME = f"cepo fit --config configs/quickstart.yaml --ckpt_path {CKPT} --trainer.max_steps 120"
SMALL = ["--data.prompts_per_step", "4", "--data.eval_batch_size", "8", "--model.init_args.group_size", "4",
         "--model.init_args.micro_batch_size", "8", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1",
         "--trainer.enable_progress_bar", "false"]
SMALL_FIT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]

# Run by the tests below (the stdin example: its `cepo predict` part, fed the printf line).
RUN = [FIT_MERGED, EXPORT, PREDICT, PREDICT_FILE, PREDICT_STDIN.split(" | ")[1], OVERRIDE, CALLBACK_HELP, SCORER_HELP,
       FIT_HELP, MODEL_HELP, PRINT_CONFIG, VALIDATE, TEST, RESUME]
# Too long for the suite, or needing the hub or a GPU: parsed only.
PARSED = [
    "cepo fit --config configs/quickstart.yaml",
    "cepo fit --config configs/quickstart.yaml --config configs/rewards/cepo.yaml",
    "cepo fit --config configs/quickstart.yaml --config configs/algorithms/ppo.yaml",
    "cepo fit --config configs/quickstart.yaml --config configs/algorithms/ppo.yaml --config configs/rewards/cepo.yaml",
    "cepo fit --config configs/quickstart.yaml --trainer.max_steps 200",
    "cepo fit --config configs/quickstart.yaml --model.init_args.policy.name_or_path Qwen/Qwen2.5-0.5B-Instruct "
    "--model.init_args.policy.lora.r 16 --model.init_args.policy.lora.target_modules '[q_proj,v_proj]' "
    "--model.init_args.prompt.use_chat_template true --trainer.precision bf16-mixed --trainer.accelerator gpu "
    "--trainer.devices 2 --trainer.strategy ddp",
    "cepo fit --config configs/quickstart.yaml --config configs/rewards/cepo.yaml "
    "--config configs/experiments/cepo_interventional.yaml",
    "cepo fit --config configs/quickstart.yaml --config configs/rewards/cepo.yaml --model.init_args.advantage.min_std 0.1",
    f"cepo test --config configs/quickstart.yaml --config configs/eval/paper_eval.yaml --ckpt_path {CKPT}",
    "cepo validate --config configs/quickstart.yaml --config configs/eval/gsm8k.yaml --ckpt_path <ckpt>",
    "cepo validate --config configs/quickstart.yaml",
    "cepo validate --config configs/quickstart.yaml --config configs/eval/shortcut_stress.yaml",
    "cepo validate --config configs/quickstart.yaml --config configs/rewards/cepo.yaml --config configs/eval/diagnostics.yaml",
    "cepo validate --config configs/quickstart.yaml --config configs/rewards/cepo.yaml "
    "--config configs/experiments/reward_diagnostics.yaml",
    "python -m cepo.assets.build_tiny_model",
    "cepo validate --config configs/quickstart_hard.yaml --config configs/rewards/cepo.yaml "
    "--config configs/eval/diagnostics_hard.yaml",
    "python -m cepo.experiments.grid",
    "python -m cepo.experiments.grid --arms accuracy_only,cepo --seeds 0",
    "python -m cepo.experiments.grid --jobs 2",
    "python -m cepo.experiments.grid --grid configs/experiments/hard_grid.yaml --out runs/hard_grid --jobs 2 --order seed",
    "python benchmarks/coherence_speed.py --rollouts 16 --k 4 --repeats 5 --threads 2",
    "python benchmarks/cepo_overhead.py --threads 1 --rounds 3 --steps 8",
    "python benchmarks/cepo_overhead.py --error-only",
    "python benchmarks/scaling.py --threads 1 --rounds 1 --steps 1 --warmup 1",
    "python benchmarks/scaling.py --memory-only",
    "python benchmarks/trl_compare.py --steps 6 --rounds 2",
    "python benchmarks/logprob_memory.py --tokens 256 --repeats 2",
    "python benchmarks/logprob_memory.py --pass scorer --batch 4 --tokens 256 --repeats 2",
    "python benchmarks/gpu_step.py",
    "python benchmarks/plot_grid.py --results runs/grid/results.json --out runs/grid/tradeoff.png",
    # docs/getting-started.md: training from a file (run briefly by tests/test_first_hour.py)
    "cepo fit --config configs/quickstart.yaml --config examples/own_file.yaml",
    # docs/logging.md: the loggers (run end to end, offline, by tests/test_loggers.py)
    "cepo fit --config configs/quickstart.yaml --trainer.logger lightning.pytorch.loggers.CSVLogger "
    "--trainer.logger.init_args.save_dir runs",
    "cepo fit --config configs/quickstart.yaml --trainer.logger lightning.pytorch.loggers.WandbLogger "
    "--trainer.logger.init_args.project cepo",
    "cepo fit --config configs/quickstart.yaml --trainer.logger lightning.pytorch.loggers.MLFlowLogger "
    "--trainer.logger.init_args.tracking_uri sqlite:///mlflow.db",
    # docs/gpu.md: the memory model and the GPU run's configuration
    "python benchmarks/memory_model.py",
    "python benchmarks/memory_model.py --mode bfloat16",
    "python benchmarks/memory_model.py --breakdown 1.5B 512",
    "python benchmarks/memory_model.py --measure --threads 1",
    "python benchmarks/gpu_step.py --shape 1.5b --write-model FOLDER",
    "cepo fit --config configs/quickstart.yaml --config configs/experiments/gpu_1.5b_cepo.yaml",
]
# The other shell commands of the ```bash blocks: set-up steps (run by .ci/run and a fresh clone), the
# printf that feeds the stdin example, and Jupyter. Each is checked below: extras exist, the torch pin is
# the one pyproject allows.
SETUP = [
    "python3 -m venv .venv",
    ". .venv/bin/activate",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
    "pip install -e .",
    'pip install -e ".[test]"',
    'pip install -e ".[notebook]" jupyterlab',
    "python -m pytest -q",
    "jupyter lab notebooks/analysis.ipynb",
    PREDICT_STDIN.split(" | ")[0],
    # docs/gpu.md: the prepared GPU run (needs a GPU machine; its policy loading is tests/test_config_models.py's)
    "bash benchmarks/gpu_run.sh --fetch-wheels",
    "OUT=runs/gpu bash benchmarks/gpu_run.sh",
]
COMMAND = re.compile(r"(?:cepo [a-z]|python -m cepo(?:\.[\w.]+)?(?: |$)|python benchmarks/).*")


def normalise(command: str) -> str:
    return " ".join(command.split())


def shell_parts(readme: str = README) -> set[str]:
    """Every command of every line of a ```bash block (continuations joined, comments dropped, split at
    ``&&`` and ``|``)."""
    found = set()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#\s.*$", "", line)
            found |= {normalise(part) for part in re.split(r"\s(?:&&|\|)\s", line) if part.strip()}
    return found


def readme_commands(readme: str = README) -> set[str]:
    """The commands in the README: every ``cepo`` / ``python -m cepo...`` / ``python benchmarks/...`` part of a
    line in a ```bash block (continuations joined, comments dropped, split at ``&&`` and ``|``), and every
    inline `code` span that is such a command with options (or a script), except ``...`` placeholders and
    bare subcommand names in the prose (`cepo fit`)."""
    found = {part for part in shell_parts(readme) if COMMAND.fullmatch(part)}
    for span in re.findall(r"`([^`\n]+)`", readme):
        if COMMAND.fullmatch(span) and "..." not in span and (not span.startswith("cepo ") or " --" in span):
            found.add(normalise(span))
    return found


def test_every_readme_command_is_run_or_parsed():
    checked = {normalise(c) for c in RUN + PARSED}
    commands = readme_commands()
    assert not commands - checked, f"README commands neither run nor parsed by a test: {sorted(commands - checked)}"
    assert not checked - commands, f"listed here but no longer in the README: {sorted(checked - commands)}"
    assert len(RUN) + len(PARSED) == len(checked)  # each command in one list only


def test_every_other_shell_command_is_a_known_set_up_step():
    others = {part for part in shell_parts() if not COMMAND.fullmatch(part)}
    assert others == {normalise(c) for c in SETUP}, f"unchecked shell commands: {sorted(others - set(SETUP))}"
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for command in SETUP:
        for extras in re.findall(r'-e "\.\[([\w,]+)\]"', command):
            assert set(extras.split(",")) <= set(project["optional-dependencies"]), command
        pin = re.search(r"torch==([\d.]+)", command)
        if pin:
            from packaging.requirements import Requirement

            torch = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
            assert torch.specifier.contains(pin.group(1)), command


def test_readme_commands_are_found_in_blocks_and_spans():
    text = ("```bash\npip install x && cepo fit --config a.yaml \\\n  --trainer.max_steps 2   # comment\n"
            "printf 'x' | cepo predict --c b\n```\nrun `python benchmarks/x.py --k 2`, see `cepo fit` and `cepo ...`")
    assert readme_commands(text) == {"cepo fit --config a.yaml --trainer.max_steps 2", "cepo predict --c b",
                                     "python benchmarks/x.py --k 2"}


class Parsed(Exception):
    """Raised in place of running a script once its argument parser accepted the command line."""


def parse_only(command: str, monkeypatch) -> None:
    """``cepo`` lines: --print_config must exit 0; scripts: their argparse parser must accept the options."""
    words = shlex.split(command)
    if words[0] == "cepo":
        with pytest.raises(SystemExit) as exit_info:
            main([*words[1:], "--print_config"])
        assert exit_info.value.code in (0, None), command
        return
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "path", list(sys.path))
    if "--help" in words and words[1] != "-m":  # argparse prints the help and exits 0 before anything runs
        monkeypatch.setattr(sys, "argv", [words[1], *words[2:]])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")
        assert exit_info.value.code == 0, command
        return
    with pytest.raises(Parsed):
        if words[1] == "-m":
            monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
            runpy.run_module(words[2], run_name="__main__", alter_sys=True)
        else:
            monkeypatch.setattr(sys, "argv", [words[1], *words[2:]])
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")


def test_long_readme_commands_parse(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for command in PARSED:
        parse_only(command, monkeypatch)
        capsys.readouterr()
    # The check bites: an option that does not exist fails both kinds.
    with pytest.raises(AssertionError, match="no_such_option"):
        parse_only("cepo fit --config configs/quickstart.yaml --model.init_args.no_such_option 1", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        parse_only("python benchmarks/scaling.py --no-such-option", monkeypatch)
    assert exit_info.value.code == 2


def test_readme_help_and_print_config_commands(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for command, expected in ((FIT_HELP, "--trainer.max_steps"), (MODEL_HELP, "--model.group_size"),
                              (PRINT_CONFIG, "name_or_path: embedded:tiny-shortcut-llama")):
        with pytest.raises(SystemExit) as exit_info:
            run(command)
        assert exit_info.value.code in (0, None), command
        assert expected in capsys.readouterr().out, command


def run(command: str, *extra: str):
    words = shlex.split(command)
    assert words[0] == "cepo"
    return main([*words[1:], *extra])


def test_the_commands_are_the_readmes():
    for command in (FIT_MERGED, EXPORT, PREDICT, PREDICT_FILE, PREDICT_STDIN, OVERRIDE, CALLBACK_HELP, SCORER_HELP):
        assert command in README, command
    for command in (FIT_HELP, MODEL_HELP, PRINT_CONFIG, VALIDATE, TEST, RESUME):
        assert command in readme_commands(), command


def test_readme_callback_help_lists_the_overridden_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(CALLBACK_HELP)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--trainer.callbacks.scorer", "--trainer.callbacks.network", "--trainer.callbacks.weight_zx",
                   "--trainer.callbacks.weight_xy", "--trainer.callbacks.weight_zy"):
        assert option in text, option


def test_scorer_help_lists_the_number_of_counterfactuals(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        run(SCORER_HELP)
    assert exit_info.value.code == 0
    assert "--scorer.num_counterfactuals" in capsys.readouterr().out


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

    validated = run(VALIDATE, *SMALL)
    assert "val/in_distribution/accuracy" in validated.trainer.callback_metrics
    tested = run(TEST, *SMALL)
    assert "test/in_distribution/accuracy" in tested.trainer.callback_metrics
    resumed = run(RESUME, *SMALL, "--trainer.max_steps", "3")  # resume from step 2 for one more step
    assert resumed.trainer.global_step == 3 and resumed.model.rollout_step == 3


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
