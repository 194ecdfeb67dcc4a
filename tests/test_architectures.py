"""Real architectures end to end: a Qwen2-style model (GQA, tied embeddings, BPE, chat template) and a
GPT-2-style model (absolute positions, fused c_attn, no pad token), both built offline (fixtures_models)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cepo.answers import AnswerParser, resolve_markers
from cepo.cli import main
from cepo.coherence.scorer import CoherenceScorer

from coherence_reference import score_reference
from fixtures_models import build_gpt2, gpt2_path, qwen2_path  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
CEPO_PRESET = str(ROOT / "configs" / "rewards" / "cepo.yaml")
ARCHS = {
    # name: (fixture, extra options)
    "qwen2": ("qwen2_path", ["--model.init_args.prompt.use_chat_template", "true",
                             "--model.init_args.policy.lora.target_modules", "all-linear"]),
    "gpt2": ("gpt2_path", ["--model.init_args.policy.lora.target_modules", "[c_attn]"]),
}
GPT2_DROPOUT = pytest.mark.xfail(
    strict=True, reason="issue 11 #11: log-prob passes run in train mode, so GPT-2's dropout makes policy and "
    "reference log-probs differ with identical weights")


def arch_args(request, arch: str, tmp_path: Path, *extra: str) -> list[str]:
    fixture, options = ARCHS[arch]
    return [
        "--config", QUICKSTART,
        "--model.init_args.policy.name_or_path", str(request.getfixturevalue(fixture)),
        *options,
        "--model.init_args.generation.max_new_tokens", "12",
        "--model.init_args.group_size", "4",
        "--model.init_args.micro_batch_size", "8",
        "--model.init_args.optim.lr", "0.02",
        "--data.prompts_per_step", "4",
        "--data.eval_batch_size", "8",
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_predict_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]


def sequence_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("preset", [False, True], ids=["accuracy", "cepo"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fit_validate_predict_and_reload(request, tmp_path, arch, preset):
    folder = request.getfixturevalue(ARCHS[arch][0])
    extra = ["--config", CEPO_PRESET] if preset else []
    cli = main(["fit", *arch_args(request, arch, tmp_path, *extra, "--merge.at_fit_end", "true")])
    module, log_dir = cli.model, Path(cli.trainer.log_dir)
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/kl", "train/grad_norm"):
        assert torch.isfinite(metrics[key]), key
    if preset:
        # Random completions carry no marker and no sentence break, so X is empty: S_ZX and S_XY sit at the
        # floor and S_ZY (the answer on the prompt) carries the signal.
        means = {c: float(metrics[f"train/rewards/coherence_{c}_mean"]) for c in ("zx", "xy", "zy")}
        assert all(0.005 - 1e-6 <= v <= 1.0 for v in means.values()), means
        assert means["zy"] > 0.01, means
    # Only LoRA moved: every base weight equals the saved folder's.
    saved = load_file(str(folder / "model.safetensors"))
    base = dict(module.policy.get_base_model().named_parameters())
    for name, tensor in saved.items():
        param = base.get(name.replace(".weight", ".base_layer.weight"), base.get(name))
        if param is None:  # tied lm_head of the Qwen2 stand-in: stored once, as the embedding
            continue
        assert torch.equal(param.detach(), tensor), f"base weight {name} changed"
    if preset:  # a random model never answers right, so only the coherence terms give a learning signal
        assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)
    # Adapter reload and the merged export reproduce the trained policy's log-probs.
    ids = torch.randint(0, len(module.tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    trained = sequence_logprobs(module.policy, ids)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder)), str(log_dir / "adapter"))
    torch.testing.assert_close(sequence_logprobs(reloaded, ids), trained, rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(log_dir / "merged"))
    assert type(merged).__name__ == {"qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    torch.testing.assert_close(sequence_logprobs(merged, ids), trained, rtol=1e-5, atol=1e-5)
    # predict (from the checkpoint and from the adapter folder) agrees with validate on the same weights.
    ckpt = str(log_dir / "checkpoints" / "last.ckpt")
    out, from_adapter = tmp_path / "pred.jsonl", tmp_path / "pred_adapter.jsonl"
    main(["predict", *arch_args(request, arch, tmp_path, *extra), "--ckpt_path", ckpt, "--prediction.output", str(out)])
    main(["predict", *arch_args(request, arch, tmp_path, *extra), "--prediction.output", str(from_adapter),
          "--model.init_args.policy.adapter_path", str(log_dir / "adapter")])
    records = read_jsonl(out)
    assert len(records) == 24
    assert [r["completion"] for r in read_jsonl(from_adapter)] == [r["completion"] for r in records]
    if arch == "qwen2":
        assert all(r["prompt"].startswith("<|im_start|>user\n") and r["prompt"].endswith("<|im_start|>assistant\n")
                   for r in records)
    validate = main(["validate", *arch_args(request, arch, tmp_path, *extra), "--ckpt_path", ckpt])
    for split in ("in_distribution", "flipped", "edited"):
        correct = [r["correct"] for r in records if r["dataset"] == split]
        assert float(validate.trainer.callback_metrics[f"val/{split}/accuracy"]) == pytest.approx(sum(correct) / len(correct))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", pytest.param("gpt2", marks=GPT2_DROPOUT)])
def test_first_update_starts_at_the_reference(request, tmp_path, arch):
    """Before the first optimiser step the policy is the reference (LoRA B = 0): the KL must be 0."""
    cli = main(["fit", *arch_args(request, arch, tmp_path, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")])
    assert abs(float(cli.trainer.callback_metrics["train/kl"])) < 1e-6


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 11 #10: the model's generation_config (repetition_penalty, "
                   "no_repeat_ngram_size) leaks into greedy evaluation")
def test_greedy_predictions_ignore_the_models_generation_defaults(request, tmp_path, qwen2_path):
    """A fresh adapter leaves the base model unchanged, so greedy completions are its argmax continuations,
    whatever decoding defaults the model folder ships (here strong anti-repetition ones, so that a leak shows
    on a random model, which greedily repeats one token)."""
    folder = tmp_path / "model"
    shutil.copytree(qwen2_path, folder)
    config = GenerationConfig.from_pretrained(str(folder))
    config.repetition_penalty, config.no_repeat_ngram_size = 1.3, 1
    config.save_pretrained(str(folder))
    out = tmp_path / "pred.jsonl"
    main(["predict", *arch_args(request, "qwen2", tmp_path), "--prediction.output", str(out),
          "--model.init_args.policy.name_or_path", str(folder)])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for record in read_jsonl(out)[:8]:
        ids = tokenizer(record["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        new = []
        with torch.no_grad():
            for _ in range(12):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                new.append(token)
                if token in stop:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert record["completion"] == tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_segments_survive_bpe_merges_across_their_boundaries(request, arch):
    """The tokenizer merges ``;<`` into one token, across the end of the rationale X and the answer
    marker. The parser works on the decoded text and the scorer re-tokenises Z, X and Y separately, so
    both must recover the known segmentation, and the scores must be those of the known segments."""
    folder = request.getfixturevalue(ARCHS[arch][0])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prompt, rationale, answer = "Q: 7+5-3 hint: 9\n", "7+5=12; 12-3=9;", "9"
    completion = f"{rationale}<answer>{answer}</answer>"
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    boundary = len(rationale)
    crossing = [completion[a:b] for a, b in enc.offset_mapping if a < boundary < b]
    assert crossing == [";<"], "precondition: a BPE token spans the rationale/marker boundary"
    # What generation hands back: the completion's token ids (with EOS), decoded as the module does.
    generated = enc.input_ids + [tokenizer.eos_token_id]
    decoded = tokenizer.decode(generated, skip_special_tokens=True)
    parsed = AnswerParser(resolve_markers("answer", ["answer"]))(decoded)
    assert (parsed.rationale, parsed.answer, parsed.marker_found) == (rationale, answer, True)
    # The scorer's sequence is [Z] <eos> [X] <eos> [Y], each segment tokenised on its own.
    scorer = CoherenceScorer(hardened=False)
    (seq,) = scorer._sequences(tokenizer, [prompt], [parsed.rationale], [parsed.answer], [], [])
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert (seq.z, seq.x, seq.y) == (encode(prompt), encode(rationale), encode(answer))
    assert tokenizer.decode(seq.x) == rationale and tokenizer.decode(seq.y) == answer
    assert seq.x != enc.input_ids[: len(seq.x)], "X's own tokens differ from the completion's merged ones"
    result = scorer.score(model, tokenizer, [prompt], [parsed.rationale], [parsed.answer])
    expected = score_reference(model, tokenizer, prompt, rationale, answer, [], [], hardened=False)
    for channel in ("zx", "xy", "zy"):
        assert float(getattr(result, channel)[0]) == pytest.approx(expected[channel]["score"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_cepo_reward_on_an_absolute_position_model_at_its_length_limit(request, tmp_path):
    """Generation fills GPT-2's 40 positions (4 prompt tokens kept, 36 new); the coherence pass sees the whole
    prompt plus two separators, so it must fit them to the limit rather than index past it."""
    folder = build_gpt2(tmp_path / "gpt2-40", n_positions=40)
    cli = main(["fit", *arch_args(request, "gpt2", tmp_path, "--config", CEPO_PRESET, "--trainer.max_steps", "1",
                                  "--trainer.limit_val_batches", "0"),
                "--model.init_args.policy.name_or_path", str(folder),
                "--model.init_args.generation.max_prompt_tokens", "4",
                "--model.init_args.generation.max_new_tokens", "36"])
    for channel in ("zx", "xy", "zy"):
        assert 0.005 - 1e-6 <= float(cli.trainer.callback_metrics[f"train/rewards/coherence_{channel}_mean"]) <= 1
    assert float(cli.trainer.callback_metrics["train/coherence/truncated"]) > 0  # cut to fit, and counted
