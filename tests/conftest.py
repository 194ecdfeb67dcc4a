import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cepo.policy.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_llama(char_tokenizer):
    """A randomly initialised two-layer Llama over the character tokenizer (float32, eval mode)."""
    return make_tiny_llama(len(char_tokenizer))
