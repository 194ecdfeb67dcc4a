"""The memory model of benchmarks/memory_model.py: hand-computed values and the counts it is built on."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_model as mm  # noqa: E402

QWEN_05B = mm.Shape(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936, tied=True)


def test_activation_bytes_at_qwen_0_5b_by_hand():
    # kv = 2 heads x 64 = 128.  float32, adapter off: 16*896 + 12*4864 + 8*128 + 4*14 + 8
    assert QWEN_05B.kv == 128
    assert mm.activation_bytes(QWEN_05B, "float32") == 14336 + 58368 + 1024 + 56 + 8  # 73,792
    # bf16-mixed with LoRA r = 16: (12*896 + 6*4864 + 4*128 + 56 + 8) + (12*896 + 2*4864 + 14*16)
    assert mm.activation_bytes(QWEN_05B, "bf16-mixed", 16) == (10752 + 29184 + 512 + 64) + (10752 + 9728 + 224)


def test_parameter_counts_by_hand_and_against_the_real_modules():
    # Qwen2.5-0.5B: embedding 151936*896 = 136,134,656; per layer q 896*896+896, k and v 896*128+128 each,
    # o 896*896, MLP 3*896*4864, two norms 2*896: 14,912,384; 24 layers; final norm 896.
    assert mm.base_parameters(QWEN_05B) == 136_134_656 + 24 * 14_912_384 + 896  # 494,032,768
    # LoRA r = 16: per layer 16 * (q 1792 + k 1024 + v 1024 + o 1792 + gate 5760 + up 5760 + down 5760)
    assert mm.lora_parameters(QWEN_05B, 16) == 24 * 16 * 22912

    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    shape = mm.Shape(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=100, tied=False)
    model = Qwen2ForCausalLM(config)
    assert mm.base_parameters(shape) == sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert mm.lora_parameters(shape, 4) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def saved_bytes_per_token_layer(mode: str, rank: int, hidden=64, intermediate=160, heads=4, kv_heads=2) -> float:
    """Bytes autograd saves per token for one more decoder layer: the saved tensors (not parameters) of a
    forward over 2 layers minus 1 layer, at 24 and 40 tokens, differenced over the 16 extra tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def saved(layers: int, tokens: int) -> int:
        config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=50,
                             attn_implementation="sdpa")
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        if mode == "bfloat16":
            model = model.to(torch.bfloat16)
        if rank:
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in params:
                storages[key] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 50, (2, tokens))
        E = model.get_input_embeddings()(ids).detach().requires_grad_()
        decoder = (model.get_base_model() if rank else model).model
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16-mixed"):
            decoder(inputs_embeds=E, attention_mask=torch.ones_like(ids), use_cache=False)
        return sum(storages.values())

    per_layer = {t: saved(2, t) - saved(1, t) for t in (24, 40)}
    return (per_layer[40] - per_layer[24]) / (2 * 16)


@pytest.mark.parametrize("mode", mm.MODES)
@pytest.mark.parametrize("rank", [0, 8])
def test_activation_formula_matches_the_tensors_autograd_saves(mode, rank):
    shape = mm.Shape(layers=1, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=50)
    assert saved_bytes_per_token_layer(mode, rank) == mm.activation_bytes(shape, mode, rank)


def test_coherence_phase_by_hand():
    shape = mm.Shape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10)
    step = mm.Step(prompt=3, completion=5, answer=1, prompts=1, group=2, counterfactuals=1,
                   update_micro_batch=2, scorer_micro_batch=2, lora_rank=0, mode="float32")
    # kv = 4; a_0 = 16*8 + 12*16 + 8*4 + 4*2 + 8 = 368 bytes; T = 3 + 5 + 2 = 10 tokens
    saved = 2 * 10 * (2 + 1) * 368  # s T (L + 1) a_0
    leaf = 3 * 2 * 10 * 8 * 4  # E, G_X, G_Y
    logits = 3 * 2 * 5 * 10 * 4  # s C V float32, three times
    kept = 2 * (1 + 1) * (2 * 3 + 5 - 1) * 8 * 4  # s (1 + K)(2Z + X) h 4
    assert mm.phases(shape, step)["coherence"] == saved + leaf + logits + kept
    checkpointed = mm.phases(shape, replace(step, scorer_checkpointing=True))["coherence"]
    assert checkpointed == 2 * 10 * (2 * 8 * 4 + 2 * 368) + leaf + logits + kept
    # At a real vocabulary the head runs in checkpointed chunks of 2^24 logits: three of them, not s C V.
    big = replace(shape, vocab=151_936)
    chunk = (mm.LOGITS_CHUNK // 151_936) * 151_936 * 4
    long = replace(step, completion=512)
    assert mm.coherence_terms(big, long)["logits at scored positions"] == 3 * chunk < 3 * 2 * 512 * 151_936 * 4


def test_the_table_grows_with_the_card_and_with_checkpointing():
    shape = mm.shapes()["1.5B"]
    for tokens in (512, 1024):
        step = mm.table_step(tokens)
        for field, flag in (("update_micro_batch", "gradient_checkpointing"),
                            ("scorer_micro_batch", "scorer_checkpointing")):
            found = [[mm.largest(shape, replace(step, **{flag: on}), card * mm.GIB, field) for card in (24, 48, 80)]
                     for on in (False, True)]
            for row in found:
                assert row == sorted(row) and row[0] >= 1
            assert all(ckpt >= plain for plain, ckpt in zip(*found))
    # fewer tokens never need more memory
    assert mm.peak(shape, mm.table_step(512)) < mm.peak(shape, mm.table_step(1024))
