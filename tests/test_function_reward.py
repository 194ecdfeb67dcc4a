"""A reward written as a plain function (TRL's shape, ``f(completions, **columns) -> list[float]``) scores a
rollout exactly as the equivalent ``RewardFunction`` subclass does, is named after the function, receives
the columns TRL users expect, is configured from YAML, and has bad return values refused naming it."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cepo import AccuracyReward, CEPOModule, FunctionReward, PromptDataModule, RewardFunction
from cepo.answers.matching import answers_match
from cepo.cli import CEPOCLI, main
from cepo.data.example import Example
from cepo.records import Rollout

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
GSM8K = ROOT / "configs" / "gsm8k_qwen.yaml"
PAD = 0


def rollout() -> Rollout:
    """Two prompts x two samples; the completions' token ids are padded after the first EOS (id 2)."""
    first = Example("Q: 3+4 hint: 7", ("7",), "number", "shortcut", "a", {"cue": "7", "split": "train"})
    second = Example("Which is bigger, 2 or 5?", ("5",), "choice", "mc", "b", {"options": ["2", "5"]})
    examples = [first, first, second, second]
    completions = ["3+4=7 <answer>7</answer>", "copy <answer>9</answer>", "5>2 <answer>5</answer>", "<answer>2"]
    return Rollout(
        examples=examples,
        prompts=[f"[user] {ex.question} [assistant] " for ex in examples],
        completions=completions,
        rationales=["3+4=7", "copy", "5>2", ""],
        answers=["7", "9", "5", "2"],
        marker_found=torch.tensor([True, True, True, False]),
        group_size=2,
        prompt_ids=torch.ones(4, 3, dtype=torch.long),
        prompt_mask=torch.ones(4, 3, dtype=torch.long),
        completion_ids=torch.tensor([[5, 6, 2, PAD], [7, 2, PAD, PAD], [8, 9, 10, 2], [11, 12, 13, 14]]),
        completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
        truncated=torch.tensor([False, False, False, True]),
    )


# --- functions as a TRL user writes them (importable by path: this file's module name) ---------------------

def exact_match(completions, final_answers, gold, answer_kind, options, **kwargs):
    """The accuracy reward as a function of the columns."""
    return [float(answers_match(a, g, k, options=o)) for a, g, k, o in zip(final_answers, gold, answer_kind, options)]


def length_reward(completions, **kwargs):
    return [min(1.0, len(c) / 40) for c in completions]


def tokens_only(completion_ids):  # no **kwargs: receives only the column it names
    return [len(ids) / 4 for ids in completion_ids]


class LengthSubclass(RewardFunction):
    default_name = "length"

    def score(self, rollout):
        return torch.tensor([min(1.0, len(c) / 40) for c in rollout.completions])


