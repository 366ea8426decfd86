"""Token ids are cached per tokenizer and text: the same ids as tokenizing afresh, another
tokenizer or text never gets them, and a caller cannot change what the cache holds."""
from __future__ import annotations

import torch

from tests.conftest import tiny_tokenizer
from workbench import data


def _fresh(tokenizer, text):
    return torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)


def test_cached_ids_are_the_tokenizers_own_and_keyed_by_tokenizer_and_text(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 50
    first = data.tokenize(tokenizer, text)
    assert torch.equal(first, _fresh(tokenizer, text))
    first.zero_()                                             # the caller's copy, not the cache's
    assert torch.equal(data.tokenize(tokenizer, text), _fresh(tokenizer, text))

    other = tiny_tokenizer(vocab_size=300)                  # another vocabulary: another fingerprint
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(tokenizer)
    assert torch.equal(data.tokenize(other, text), _fresh(other, text))
    assert not torch.equal(data.tokenize(other, text), data.tokenize(tokenizer, text))

    with_bos = tiny_tokenizer()                              # same vocabulary, a post-processor added
    from tokenizers import processors
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert data.tokenize(with_bos, text)[0] == 1 and data.tokenize(tokenizer, text)[0] != 1
    assert torch.equal(data.tokenize(tokenizer, text + "!"), _fresh(tokenizer, text + "!"))
