"""Catalogue of bad configurations and runtime inputs: each must fail with a message that names the option
(or the plug-in) and the fix, never train silently on a wrong setting.

One row per case: an argument overlay on ``configs/quickstart.yaml`` for ``cepo fit`` (run in-process, with
tiny data sizes appended so that a run which does start is over in a second), the exception, a pattern for
the problem and a pattern for the fix. Options refused by the parser (a choice not in the list) exit with
status 2 and list the valid choices on stderr.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import runs

from cepo.cli import main
from cepo.policy.loading import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
M = "--model.init_args."
# Small enough that a run which gets past setup takes one tiny rollout step: 2 prompts x 4 samples.
TINY = ["--data.prompts_per_step", "2", "--data.eval_batch_size", "4", f"{M}group_size", "4",
        f"{M}micro_batch_size", "8", f"{M}generation.max_new_tokens", "4", "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
HELPERS = "tests.helpers.bad_config"
PPO = ["--config", "configs/algorithms/ppo.yaml"]
RLOO = ["--config", "configs/algorithms/rloo.yaml"]
REINFORCE_PP = ["--config", "configs/algorithms/reinforce_pp.yaml"]
CEPO = ["--config", "configs/rewards/cepo.yaml"]


def reward(value):
    return [f"{M}rewards+={HELPERS}.ConstantReward", f"{M}rewards.value", str(value)]


_GRPO_RUN: dict[str, Path] = {}


def grpo_run(tmp_path) -> Path:
    """The folder of a GRPO run of one step (LoRA r 8, alpha 16), made once for every row that needs it."""
    if "run" not in _GRPO_RUN:
        main(["fit", "--config", "configs/quickstart.yaml", *TINY, "--trainer.default_root_dir", str(tmp_path / "grpo"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "grpo")])
        _GRPO_RUN["run"] = next((tmp_path / "grpo").rglob("last.ckpt")).parent.parent
    return _GRPO_RUN["run"]


def other_algorithm_checkpoint(tmp_path):
    """A GRPO run's checkpoint (one step), to be resumed as PPO."""
    return [*PPO, "--ckpt_path", str(grpo_run(tmp_path) / "checkpoints" / "last.ckpt")]


def checkpoint_with(*args):
    return lambda tmp_path: ["--ckpt_path", str(grpo_run(tmp_path) / "checkpoints" / "last.ckpt"), *args]


def checkpoint_of_another_model(tmp_path):
    """The GRPO checkpoint resumed on a copy of the embedded model under another name (same shapes)."""
    other = tmp_path / "other-llama"
    shutil.copytree(resolve_model_path("embedded:tiny-shortcut-llama"), other)
    return checkpoint_with(f"{M}policy.name_or_path", str(other))(tmp_path)