def test_a_function_scores_as_the_equivalent_subclass():
    batch = rollout()
    torch.testing.assert_close(FunctionReward(exact_match)(batch), AccuracyReward()(batch))
    torch.testing.assert_close(FunctionReward(exact_match)(batch), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(FunctionReward(length_reward)(batch), LengthSubclass()(batch))
    # by hand: the completions have 24, 23, 22 and 9 characters
    torch.testing.assert_close(FunctionReward(length_reward)(batch), torch.tensor([24, 23, 22, 9]) / 40)
    # completion_ids stop at the mask (EOS included): 3, 2, 4 and 4 tokens
    torch.testing.assert_close(FunctionReward(tokens_only)(batch), torch.tensor([0.75, 0.5, 1.0, 1.0]))


def test_named_after_the_function_with_its_weight():
    reward = FunctionReward(length_reward, weight=0.2)
    assert (reward.name, reward.weight) == ("length_reward", 0.2)
    assert FunctionReward(length_reward, name="brevity").name == "brevity"
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        FunctionReward(length_reward, weight=-1.0)


def test_the_columns_a_function_receives():
    seen = {}

    def record(completions, **columns):
        seen.update(columns, completions=completions)
        return [0.5] * len(completions)

    batch = rollout()
    FunctionReward(record)(batch)
    assert seen["prompts"] == batch.prompts and seen["completions"] == batch.completions
    assert seen["completion_ids"] == [[5, 6, 2], [7, 2], [8, 9, 10, 2], [11, 12, 13, 14]]
    assert seen["gold"] == [("7",), ("7",), ("5",), ("5",)] and seen["question"][2] == "Which is bigger, 2 or 5?"
    assert seen["final_answers"] == ["7", "9", "5", "2"] and seen["rationales"][0] == "3+4=7"
    assert seen["marker_found"] == [True, True, True, False] and seen["truncated"] == [False, False, False, True]
    assert seen["answer_kind"] == ["number", "number", "choice", "choice"] and seen["id"] == ["a", "a", "b", "b"]
    # every meta field, one value per row, None where a row's record lacks it
    assert seen["cue"] == ["7", "7", None, None] and seen["options"] == [None, None, ["2", "5"], ["2", "5"]]


def missing_column(completions, solution):
    return [0.0] * len(completions)


def test_a_column_the_rollout_lacks_is_named():
    with pytest.raises(TypeError, match=r"missing_column.*needs the columns \['solution'\].*'gold'"):
        FunctionReward(missing_column)(rollout())


def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def with_nan(completions, **kwargs):
    return [0.5, math.nan, 0.5, 0.5]


def too_big(completions, **kwargs):
    return [0.5, 0.5, 1.5, 0.5]


def negative(completions, **kwargs):
    return [-0.1, 0.5, 0.5, 0.5]


def with_none(completions, **kwargs):
    return [0.5, None, 0.5, 0.5]


def nothing(completions, **kwargs):
    return None


def nested(completions, **kwargs):
    return [[0.5, 0.5]] * len(completions)


@pytest.mark.parametrize("function, error, message", [
    (short, ValueError, r"returned 3 values for 4 completions"),
    (with_nan, ValueError, r"non-finite value \(nan\) for rows \[1\]"),
    (too_big, ValueError, r"returned 1.5 \(rows \[2\]\), outside \[0, 1\]"),
    (negative, ValueError, r"returned -0.1 \(rows \[0\]\), outside \[0, 1\]"),
    (with_none, ValueError, r"returned None for rows \[1\]"),
    (nothing, TypeError, r"returned NoneType; a reward function returns a list of 4 numbers"),
    (nested, ValueError, r"shape \(4, 2\)"),
], ids=lambda v: getattr(v, "__name__", None))
def test_bad_return_values_are_refused_naming_the_function(function, error, message):
    with pytest.raises(error, match=message) as info:
        FunctionReward(function)(rollout())
    assert f"test_function_reward.{function.__name__}" in str(info.value), "the error names the function"


def test_positional_only_parameters_are_refused():
    def positional(completions, /):
        return completions

    with pytest.raises(TypeError, match="positional-only parameters.*keyword arguments"):
        FunctionReward(positional)


# --- from YAML, next to the config's own rewards ----------------------------------------------------------

def overlay(tmp_path, body: str) -> Path:
    path = tmp_path / "function_reward.yaml"
    path.write_text(body)
    return path


FUNCTION_OVERLAY = """model:
  init_args:
    rewards+:
      - class_path: cepo.FunctionReward
        init_args: {function: test_function_reward.length_reward, weight: 0.2}
"""


def test_a_function_reward_from_yaml_is_fused_with_the_other_terms(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cepo"])
    cli = CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False, run=False,
                  args=["--config", str(QUICKSTART), "--config", str(overlay(tmp_path, FUNCTION_OVERLAY)),
                        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    module = cli.model
    accuracy, function = module.reward_functions
    assert isinstance(accuracy, AccuracyReward) and isinstance(function, FunctionReward)
    assert function.function is length_reward and (function.name, function.weight) == ("length_reward", 0.2)
    module._trainer = SimpleNamespace(callbacks=[], world_size=1)
    batch = rollout()
    fused = module.score_rollout(batch)
    assert batch.reward_weights == {"accuracy": 1.0, "length_reward": 0.2}
    # p = 1 in the quickstart config: the weighted mean (1 * accuracy + 0.2 * length) / 1.2, by hand
    expected = (torch.tensor([1.0, 0.0, 1.0, 0.0]) + 0.2 * torch.tensor([24, 23, 22, 9]) / 40) / 1.2
    torch.testing.assert_close(fused, expected)


def test_print_config_and_help_show_the_function(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(overlay(tmp_path, FUNCTION_OVERLAY)),
              "--print_config"])
    assert exit_info.value.code == 0
    assert "function: test_function_reward.length_reward" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.init_args.rewards.help", "FunctionReward"])
    assert exit_info.value.code == 0
    assert "--rewards.function FUNCTION" in capsys.readouterr().out


def test_a_path_that_is_not_a_function_is_refused(tmp_path, capsys):
    bad = FUNCTION_OVERLAY.replace("test_function_reward.length_reward", "test_function_reward.no_such_reward")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(overlay(tmp_path, bad)), "--print_config"])
    assert exit_info.value.code != 0
    assert "no_such_reward" in capsys.readouterr().err


def test_a_function_reward_keeps_the_gsm8k_format_reward(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cepo"])
    cli = CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False, run=False,
                  args=["--config", str(GSM8K), "--config", str(overlay(tmp_path, FUNCTION_OVERLAY)),
                        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert [r.name for r in cli.model.reward_functions] == ["accuracy", "format", "length_reward"]
