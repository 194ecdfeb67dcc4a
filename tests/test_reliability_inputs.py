"""No silent wrong result from a checkpoint, an adapter, a sampling option or the data: each case here was
accepted (or crashed without naming its cause) before, and is now refused by name or counted."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import runs
from transformers import GPT2Config, GPT2LMHeadModel

from cepo.answers.matching import answers_match, unmatchable_gold
from cepo.cli import main
from cepo.data.prompt_file import PromptFile
from cepo.data.datamodule import PromptBatch
from cepo.data.example import Example
from cepo.policy import generation
from cepo.policy.generation import GenerationConfig, generate_completions, visible_prompts
from cepo.policy.loading import PolicyConfig, load_policy
from cepo.training.checkpoint_meta import check_checkpoint_file, same_model
from cepo.training.module import GRPO, PromptConfig
from cepo.training.monitors import ConstantRewardMonitor
from cepo.training.predict import prediction_records

ROOT = Path(__file__).resolve().parents[1]
M = "--model.init_args."
TINY = ["--data.prompts_per_step", "2", "--data.eval_batch_size", "4", f"{M}group_size", "2",
        f"{M}micro_batch_size", "4", f"{M}generation.max_new_tokens", "4", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false"]
_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> Path:
    """One tiny quickstart run (LoRA r 8, alpha 16, two steps), shared by the tests of this file."""
    if "run" not in _RUNS:
        folder = tmp_path_factory.mktemp("reliability-run")
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY, "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "2", "--trainer.logger.init_args.save_dir", str(folder)])
        _RUNS["run"] = next(folder.rglob("last.ckpt")).parent.parent
    return _RUNS["run"]


def cli(subcommand, tmp_path, *args):
    return main([subcommand, "--config", str(ROOT / "configs/quickstart.yaml"), *TINY,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *args])


# ------------------------------------------------------------------------------------------- checkpoints
def test_export_refuses_another_alpha_and_merges_the_trained_update(tmp_path, tmp_path_factory):
    run = trained_run(tmp_path_factory)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"model\.policy\.lora\.alpha: the checkpoint's is 16\.0, this run's is 32\.0"):
        cli("export", tmp_path, "--ckpt_path", ckpt, f"{M}policy.lora.alpha", "32", "--output_dir", str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"model\.policy\.lora\.r: the checkpoint's is 8, this run's is 4"):
        cli("export", tmp_path, "--ckpt_path", ckpt, f"{M}policy.lora.r", "4", "--output_dir", str(tmp_path / "m"))
    # The same targets written out explicitly are the same adapter layout: accepted.
    targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    cli("export", tmp_path, "--ckpt_path", ckpt, f"{M}policy.lora.target_modules", targets,
        "--output_dir", str(tmp_path / "m"))
    assert (tmp_path / "m" / "config.json").is_file()


def test_evaluation_ignores_training_only_options_resume_does_not(tmp_path, tmp_path_factory):
    ckpt = str(trained_run(tmp_path_factory) / "checkpoints" / "last.ckpt")
    other = ["--data.prompts_per_step", "3", f"{M}group_size", "4"]  # a rollout size evaluation never uses
    result = cli("validate", tmp_path, "--ckpt_path", ckpt, *other)
    assert result.trainer.callback_metrics["val/accuracy"] >= 0
    with pytest.raises(ValueError, match=r"data\.prompts_per_step=2, this run uses 3"):
        cli("fit", tmp_path, "--ckpt_path", ckpt, *other, "--trainer.max_steps", "3")


def test_a_checkpoint_records_what_reading_it_back_needs(tmp_path_factory):
    ckpt = torch.load(trained_run(tmp_path_factory) / "checkpoints" / "last.ckpt", weights_only=True)
    record = ckpt["cepo"]["policy"]
    assert record["name_or_path"] == "embedded:tiny-shortcut-llama" and ckpt["cepo"]["algorithm"] == "grpo"
    assert (record["lora_r"], record["lora_alpha"]) == (8, 16.0)
    assert record["lora_target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"])


def test_same_model_compares_the_models_name():
    assert same_model("embedded:tiny-shortcut-llama", "/pkg/assets/tiny-shortcut-llama")
    assert same_model("Qwen/Qwen2.5-0.5B-Instruct", "/models/Qwen2.5-0.5B-Instruct/")
    assert not same_model("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")


def test_an_adapter_with_a_nan_weight_is_refused_naming_the_tensor(tmp_path, tmp_path_factory):
    adapter = tmp_path / "adapter"
    name = runs.copy_adapter_with_nan(trained_run(tmp_path_factory) / "adapter", adapter)
    config = PolicyConfig(name_or_path="embedded:tiny-shortcut-llama", adapter_path=str(adapter))
    layer = re.escape(name.split("base_model.model.")[-1].rsplit(".lora_B", 1)[0])
    with pytest.raises(ValueError, match=rf"policy\.adapter_path=.*tensor '[^']*{layer}\.lora_B\.default\.weight' "
                                         r"holds 1 NaN value\(s\)"):
        load_policy(config)


def test_an_adapter_of_another_base_model_is_refused(tmp_path, tmp_path_factory):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run(tmp_path_factory) / "adapter", adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"trained on base model 'Qwen/Qwen2\.5-0\.5B-Instruct'.*set "
                                         r"policy\.name_or_path to the adapter's base model"):
        load_policy(PolicyConfig(name_or_path="embedded:tiny-shortcut-llama", adapter_path=str(adapter)))


@pytest.mark.parametrize(("content", "problem"), [
    (b"", r"is empty \(0 bytes\)"),
    (b"step: 3\n", r"is not a checkpoint: .* starts with b'step: 3\\n'"),
    (b"PK\x03\x04" + b"\0" * 60, r"is cut short \(64 bytes"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content, problem):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem):
        check_checkpoint_file(str(path))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_checkpoint_file(str(tmp_path))
    check_checkpoint_file("last")  # Lightning's shortcuts are left to the Trainer


# ------------------------------------------------------------------------------------------- generation
def test_a_prompt_cut_to_fit_is_flagged_and_shown_as_the_policy_saw_it(tiny_llama, char_tokenizer):
    prompts = ["0123456789abcdef", "xyz"]
    generated = generate_completions(tiny_llama, char_tokenizer, prompts, 2, max_new_tokens=3, temperature=1.0,
                                     max_prompt_tokens=6)
    assert generated.prompt_truncated.tolist() == [True, True, False, False]
    assert int(generated.prompt_mask.sum(-1).max()) == 6
    rows = [p for p in prompts for _ in range(2)]
    assert visible_prompts(char_tokenizer, rows, generated) == ["abcdef", "abcdef", "xyz", "xyz"]


def test_generation_never_runs_past_a_learned_position_table(char_tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(char_tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    prompts = ["a" * 40, "short"]
    # 40 prompt tokens + 8 new ones exceed 32 positions: the prompt keeps its last 32 - 8 = 24 tokens.
    generated = generate_completions(model, char_tokenizer, prompts, 1, max_new_tokens=8, temperature=0.0,
                                     max_prompt_tokens=None)
    assert generated.prompt_truncated.tolist() == [True, False]
    assert generated.prompt_ids.shape[1] == 24
    assert generated.prompt_ids.shape[1] + generated.completion_ids.shape[1] <= 32


def test_predictions_write_the_prompt_the_policy_saw(tiny_llama, char_tokenizer, monkeypatch):
    monkeypatch.setattr(generation, "_CUT_REPORTED", set())  # the warning is said once per stage and process
    module = GRPO(generation=GenerationConfig(max_prompt_tokens=5, max_new_tokens=2), prompt=PromptConfig(template="raw"))
    module.policy, module.tokenizer = tiny_llama, char_tokenizer
    example = Example(question="0123456789", gold=("1",), answer_kind="number", source="s", id="a")
    with pytest.warns(UserWarning, match=r"predict: 1 of 1 rows had their prompt cut from the left"):
        rollout = module.make_rollout(PromptBatch([example], -1, "s"), "predict")
    record = prediction_records(rollout, "s")[0]
    assert record["prompt"] == "56789" and record["prompt_truncated"] is True
    assert record["question"] == "0123456789"


# ------------------------------------------------------------------------------------------- rewards
def test_constant_batch_reward_is_reported_once_after_n_steps():
    monitor = ConstantRewardMonitor(3)
    said = [monitor.update(mean, std) for mean, std in [(0.0, 0.0)] * 5]
    assert [s is not None for s in said] == [False, False, True, False, False]
    assert monitor.run == 5 and "0 for every completion in each of the last 3" in said[2]


def test_varying_or_saturated_rewards_are_not_a_stall():
    monitor = ConstantRewardMonitor(3)
    # Groups can have zero spread while the batch varies (std > 0): never a stall.
    assert not any(monitor.update(0.5, 0.3) for _ in range(6))
    # A constant value that changes between steps resets the count.
    assert not any(monitor.update(value, 0.0) for value in (0.0, 0.25, 0.0, 0.25))
    # Every completion right after learning: counted, not reported.
    assert not any(monitor.update(1.0, 0.0) for _ in range(6)) and monitor.run == 6
    # Reward 1 for everything from the first step on is as suspect as 0.
    fresh = ConstantRewardMonitor(2)
    assert [fresh.update(1.0, 0.0) is not None for _ in range(2)] == [False, True]
    assert not any(ConstantRewardMonitor(0).update(0.0, 0.0) for _ in range(5))


def test_a_run_whose_reward_never_varies_says_so(tmp_path):
    args = [f"{M}rewards", "[]", f"{M}rewards+=tests.helpers.bad_config.ConstantReward", f"{M}rewards.value", "0.25",
            f"{M}reward_stall_steps", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    with pytest.warns(UserWarning, match=r"train/reward has been 0\.25 for every completion in each of the last 2 "
                                         r"rollout steps"):
        cli("fit", tmp_path, *args)


def test_gold_answers_that_can_never_match():
    for gold, kind in [("???", "math"), ("???", "auto"), ("seven", "number"), ("maybe", "yes_no"), ("!", "text")]:
        assert unmatchable_gold(gold, kind), (gold, kind)
        assert not any(answers_match(pred, gold, kind) for pred in ("7", "yes", "x", "maybe"))
    for gold, kind in [("\\frac{1}{2}", "math"), ("\\infty", "math"), ("7", "number"), ("No", "yes_no"),
                       ("Monday", "text"), ("B", "choice")]:
        assert unmatchable_gold(gold, kind) is None, (gold, kind)


# ------------------------------------------------------------------------------------------- prompt files
def test_prompt_file_counts_lines_from_one_and_skips_on_request(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "one"}\n\n{"question": ""}\n{"question": 3}\n{"question": "two"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl, line 3: empty question in field 'question'"):
        PromptFile(str(path)).load()
    source = PromptFile(str(path), on_error="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed rows .*line 3: empty question.*line 4: field "
                                         r"'question' \(question\) must be text, got int"):
        examples = source.load()
    assert [e.question for e in examples] == ["one", "two"] and source.skipped == 2
