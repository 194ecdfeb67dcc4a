"""Catalogue of bad configurations and runtime inputs: each must fail with a message that names the option
(or the plug-in) and the fix, never train silently on a wrong setting.

One row per case: an argument overlay on ``configs/quickstart.yaml`` for ``cepo fit`` (run in-process, with
tiny data sizes appended so that a run which does start is over in a second), the exception, a pattern for
the problem and a pattern for the fix. Options refused by the parser (a choice not in the list) exit with
status 2 and list the valid choices on stderr.
"""

import re
from pathlib import Path

import pytest
import torch

from cepo.cli import main

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


def other_algorithm_checkpoint(tmp_path):
    """A GRPO run's checkpoint (one step), to be resumed as PPO."""
    main(["fit", "--config", "configs/quickstart.yaml", *TINY, "--trainer.default_root_dir", str(tmp_path / "grpo")])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    return [*PPO, "--ckpt_path", str(ckpt)]


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
     r"AccuracyReward: weight must be a finite number >= 0, got -1", r">= 0"),
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
     r"weight_zx must be >= 0, got -0\.1", r">= 0"),
    ("coherence network not a choice", [*CEPO, "--trainer.callbacks.network", "critic"], SystemExit,
     r"network.*critic", r"'reference', 'policy'"),
    ("reward-like callback that is not a NetworkReward", [f"--trainer.callbacks+={HELPERS}.OldStyleReward"],
     TypeError, r"trainer\.callbacks holds OldStyleReward, which looks like a reward", r"subclass cepo\.NetworkReward"),
    ("accumulate_grad_batches", ["--trainer.accumulate_grad_batches", "2"], ValueError,
     r"trainer\.accumulate_grad_batches .* manual optimisation", r"model\.mini_batch_size/model\.micro_batch_size"),
    ("gradient_clip_val", ["--trainer.gradient_clip_val", "1.0"], ValueError,
     r"trainer\.gradient_clip_val do not apply", r"model\.optim\.max_grad_norm"),
    ("checkpoint of another algorithm", other_algorithm_checkpoint, ValueError,
     r"checkpoint was written by algorithm 'grpo', this run is 'ppo'", r"model\.class_path|without --ckpt_path"),
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
    message = " ".join(message.split())
    assert re.search(problem, message), message
    assert re.search(fix, message), message


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
