"""The tiny synthetic anchor pair: two seeded Qwen2 models of one family with a shared byte-level
tokenizer. Used by the fast tests and anywhere the real pair cannot be fetched. Deterministic: the
same name always gives bit-identical weights (and so the same fingerprint) in every process, which
is what lets a Ray replica rebuild the pair a palette was made with.

Shapes mirror the real pair's asymmetries on purpose: different hidden sizes, depths and head dims
(the real Qwen pair has head dims 64 and 128), grouped-query attention and q/k/v biases.
"""
from __future__ import annotations

from functools import lru_cache

import torch

TINY_VOCAB = 259  # 256 bytes + 3 specials: every id the model can emit decodes
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name -> (Qwen2Config fields, seed)
TINY_SPECS: dict[str, tuple[dict, int]] = {
    "tiny-small": (
        dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=128),
        1234,
    ),
    "tiny-large": (
        dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=256),
        4321,
    ),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE without merges: every byte is a token, so any text round-trips.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def build_tiny_tokenizer():
    """A byte-level tokenizer with ChatML specials and chat template (TINY_VOCAB tokens)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_config(name: str):
    from transformers import Qwen2Config

    fields, _ = TINY_SPECS[name]
    tok = build_tiny_tokenizer()
    return Qwen2Config(
        vocab_size=TINY_VOCAB,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.05,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **fields,
    )


def build_tiny_model(name: str, dtype: torch.dtype = torch.float32):
    """Seeded Qwen2ForCausalLM. Built under a forked RNG so callers' random state is untouched."""
    from transformers import Qwen2ForCausalLM

    if name not in TINY_SPECS:
        raise KeyError(name)
    _, seed = TINY_SPECS[name]
    cfg = tiny_config(name)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()