def checkpoint_with_nan(tmp_path):
    checkpoint = torch.load(grpo_run(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    name = sorted(k for k in checkpoint["state_dict"] if "lora_B" in k)[0]
    checkpoint["state_dict"][name][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    return ["--ckpt_path", str(tmp_path / "nan.ckpt")]


def checkpoint_file(content):
    def build(tmp_path):
        (tmp_path / "bad.ckpt").write_bytes(content)
        return ["--ckpt_path", str(tmp_path / "bad.ckpt")]

    return build


def adapter_with_nan(tmp_path):
    adapter = tmp_path / "nan-adapter"
    runs.copy_adapter_with_nan(grpo_run(tmp_path) / "adapter", adapter)
    return [f"{M}policy.adapter_path", str(adapter)]


CASES = [
    # (id, overlay, exception, problem, fix); a callable overlay builds its arguments in tmp_path.
    ("temperature 0 in fit", [f"{M}generation.temperature", "0"], ValueError,
     r"model\.generation\.temperature=0\.0", r"must be > 0 .*eval_temperature: 0"),
    ("max_new_tokens 0", [f"{M}generation.max_new_tokens", "0"], ValueError,
     r"model\.generation\.max_new_tokens=0", r"set it to the longest answer you expect"),
    ("group_size 1 with grpo", [f"{M}group_size", "1", f"{M}micro_batch_size", "2"], ValueError,
     r"model\.group_size=1 .*estimator='grpo'", r"set group_size >= 2"),
    ("group_size 1 with rloo", ["--config", "configs/algorithms/rloo.yaml", f"{M}group_size", "1",
                                f"{M}micro_batch_size", "2"], ValueError,
     r"model\.group_size=1 .*estimator='rloo'", r"set group_size >= 2"),
    ("advantage.scale not a choice", [f"{M}advantage.scale", "median"], SystemExit,
     r"advantage\.scale", r"group.*batch.*none"),
    ("loss.aggregation not a choice", [f"{M}loss.aggregation", "token_sum"], SystemExit,
     r"loss\.aggregation", r"grpo.*dapo.*dr_grpo"),
    ("critic.kind not a choice", [*PPO, f"{M}critic.kind", "shared"], SystemExit,
     r"critic\.kind", r"head.*separate"),
    ("kl.placement not a choice", [f"{M}kl.placement", "advantage"], SystemExit,
     r"kl\.placement", r"loss.*reward"),
    ("rollout not divisible into mini-batches", [f"{M}mini_batch_size", "3"], ValueError,
     r"data\.prompts_per_step \(2\) x model\.group_size \(4\) = 8 .* model\.mini_batch_size=3",
     r"multiple of\s+mini_batch_size"),
    ("mini-batch not divisible into micro-batches", [f"{M}mini_batch_size", "8", f"{M}micro_batch_size", "3"],
     ValueError, r"model\.mini_batch_size=8 is not a multiple of model\.micro_batch_size=3",
     r"mini_batch_size a multiple of micro_batch_size"),
    ("several greedy evaluation samples", [f"{M}eval_num_samples", "4", f"{M}generation.eval_temperature", "0"],
     ValueError, r"model\.eval_num_samples=4 samples identical greedy completions",
     r"eval_temperature > 0 .* or eval_num_samples to 1"),
    ("all reward weights 0", [f"{M}reward_weights", "{accuracy: 0}"], ValueError,
     r"every reward has weight 0", r"model\.reward_weights|weight > 0"),
    ("reward returns inf", reward("inf"), ValueError,
     r"reward 'constant' returned a non-finite value \(inf\)", r"finite number in \[0, 1\]"),
    ("reward returns NaN", reward("nan"), ValueError,
     r"reward 'constant' returned a non-finite value \(nan\)", r"finite number in \[0, 1\]"),
    ("reward outside [0, 1]", reward("90"), ValueError,
     r"reward 'constant' returned 90 .*outside \[0, 1\]", r"rescale the reward to \[0, 1\]"),
    ("reward weight negative", [f"{M}rewards.init_args.weight", "-1"], ValueError,
     r"AccuracyReward: weight must be a finite number >= 0, got -1",
     r"set init_args\.weight to 0 to log the term without optimising it"),
    ("model folder missing", [f"{M}policy.name_or_path", "./no/such/model"], FileNotFoundError,
     r"policy\.name_or_path='\./no/such/model': no such folder", r"existing local folder or a hub id"),
    ("LoRA targets match nothing", [f"{M}policy.lora.target_modules", "[no_such_proj]"], ValueError,
     r"policy\.lora\.target_modules=\['no_such_proj'\] matches no layer", r"'q_proj'.* or use all-linear"),
    ("reward weight for a term no reward produces", [f"{M}reward_weights", "{accuracy: 1, coherence: 1}"],
     ValueError, r"model\.reward_weights names 'coherence', but no reward produces that term",
     r"the terms are \['accuracy'\]"),
    ("gae without a critic", [f"{M}advantage.estimator", "gae"], ValueError,
     r"model\.advantage\.estimator='gae' needs a critic", r"set model\.critic .* or choose the grpo"),
    ("min_std with a non-grpo estimator", [*RLOO, f"{M}advantage.min_std", "0.1"], ValueError,
     r"model\.advantage\.min_std=0\.1 would be ignored: advantage\.estimator='rloo' does not read it \(read by: grpo\)",
     r"leave advantage\.min_std at its default 0\.0"),
    ("per_term with a non-grpo estimator", [*REINFORCE_PP, f"{M}advantage.per_term", "true"], ValueError,
     r"model\.advantage\.per_term=True would be ignored: advantage\.estimator='reinforce_pp'",
     r"leave advantage\.per_term at its default False"),
    ("scale batch with rloo", [*RLOO, f"{M}advantage.scale", "batch"], ValueError,
     r"model\.advantage\.scale='batch' would be ignored: advantage\.estimator='rloo' does not read it",
     r"leave advantage\.scale at its default 'group' or choose an estimator that reads it"),
    ("scale batch with reinforce_pp", [*REINFORCE_PP, f"{M}advantage.scale", "batch"], ValueError,
     r"model\.advantage\.scale='batch' would be ignored: advantage\.estimator='reinforce_pp' does not read it",
     r"leave advantage\.scale at its default 'group'"),
    ("scale none with gae", [*PPO, f"{M}advantage.scale", "none"], ValueError,
     r"model\.advantage\.scale='none' would be ignored: advantage\.estimator='gae' does not read it",
     r"leave advantage\.scale at its default 'group'"),
    ("gamma with grpo", [f"{M}advantage.gamma", "0.9"], ValueError,
     r"model\.advantage\.gamma=0\.9 would be ignored: advantage\.estimator='grpo' does not read it "
     r"\(read by: reinforce_pp, gae\)", r"leave advantage\.gamma at its default 1\.0"),
    ("lam with reinforce_pp", [*REINFORCE_PP, f"{M}advantage.lam", "0.95"], ValueError,
     r"model\.advantage\.lam=0\.95 would be ignored: advantage\.estimator='reinforce_pp'",
     r"read by: gae\).*leave advantage\.lam at its default 1\.0"),
    ("adaptive KL from coefficient 0", [f"{M}kl.coef", "0", f"{M}kl.target", "0.05"], ValueError,
     r"model\.kl\.target needs model\.kl\.coef > 0", r"would stay 0 forever"),
    ("adapter folder missing", [f"{M}policy.adapter_path", "./no/such/adapter"], FileNotFoundError,
     r"policy\.adapter_path='\./no/such/adapter' holds no adapter_config\.json",
     r"folder written by PeftModel\.save_pretrained"),
    ("max_steps unset (cosine schedule)", [f"{M}optim.scheduler", "cosine", "--trainer.max_steps", "-1"], ValueError,
     r"trainer\.max_steps must be set", r"--trainer\.max_steps 200"),
    ("negative coherence weight", [*CEPO, "--trainer.callbacks.weight_zx", "-0.1"], ValueError,
     r"weight_zx must be >= 0, got -0\.1", r"set weight_zx to 0 to log the channel without rewarding it"),
    ("coherence network not a choice", [*CEPO, "--trainer.callbacks.network", "critic"], SystemExit,
     r"Got value: critic", r"Expected a typing\.Literal\['reference', 'policy'"),
    ("reward-like callback that is not a NetworkReward", [f"--trainer.callbacks+={HELPERS}.OldStyleReward"],
     TypeError, r"trainer\.callbacks holds OldStyleReward, which looks like a reward", r"subclass cepo\.NetworkReward"),
    ("two reward presets stacked", [*CEPO, "--config", "configs/experiments/cepo_policy_network.yaml"], ValueError,
     r"trainer\.callbacks holds CoherenceRewardCallback more than once", r"use one preset.*model\.reward_weights"),
    ("accumulate_grad_batches", ["--trainer.accumulate_grad_batches", "2"], ValueError,
     r"trainer\.accumulate_grad_batches .* manual optimisation", r"model\.mini_batch_size/model\.micro_batch_size"),
    ("gradient_clip_val", ["--trainer.gradient_clip_val", "1.0"], ValueError,
     r"trainer\.gradient_clip_val do not apply", r"model\.optim\.max_grad_norm"),
    ("checkpoint of another algorithm", other_algorithm_checkpoint, ValueError,
     r"checkpoint was written by algorithm 'grpo', this run is 'ppo'", r"model\.class_path|without --ckpt_path"),
    ("top_p 0", [f"{M}generation.top_p", "0"], ValueError,
     r"model\.generation\.top_p=0\.0: must lie in \(0, 1\]", r"Use 1\.0 \(off\) or e\.g\. 0\.95"),
    ("top_k negative", [f"{M}generation.top_k", "-3"], ValueError,
     r"model\.generation\.top_k=-3: must be >= 0", r"\(0 = off\)"),
    ("top_k 1 in fit", [f"{M}generation.top_k", "1"], ValueError,
     r"model\.generation\.top_k=1: keeps only the most likely token", r"use 0 \(off\) or a value >= 2"),
    ("eval_temperature negative", [f"{M}generation.eval_temperature", "-1"], ValueError,
     r"model\.generation\.eval_temperature=-1\.0: must be a finite number >= 0", r"0 = greedy decoding"),
    ("max_prompt_tokens 0", [f"{M}generation.max_prompt_tokens", "0"], ValueError,
     r"model\.generation\.max_prompt_tokens=0: must be >= 1", r"or null to cut only at the model's positions"),
    ("completion budget past the model's positions", [f"{M}generation.max_new_tokens", "600"], ValueError,
     r"model\.generation\.max_new_tokens=600 leaves no room for the prompt: the model takes 512 positions",
     r"set max_new_tokens below 512"),
    ("reward_stall_steps negative", [f"{M}reward_stall_steps", "-1"], ValueError,
     r"model\.reward_stall_steps=-1 must be >= 0", r"0 never warns"),
    ("checkpoint with another LoRA alpha", checkpoint_with(f"{M}policy.lora.alpha", "32"), ValueError,
     r"model\.policy\.lora\.alpha: the checkpoint's is 16\.0, this run's is 32\.0",
     r"Load it with the settings it was trained with"),
    ("checkpoint with another LoRA rank", checkpoint_with(f"{M}policy.lora.r", "4"), ValueError,
     r"model\.policy\.lora\.r: the checkpoint's is 8, this run's is 4", r"Load it with the settings it was trained"),
    ("checkpoint of another base model", checkpoint_of_another_model, ValueError,
     r"model\.policy\.name_or_path: the checkpoint's is 'embedded:tiny-shortcut-llama', this run's is '.*other-llama'",
     r"Load it with the settings it was trained with"),
    ("checkpoint with a NaN weight", checkpoint_with_nan, ValueError,
     r"checkpoint: tensor '[^']*lora_B\.default\.weight' holds 1 NaN value\(s\)", r"use an earlier checkpoint"),
    ("empty checkpoint file", checkpoint_file(b""), ValueError, r"--ckpt_path .*bad\.ckpt is empty \(0 bytes\)",
     r"give another checkpoint of the run"),
    ("text file as checkpoint", checkpoint_file(b"hello\n"), ValueError,
     r"--ckpt_path .*bad\.ckpt is not a checkpoint: .*starts with b'hello", r"give a \.ckpt file written by cepo fit"),
    ("adapter with a NaN weight", adapter_with_nan, ValueError,
     r"policy\.adapter_path=.*nan-adapter': tensor '[^']*lora_B\.default\.weight' holds 1 NaN value\(s\)",
     r"start from an earlier adapter or without one"),
    ("advantage.estimator not a choice", [f"{M}advantage.estimator", "vtrace"], SystemExit,
     r"Got value: vtrace", r"\"advantage\.estimator\": Expected a .*'grpo', 'rloo', 'reinforce_pp', 'gae'"),
]


@pytest.mark.parametrize(("overlay", "exception", "problem", "fix"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_configuration_is_refused_with_the_fix(overlay, exception, problem, fix, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    torch.manual_seed(0)
    args = overlay(tmp_path) if callable(overlay) else overlay
    with pytest.raises(exception) as error:
        main(["fit", "--config", "configs/quickstart.yaml", *TINY, *args])
    if exception is SystemExit:
        assert error.value.code == 2
        message = capsys.readouterr().err
    else:
        message = str(error.value)
        # cepo's own message, not buried in the parser's dump of every option
        assert "Given value" not in message and len(message) < 1500, message
    message = " ".join(message.split())
    found = re.search(problem, message)
    assert found, message
    # The fix must be said besides the problem: a fix pattern that the problem's own words match proves nothing.
    assert re.search(fix, message[:found.start()] + " " + message[found.end():]), message


def test_every_case_is_distinct():
    names = [case[0] for case in CASES]
    assert len(set(names)) == len(names)
    overlays = [tuple(case[1]) for case in CASES if not callable(case[1])]
    assert len(set(overlays)) == len(overlays)


def test_schedule_without_max_steps_through_the_python_api():
    """The CLI refuses a missing trainer.max_steps first (row above); a ``Trainer`` built in Python reaches the
    module's own check, which names the schedule and the option it needs."""
    from lightning import Trainer

    from cepo import GRPO
    from cepo.policy.loading import PolicyConfig
    from cepo.training.module import OptimConfig

    module = GRPO(policy=PolicyConfig(name_or_path="embedded:tiny-shortcut-llama"), optim=OptimConfig(scheduler="cosine"))
    module.configure_model()
    module.trainer = Trainer(max_steps=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"model\.optim\.scheduler='cosine' needs trainer\.max_steps"):
        module.configure_optimizers()
    module.optim.scheduler = "constant"  # the same module without a schedule to reach 0 is accepted
    assert module.configure_optimizers()["optimizer"].param_groups[0]["lr"] == module.optim.lr
