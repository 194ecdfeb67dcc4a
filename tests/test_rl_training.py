"""The one training loop end to end and its guards: RLOO and REINFORCE++ train the quickstart task on the CPU,
reward-weight overrides reach the fused reward, bad training options and bad reward values are refused
naming the option or the reward, and TensorBoard gets the per-row table, histograms and the HParams tab."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cepo import AccuracyReward, GRPO, RewardFunction
from cepo.cli import main
from cepo.policy.forward import unwrap
from cepo.policy.loading import resolve_model_path
from cepo.rewards.base import NetworkReward, check_reward_values
from cepo.rollout import Rollout
from helpers import runs

ALGORITHMS = runs.ROOT / "configs" / "algorithms"


def small_run_args(tmp_path, *extra, overlay: str | None = None):
    configs = (str(ALGORITHMS / f"{overlay}.yaml"),) if overlay else ()
    return runs.small_run_args(tmp_path, "--model.init_args.generation.max_new_tokens", "24", *extra, configs=configs)


@pytest.fixture()
def cli_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cepo"])  # the CLI reads args=..., not pytest's own command line


def assert_lora_moved_and_base_frozen(policy) -> None:
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n and ".default." in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b), "LoRA B starts at zero; a step must move it"
    reference = load_file(str(Path(resolve_model_path("embedded:tiny-shortcut-llama")) / "model.safetensors"))
    params = dict(unwrap(policy).named_parameters())
    for name, tensor in reference.items():
        param = params.get(name.replace(".weight", ".base_layer.weight"), params.get(name))
        torch.testing.assert_close(param.detach(), tensor, rtol=0, atol=0, msg=f"base weight {name} changed")


def events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


# --- the algorithms train ------------------------------------------------------------------------------


@pytest.mark.slow
def test_rloo_trains_the_quickstart_task_and_logs_to_tensorboard(tmp_path, cli_argv):
    cli = main(["fit", *small_run_args(tmp_path, overlay="rloo")])
    module = cli.model
    assert module.algorithm == "rloo" and module.rollout_step == 2
    assert_lora_moved_and_base_frozen(module.policy)
    logged = cli.trainer.callback_metrics
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/advantage_abs_mean", "train/time/step_s"):
        assert math.isfinite(float(logged[key])), key
    # The progress bar shows reward, accuracy and seconds per step.
    bar = cli.trainer.progress_bar_metrics
    assert {"reward", "acc", "s/step"} <= set(bar) and 0 <= bar["acc"] <= 1 and bar["s/step"] > 0

    tb = events(Path(cli.trainer.log_dir))
    histograms = set(tb.Tags()["histograms"])
    assert {"train/reward", "train/rewards/accuracy", "train/advantage"} <= histograms
    assert [e.step for e in tb.Histograms("train/advantage")] == [1, 2]  # every logged step
    table = tb.Tensors("completions/text_summary")[-1].tensor_proto.string_val[0].decode()
    header = table.splitlines()[0]
    assert "| accuracy |" in header and "| reward |" in header and header.endswith("| advantage |")
    # The four rows logged are the first prompt's group: RLOO advantages of a group sum to 0.
    rows = [line.rstrip(" |").split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == 4
    assert abs(sum(float(row[-1]) for row in rows)) < 0.01
    assert all(0.0 <= float(row[-2]) <= 1.0 for row in rows)  # the fused reward
    # HParams: the resolved options with the final validation metrics.
    hparams = tb.PluginTagToContent("hparams")
    assert hparams, "no HParams data was written"
    experiment = next(v for k, v in hparams.items() if k.endswith("experiment")).decode("latin-1")
    assert "model.init_args.advantage.estimator" in experiment and "final/val/accuracy" in experiment
    final = tb.Scalars("final/val/accuracy")[0].value
    assert final == pytest.approx(float(logged["val/accuracy"]))


@pytest.mark.slow
def test_reinforce_pp_trains_the_quickstart_task(tmp_path, cli_argv):
    cli = main(["fit", *small_run_args(tmp_path, overlay="reinforce_pp")])
    module = cli.model
    assert module.algorithm == "reinforce_pp" and module.kl.placement == "reward"
    assert_lora_moved_and_base_frozen(module.policy)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/kl_sequence"]))


# --- options refused at setup, naming the option ---------------------------------------------------------


@pytest.mark.parametrize("overlay, extra, named", [
    (None, ("--model.init_args.generation.temperature", "0"), "model.generation.temperature"),
    (None, ("--model.init_args.group_size", "1"), "model.group_size"),
    ("rloo", ("--model.init_args.group_size", "1"), "model.group_size"),
    (None, ("--model.init_args.generation.max_new_tokens", "0"), "model.generation.max_new_tokens"),
    (None, ("--model.init_args.advantage.min_std", "0.1", "--model.init_args.advantage.scale", "none"),
     "model.advantage.min_std"),
    ("rloo", ("--model.init_args.advantage.per_term", "true"), "model.advantage.per_term"),
    (None, ("--model.init_args.advantage.estimator", "gae"), "model.critic"),
])
def test_impossible_training_options_are_refused_before_the_first_rollout(tmp_path, cli_argv, overlay, extra, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        main(["fit", *small_run_args(tmp_path, *extra, overlay=overlay)])


def test_an_unknown_estimator_is_refused_with_the_list_of_choices(tmp_path, cli_argv, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *small_run_args(tmp_path, "--model.init_args.advantage.estimator", "ppo2"), "--print_config"])
    assert "reinforce_pp" in capsys.readouterr().err


def test_logprob_passes_refuse_a_zero_temperature():
    module = GRPO()
    module.generation.temperature = 0.0
    with pytest.raises(ValueError, match="generation.temperature"):
        module._logprob_temperature()


# --- reward values and weights -------------------------------------------------------------------------


def toy_rollout(n: int = 4) -> Rollout:
    return Rollout(
        examples=[SimpleNamespace(gold=("1",), answer_kind="text", meta={})] * n, prompts=["p"] * n,
        completions=["c"] * n, rationales=["r"] * n, answers=(["1", "2"] * n)[:n],
        marker_found=torch.ones(n, dtype=torch.bool), group_size=2,
        prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 1, dtype=torch.long), completion_mask=torch.ones(n, 1, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
    )


class Constant(RewardFunction):
    default_name = "constant"

    def __init__(self, value: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.value = value

    def score(self, rollout):
        return torch.full((len(rollout),), self.value)


@pytest.mark.parametrize("value, message", [(math.inf, "non-finite"), (-math.inf, "non-finite"),
                                            (math.nan, "non-finite"), (90.0, r"outside \[0, 1\]"),
                                            (-0.5, r"outside \[0, 1\]")])
def test_bad_reward_values_are_refused_naming_the_reward(value, message):
    with pytest.raises(ValueError, match=f"reward 'constant'.*{message}"):
        Constant(value)(toy_rollout())
    with pytest.raises(ValueError, match=f"reward 'coherence_zy'.*{message}"):
        check_reward_values("coherence_zy", torch.tensor([0.5, value]))
    check_reward_values("fine", torch.tensor([0.0, 0.5, 1.0]))


class FakeTrainer(SimpleNamespace):
    world_size = 1


def test_reward_weight_overrides_reach_the_fused_reward_and_network_rewards_get_the_rollout_step():
    seen = []

    class Probe(NetworkReward):
        def score_rollout(self, module, rollout, step):
            seen.append(step)
            rollout.add_reward("probe", torch.tensor([1.0, 1.0, 0.0, 0.0]), 1.0)

    module = GRPO(rewards=[AccuracyReward(), Constant(0.5)], reward_weights={"accuracy": 3.0, "probe": 0.0})
    module._trainer = FakeTrainer(callbacks=[Probe(), object()], global_step=99)
    module.rollout_step = 7
    rollout = toy_rollout()
    fused = module.score_rollout(rollout)
    assert seen == [7], "a network reward receives the rollout step, not trainer.global_step"
    assert rollout.reward_weights == {"accuracy": 3.0, "constant": 1.0, "probe": 0.0}
    # accuracy 1, 0, 1, 0 with weight 3/4 and the constant 0.5 with weight 1/4; probe is logged only.
    torch.testing.assert_close(fused, torch.tensor([0.875, 0.125, 0.875, 0.125]))
    unknown = GRPO(reward_weights={"acuracy": 0.7})
    unknown._trainer = FakeTrainer(callbacks=[], global_step=0)
    with pytest.raises(ValueError, match="model.reward_weights names 'acuracy'.*accuracy"):
        unknown.score_rollout(toy_rollout())


# --- the loop under data parallelism, simulated with threads -------------------------------------------


def test_batch_scaled_grpo_in_the_loop_on_two_ranks_equals_one_process():
    from test_rl_estimators import ThreadRanks

    from cepo.training.module import AdvantageConfig, KLConfig

    # 4 prompts x 4 samples; no KL and one optimiser step, so prepare() runs no forward pass.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.9, 0.4, 1.0, 1.0, 1.0, 0.0, 0.3, 0.3, 0.8, 0.1])

    def prepared_advantages(rows: slice, world: int, global_sum=None) -> torch.Tensor:
        module = GRPO(advantage=AdvantageConfig(scale="batch"), kl=KLConfig(coef=0.0), group_size=4)
        reduce = (lambda value, reduce_op: global_sum(value)) if global_sum else None
        module._trainer = SimpleNamespace(world_size=world, strategy=SimpleNamespace(reduce=reduce))
        rollout = toy_rollout(16)
        rollout = Rollout(**{**rollout.__dict__, **{k: getattr(rollout, k)[rows] for k in (
            "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "marker_found")},
            "examples": rollout.examples[rows], "group_size": 4})
        prepared, _ = module.prepare(rollout, scores[rows])
        return prepared.advantages

    single = prepared_advantages(slice(0, 16), world=1)
    both = ThreadRanks(2).run(lambda rows, gsum: prepared_advantages(rows, 2, gsum), [slice(0, 8), slice(8, 16)])
    torch.testing.assert_close(torch.cat(both), single)


def test_a_callback_with_the_old_reward_hook_is_refused_not_skipped():
    class OldStyle:
        def on_rollout_batch(self, trainer, pl_module, rollout):
            rollout.add_reward("old", torch.ones(len(rollout)), 1.0)

    module = GRPO()
    module._trainer = FakeTrainer(callbacks=[OldStyle()], datamodule=None)
    with pytest.raises(TypeError, match="OldStyle.*cepo.NetworkReward.*score_rollout"):
        module.setup("validate")
