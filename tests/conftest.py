"""Shared fixtures: tiny random models built in the test, with a tokenizer trained on the shipped text."""
from __future__ import annotations

import pytest
import torch

from workbench.data import BUILTIN_TEXTS


def tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"], show_progress=False)
    text = BUILTIN_TEXTS["wikitext2"].read_text()[:200_000].splitlines()
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def tiny_llama(seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    cfg.update(over)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_opt(seed: int = 0, **over):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, word_embed_proj_dim=64)
    cfg.update(over)
    return OPTForCausalLM(OPTConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer):
    """Directories holding a tiny LLaMA (GQA) and a tiny OPT, usable as ``--model``."""
    out = {}
    for name, build in (("llama", tiny_llama), ("opt", tiny_opt)):
        d = tmp_path_factory.mktemp(name)
        build().save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = str(d)
    return out
