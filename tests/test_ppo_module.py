"""PPO as a configuration of the one training loop: value positions, reward shaping + GAE, the critic's
isolation, checkpoint state, and end-to-end ``fit`` through the CLI. The pure PPO math is tested in
test_rl_ppo.py."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cepo.cli import main
from cepo.policy.forward import unwrap
from cepo.policy.loading import PolicyConfig, resolve_model_path
from cepo.rl.advantages import gae, kl_penalized_rewards
from cepo.rollout import Rollout
from cepo.training.critic import CRITIC_ADAPTER, VALUE_HEAD_FILE, CriticConfig, ValueHead
from cepo.training.module import PPO, AdvantageConfig, KLConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
PPO_OVERLAY = str(ROOT / "configs" / "algorithms" / "ppo.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny model's matrices are too small to gain from intra-op threads, and on a busy two-core machine
    # the hand-offs between threads cost up to 100x the arithmetic (measured: 6 s vs 340 s for this file).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loaded_module(value_model: str = "head", critic_lr=None, **options) -> PPO:
    module = PPO(critic=CriticConfig(kind=value_model, lr=critic_lr), **options)
    module.configure_model()  # the embedded tiny model, no trainer needed
    return module


def lora_names(module: PPO, adapter: str) -> list[str]:
    return [n for n, _ in module.policy.named_parameters() if "lora_" in n and f".{adapter}." in n]


def randomize(module: PPO, adapter: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def two_rows():
    """Two rows of different lengths: left-padded prompts, right-padded completions (pad id 0)."""
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25]]
    completions = [[31, 32, 33, 34], [41, 42]]
    width_p, width_c = 5, 4
    prompt_ids = torch.tensor([[0] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [0] * (width_c - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions])
    return prompts, completions, (prompt_ids, prompt_mask, completion_ids, completion_mask)


# --- values read the state before each completion token ------------------------------------------------


@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_value_of_token_t_reads_the_hidden_state_before_it(value_model):
    module = loaded_module(value_model=value_model, micro_batch_size=1)
    randomize(module, "default", seed=1)
    randomize(module, CRITIC_ADAPTER, seed=2)
    torch.manual_seed(0)
    torch.nn.init.normal_(module.critic.value_head.score.weight)
    prompts, completions, tensors = two_rows()
    _, values = module.rollout_logprobs_and_values(tensors)
    base = unwrap(module.policy)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        # The row alone, unpadded, through the plain transformers forward pass.
        critic = module.critic_adapter() if value_model == "separate" else torch.no_grad()
        with critic, torch.no_grad():
            hidden = base(input_ids=torch.tensor([prompt + completion]), output_hidden_states=True).hidden_states[-1][0]
        positions = [len(prompt) - 1 + t for t in range(len(completion))]  # state that emits token t
        expected = module.critic.value_head(hidden[positions])
        torch.testing.assert_close(values[row, : len(completion)], expected, rtol=1e-4, atol=1e-5)


def test_separate_critic_is_isolated_from_the_policy_adapter():
    module = loaded_module(value_model="separate")
    torch.nn.init.normal_(module.critic.value_head.score.weight)
    _, _, tensors = two_rows()
    logp, values = module.rollout_logprobs_and_values(tensors)
    randomize(module, CRITIC_ADAPTER, seed=3)
    logp_after_critic, values_after_critic = module.rollout_logprobs_and_values(tensors)
    torch.testing.assert_close(logp_after_critic, logp, rtol=0, atol=0)  # critic weights never touch the policy
    assert not torch.allclose(values_after_critic, values)
    randomize(module, "default", seed=4)
    logp_after_policy, values_after_policy = module.rollout_logprobs_and_values(tensors)
    torch.testing.assert_close(values_after_policy, values_after_critic, rtol=0, atol=0)  # nor the policy the critic
    assert not torch.allclose(logp_after_policy, logp)
    # Switching adapters leaves both trainable and the base frozen.
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"policy.{n}" for n in lora_names(module, "default") + lora_names(module, CRITIC_ADAPTER)} | {
        "critic.value_head.score.weight", "critic.value_head.score.bias"}


def first_step_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of the first optimiser step of the loop on a two-row rollout (no trainer)."""
    torch.manual_seed(0)  # LoRA A is initialised at random
    module = loaded_module(value_model="separate", micro_batch_size=1, num_iterations=1,
                           policy=PolicyConfig(gradient_checkpointing=checkpointing))
    module.policy.train()  # transformers only checkpoints in training mode
    randomize(module, "default", seed=5)
    randomize(module, CRITIC_ADAPTER, seed=6)
    torch.nn.init.normal_(module.critic.value_head.score.weight, std=0.1)
    _, _, (prompt_ids, prompt_mask, completion_ids, completion_mask) = two_rows()
    rollout = Rollout(
        examples=[None, None], prompts=["", ""], completions=["", ""], rationales=["", ""], answers=["", ""],
        marker_found=torch.ones(2, dtype=torch.bool), group_size=1, prompt_ids=prompt_ids,
        prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
        truncated=torch.zeros(2, dtype=torch.bool),
    )
    grads: dict[str, torch.Tensor] = {}

    def backward_only(micro_losses):
        for loss in micro_losses:
            loss.backward()
        grads.update({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        return 0.0

    module._trainer = SimpleNamespace(world_size=1)
    module.optimizer_step_with_accumulation = backward_only
    prepared, _ = module.prepare(rollout, torch.tensor([1.0, 0.0]))
    module.optimise(rollout, prepared)
    return grads


def test_separate_critic_gradients_survive_gradient_checkpointing():
    # The backward pass recomputes checkpointed activations with the adapter active *then*: the critic's
    # loss must be differentiated while the critic adapter is active, or its gradients are silently wrong.
    plain, checkpointed = first_step_gradients(False), first_step_gradients(True)
    assert any(f".{CRITIC_ADAPTER}." in n for n in plain) and any(".default." in n for n in plain)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


# --- rewards and returns -------------------------------------------------------------------------------


def test_returns_are_the_score_minus_the_future_kl_penalties():
    scores = torch.tensor([1.0, 0.5])
    kl = torch.tensor([[0.2, -0.1, 0.4, 9.0], [0.3, 0.1, 9.0, 9.0]])  # 9.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.6, 0.9, 5.0], [0.1, 0.2, 5.0, 5.0]])
    rewards = kl_penalized_rewards(scores, kl, mask, kl_coef=0.1)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Row 0: 1.0 - 0.1 * (0.2 - 0.1 + 0.4), 1.0 - 0.1 * (-0.1 + 0.4), 1.0 - 0.1 * 0.4
    # Row 1: 0.5 - 0.1 * (0.3 + 0.1), 0.5 - 0.1 * 0.1
    expected = torch.tensor([[0.95, 0.97, 0.96, 0.0], [0.46, 0.49, 0.0, 0.0]])
    torch.testing.assert_close(returns, expected)
    torch.testing.assert_close(advantages, (expected - values) * mask)
    # With the KL as a loss term the rewards hold the score alone.
    _, loss_mode_returns = gae(kl_penalized_rewards(scores, kl, mask, kl_coef=0.0), values, mask, 1.0, 1.0)
    torch.testing.assert_close(loss_mode_returns, scores[:, None] * mask)


# --- options, optimiser and checkpoint state -----------------------------------------------------------


@pytest.mark.parametrize("options, named", [
    ({"advantage": AdvantageConfig(estimator="gae", lam=1.5)}, "model.advantage.lam"),
    ({"critic": CriticConfig(value_clip=0.0)}, "model.critic.value_clip"),
    ({"kl": KLConfig(target=6.0, coef=0.0)}, "model.kl.target"),
    ({"critic": CriticConfig(lr=-1.0)}, "model.critic.lr"),
    ({"critic": None}, "model.critic"),
])
def test_bad_options_are_named(options, named):
    with pytest.raises(ValueError, match=named):
        PPO(**options)


def test_critic_lr_puts_exactly_the_value_parameters_in_their_own_group():
    module = loaded_module(value_model="separate", critic_lr=3e-4)
    optimizer = module.configure_optimizers()["optimizer"]
    policy_group, critic_group = optimizer.param_groups
    assert critic_group["lr"] == 3e-4 and policy_group["lr"] == module.optim.lr
    by_id = {id(p): n for n, p in module.named_parameters()}
    critic = {by_id[id(p)] for p in critic_group["params"]}
    policy = {by_id[id(p)] for p in policy_group["params"]}
    assert critic == {f"policy.{n}" for n in lora_names(module, CRITIC_ADAPTER)} | {
        "critic.value_head.score.weight", "critic.value_head.score.bias"}
    assert policy == {f"policy.{n}" for n in lora_names(module, "default")}


def test_adaptive_kl_controller_round_trips_through_the_checkpoint():
    module = PPO(kl=KLConfig(coef=0.1, target=1.0, horizon=100))
    module.kl_controller.update(current_kl=3.0, n_steps=50)  # error clipped at +0.2: 0.1 * 1.1
    assert module.kl_controller.value == pytest.approx(0.11)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = PPO(kl=KLConfig(coef=0.1, target=1.0, horizon=100))
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.kl_controller.value == pytest.approx(0.11)
    # A run resumed with a fixed coefficient keeps its configured value.
    fixed = PPO(kl=KLConfig(coef=0.05))
    with pytest.warns(UserWarning, match="kl.target"):
        fixed.on_load_checkpoint(checkpoint)
    assert fixed.kl_controller.value == 0.05


# --- end to end ----------------------------------------------------------------------------------------


def small_run_args(tmp_path, *extra):
    return [
        "--config", QUICKSTART,
        "--config", PPO_OVERLAY,
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.prompts_per_step", "8",
        "--data.eval_batch_size", "8",
        "--model.init_args.mini_batch_size", "4",
        "--model.init_args.micro_batch_size", "2",
        "--model.init_args.num_iterations", "2",
        "--model.init_args.optim.lr", "0.01",
        *extra,
    ]


def assert_base_unchanged(policy) -> None:
    reference = load_file(str(Path(resolve_model_path("embedded:tiny-shortcut-llama")) / "model.safetensors"))
    params = dict(unwrap(policy).named_parameters())
    for name, tensor in reference.items():
        param = params.get(name.replace(".weight", ".base_layer.weight"), params.get(name))
        torch.testing.assert_close(param.detach(), tensor, rtol=0, atol=0, msg=f"base weight {name} changed")


def assert_moved(module: PPO, adapter: str) -> None:
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n and f".{adapter}." in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), f"LoRA B of {adapter!r} starts at 0 and must move"


@pytest.mark.slow
def test_fit_trains_value_head_and_lora_and_checkpoints_them(tmp_path):
    cli = main(["fit", *small_run_args(tmp_path, "--model.init_args.kl.target", "1.0",
                                       "--model.init_args.kl.horizon", "100")])
    module = cli.model
    assert module.critic.value_head.score.weight.abs().sum() > 0, "the zero-initialised value head must move"
    assert_moved(module, "default")
    assert_base_unchanged(module.policy)
    assert module.kl_controller.value != 0.001  # the adaptive controller saw at least one rollout
    log_dir = Path(cli.trainer.log_dir)
    state = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["cepo"]["algorithm"] == "ppo" and state["cepo"]["rollout_step"] == module.rollout_step >= 1
    assert state["cepo"]["kl_controller"]["value"] == module.kl_controller.value
    torch.testing.assert_close(state["state_dict"]["critic.value_head.score.weight"], module.critic.value_head.score.weight)
    exported = ValueHead.from_file(log_dir / "adapter" / VALUE_HEAD_FILE)
    torch.testing.assert_close(exported.score.weight, module.critic.value_head.score.weight.detach())
    logged = cli.trainer.callback_metrics
    for key in ("value_loss", "explained_variance", "approx_kl", "kl_coef", "kl", "value_clip_fraction",
                "advantage_std", "return_mean", "grad_norm", "entropy", "time/reference_s"):
        assert torch.isfinite(logged[f"train/{key}"]), key
    # Loading the checkpoint into a fresh module restores the value head and the controller.
    resumed = loaded_module(policy=module.policy_config, kl=KLConfig(coef=0.001, target=1.0, horizon=100))
    resumed.load_state_dict(state["state_dict"])
    resumed.on_load_checkpoint(state)
    assert resumed.kl_controller.value == module.kl_controller.value
    torch.testing.assert_close(resumed.critic.value_head.score.weight, module.critic.value_head.score.weight.detach())


@pytest.mark.slow
def test_fit_with_a_separate_critic_and_gradient_checkpointing(tmp_path):
    cli = main(["fit", *small_run_args(tmp_path, "--model.init_args.critic.kind", "separate",
                                       "--model.init_args.policy.gradient_checkpointing", "true",
                                       "--model.init_args.critic.lr", "0.02",
                                       "--trainer.val_check_interval", "2")])
    module = cli.model
    assert_moved(module, "default")
    assert_moved(module, CRITIC_ADAPTER)
    assert module.critic.value_head.score.weight.abs().sum() > 0
    assert_base_unchanged(module.policy)
    adapter = Path(cli.trainer.log_dir) / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / VALUE_HEAD_FILE).is_file()
    assert (adapter / CRITIC_ADAPTER / "adapter_model.safetensors").is_file()
