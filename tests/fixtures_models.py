"""Stand-ins for real Hugging Face models, built offline in seconds and saved as ordinary folders.

* a Qwen2-style model: grouped-query attention (4 query heads, 2 key/value heads), tied input and
  output embeddings, a byte-level BPE tokenizer trained here, a Qwen-style chat template, ``<|im_end|>``
  as EOS and ``<|endoftext|>`` as padding, and Qwen2.5-Instruct's generation defaults;
* a GPT-2-style model: learned absolute positions, fused ``c_attn`` (Conv1D) projections, GPT-2's dropout,
  and a tokenizer with no padding token (``<|endoftext|>`` is BOS, EOS and UNK).

Policies load them through ``policy.name_or_path: <folder>``, the same ``from_pretrained`` path as a
downloaded model.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Qwen2Config
from transformers import Qwen2ForCausalLM

from cepo.data.shortcut import generate_items

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "Natalia sold clips to {n} of her friends in April, and then she sold half as many clips in May.",
    "Weng earns {n} dollars an hour for babysitting; yesterday she did {m} minutes of babysitting.",
    "Betty is saving money for a new wallet which costs {n} dollars.",
    "James writes a {n}-page letter to {m} different friends twice a week.",
    "Solve the following problem and give the final answer between answer tags.",
    "The rationale explains each step; the final answer is a single number.",
]


def training_text(lines: int = 400, seed: int = 0) -> list[str]:
    """Lines in the shape the tests feed the models: shortcut-task prompts and completions, chat turns,
    and word problems, so that merges such as ``;<`` (rationale end + answer marker) are learned."""
    rng = random.Random(seed)
    items = generate_items("train", lines, seed)
    text = []
    for i, item in enumerate(items):
        completion = item.completion()
        text.append(item.question + completion)
        if i % 3 == 0:
            text.append(f"<|im_start|>user\n{item.question}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>")
        if i % 2 == 0:
            text.append(rng.choice(SENTENCES).format(n=rng.randint(2, 99), m=rng.randint(2, 99)))
    return text


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 420) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    return tokenizer


def build_qwen2(folder: Path, seed: int = 0) -> Path:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Qwen2.5-Instruct ships sampling defaults with its weights; a run must not inherit them silently.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def build_gpt2(folder: Path, seed: int = 0, n_positions: int = 128) -> Path:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(["<|endoftext|>"]),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    assert tokenizer.pad_token is None
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # GPT-2's own dropout (0.1 on residuals, attention and embeddings) stays on
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory) -> Path:
    return build_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def gpt2_path(tmp_path_factory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))
