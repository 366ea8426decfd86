"""Try it's core on tiny models: greedy continuations with the KV cache against a brute-force loop that
recomputes the whole text at every step, the divergence of two models, the quantized model rebuilt
from a run's codes, and the HTML and top-k table made of them."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_llama, tiny_opt
from workbench import tryit, workspace
from workbench.config import QuantizeConfig
from workbench.diagnostics.reconstruction import Reconstruction
from workbench.errors import Cancelled, WorkbenchError
from workbench.figures.continuation import comparison_html, continuation_html, top_caption, top_frame
from workbench.generate import (GenerateConfig, changed_tokens, compare, first_divergence, generate_config, greedy,
                                pieces, prompt_ids, stop_ids)

STEPS = 24
PROMPT = [5, 17, 42, 99, 7]


@torch.no_grad()
def brute_force(model, ids, steps, k=5, stop=()):
    """Greedy decoding the slow, obvious way: the whole sequence through the model at every step."""
    seq, tokens, tops = list(ids), [], []
    for _ in range(steps):
        logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
        token = int(torch.argmax(logits))
        probs = torch.softmax(logits.float(), -1)
        top = torch.topk(probs, k)
        tokens.append(token)
        tops.append((top.indices.tolist(), top.values))
        seq.append(token)
        if token in stop:
            break
    return tokens, tops


def perturbed(model, scale: float, seed: int = 1):
    """A copy with noise on every weight of the last block's MLP."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.layers[-1].mlp.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return other


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_greedy_with_the_cache_matches_the_brute_force_loop(build):
    model = build()
    cont = greedy(model, PROMPT, STEPS)
    tokens, tops = brute_force(model, PROMPT, STEPS)
    assert cont.tokens == tokens and len(cont.tokens) == STEPS and not cont.stopped
    for step, (ids, probs) in enumerate(tops):
        assert cont.top_ids[step].tolist() == ids
        torch.testing.assert_close(cont.top_probs[step], probs, atol=1e-5, rtol=1e-4)
    assert cont.top_ids[:, 0].tolist() == cont.tokens      # the greedy token is the most likely one


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_a_guess_is_checked_in_one_pass_and_changes_nothing(build):
    model = build()
    tokens, tops = brute_force(model, PROMPT, STEPS)
    wrong_at = 9
    bad = tokens[:wrong_at] + [(t + 1) % 512 for t in tokens[wrong_at:]]
    for guess in (tokens, tokens + [3, 4, 5], tokens[:5], bad, [(t + 7) % 512 for t in tokens], []):
        cont = greedy(model, PROMPT, STEPS, guess=guess)
        assert cont.tokens == tokens
        for step, (ids, probs) in enumerate(tops):
            assert cont.top_ids[step].tolist() == ids
            torch.testing.assert_close(cont.top_probs[step], probs, atol=1e-5, rtol=1e-4)
    stop = frozenset({tokens[wrong_at]})
    end = tokens.index(tokens[wrong_at])
    assert greedy(model, PROMPT, STEPS, stop, guess=tokens).tokens == tokens[:end + 1]
    assert greedy(model, PROMPT, 1, guess=tokens).tokens == tokens[:1]


def test_identical_models_never_diverge():
    model = tiny_llama()
    d = compare(model, copy.deepcopy(model), PROMPT, STEPS)
    assert d.first is None and d.fp.tokens == d.quant.tokens
    assert not any(d.fp_changed) and not any(d.quant_changed)
    assert d.at == STEPS - 1                              # the table falls back to the last token
    fp, quant = d.top()
    assert [t for t, _ in fp] == [t for t, _ in quant] and len(fp) == 5


def test_a_perturbed_model_diverges_where_the_brute_force_says():
    model = tiny_llama()
    other = perturbed(model, 0.1)
    fp_tokens, fp_tops = brute_force(model, PROMPT, STEPS)
    q_tokens, q_tops = brute_force(other, PROMPT, STEPS)
    expected = next(i for i, (a, b) in enumerate(zip(fp_tokens, q_tokens)) if a != b)
    assert 0 < expected < STEPS - 1                        # a divergence after a shared start
    d = compare(model, other, PROMPT, STEPS)
    assert d.first == expected == d.at
    assert d.fp.tokens == fp_tokens and d.quant.tokens == q_tokens
    fp, quant = d.top()
    assert [t for t, _ in fp] == fp_tops[expected][0] and [t for t, _ in quant] == q_tops[expected][0]
    torch.testing.assert_close(torch.tensor([p for _, p in quant]), q_tops[expected][1], atol=1e-5, rtol=1e-4)
    assert fp[0][0] == fp_tokens[expected] != quant[0][0] == q_tokens[expected]
    # the shared start is never marked; the first divergent token is
    assert not any(d.fp_changed[:expected]) and d.fp_changed[expected] and d.quant_changed[expected]


def test_a_stop_token_ends_the_continuation_and_reuses_the_fp_side():
    model = tiny_llama()
    tokens, _ = brute_force(model, PROMPT, STEPS)
    stop = frozenset({tokens[3]}) if tokens[3] not in tokens[:3] else frozenset({tokens[0]})
    cont = greedy(model, PROMPT, STEPS, stop)
    end = tokens.index(next(iter(stop)))
    assert cont.stopped and cont.tokens == tokens[:end + 1]
    again = compare(None, model, PROMPT, STEPS, stop, fp=cont)      # the fp continuation as given
    assert again.fp is cont and again.first is None


def test_cancel_stops_between_steps():
    class Set:
        def is_set(self):
            return True
    with pytest.raises(Cancelled):
        greedy(tiny_llama(), PROMPT, 5, cancel=Set())


def test_first_divergence_and_aligned_changes():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    a, b = changed_tokens([1, 2, 3, 4, 5], [1, 2, 9, 3, 4, 5])
    assert a == [False] * 5 and b == [False, False, True, False, False, False]
    a, b = changed_tokens([1, 2, 7, 8], [1, 2, 9])
    assert a == [False, False, True, True] and b == [False, False, True]


def test_pieces_rebuild_the_text_and_keep_characters_whole(tokenizer):
    ids = tokenizer("The café served a purée to the fiancée")["input_ids"]
    parts = pieces(tokenizer, [], ids)
    assert "".join(p.text for p in parts) == tokenizer.decode(ids)
    assert all("\ufffd" not in p.text for p in parts)
    assert [p.first for p in parts] == [0] + [p.last + 1 for p in parts[:-1]] and parts[-1].last == len(ids) - 1
    assert any(p.last > p.first for p in parts)           # some character spans several byte tokens
    # after a context, a piece is what the token adds to the text
    context = tokenizer("Hello there")["input_ids"]
    more = tokenizer(" world")["input_ids"]
    assert "".join(p.text for p in pieces(tokenizer, context, more)) == " world"


def test_settings_are_checked_with_the_face_names(tokenizer):
    assert generate_config({}) == GenerateConfig() and GenerateConfig().tokens == 40
    with pytest.raises(WorkbenchError, match="Prompt is empty"):
        generate_config({"prompt": "   "}, "app")
    with pytest.raises(WorkbenchError, match="--tokens must be at least 1, got 0"):
        generate_config({"tokens": 0})
    with pytest.raises(WorkbenchError, match="Tokens must be at most 256"):
        generate_config({"tokens": "1000"}, "widgets")
    with pytest.raises(WorkbenchError, match="unknown settings: top"):
        generate_config({"top": 3})
    with pytest.raises(WorkbenchError, match="no chat template; turn As a chat message off"):
        prompt_ids(tokenizer, GenerateConfig(chat=True), "app")
    assert prompt_ids(tokenizer, GenerateConfig(prompt="Hello there")) == tokenizer("Hello there")["input_ids"]
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} Answer:{% endif %}")
    try:
        chat = prompt_ids(tokenizer, GenerateConfig(prompt="Hello there", chat=True))
        assert chat == tokenizer("<s>Hello there Answer:", add_special_tokens=False)["input_ids"]
        assert chat[0] == tokenizer.convert_tokens_to_ids("<s>")
    finally:
        tokenizer.chat_template = None


def test_stop_ids_are_the_tokenizers_end_tokens(tokenizer):
    model = tiny_llama()
    assert model.generation_config.eos_token_id == 2 and 2 not in tokenizer.all_special_ids
    assert stop_ids(tokenizer, model) == frozenset()      # a random model's default id 2 is an ordinary token
    tokenizer.eos_token = "<s>"
    try:
        assert stop_ids(tokenizer, model) == frozenset({tokenizer.convert_tokens_to_ids("<s>")})
    finally:
        tokenizer.eos_token = None


# -- the quantized model from a run's codes -----------------------------------------------------

SMALL = dict(calib_samples=4, seqlen=32, eval_windows=-1, bits=3, group_size=16, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints):
    models = workspace.ModelCache()
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], method="gptq", **SMALL)
    result = workspace.quantize_copy(cfg, models=models)
    outcome = workspace.Outcome(cfg, result.report, Reconstruction(), packed=result.packed)
    return models, cfg, result, outcome


def test_the_codes_rebuild_the_runs_model_over_the_shared_tensors(quantized):
    models, cfg, result, _ = quantized
    fp = models.get(cfg.model).loaded.model
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    rebuilt = tryit.with_codes(fp, result.packed)
    got, want = rebuilt.state_dict(), result.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    # only the quantized weights are new tensors; the rest are the shared model's own
    quantized_names = {f"{n}.weight" for n in result.packed}
    for name, t in rebuilt.state_dict().items():
        assert (t.data_ptr() == fp.state_dict()[name].data_ptr()) == (name not in quantized_names)
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())     # the shared model untouched


def test_try_outcome_continues_with_the_runs_model(quantized):
    models, cfg, result, outcome = quantized
    gen = GenerateConfig(prompt="The game began", tokens=12)
    d = tryit.try_outcome(outcome, gen, models=models)
    shared = models.get(cfg.model)
    ids = shared.tokenizer("The game began")["input_ids"]
    assert d.prompt_ids == ids
    assert d.fp.tokens == brute_force(shared.loaded.model, ids, 12)[0]
    assert d.quant.tokens == brute_force(result.model, ids, 12)[0]
    assert tryit.try_result(result, gen, models=models).quant.tokens == d.quant.tokens
    # the quantized model is kept (one) and reused; another run's codes replace it
    entry = tryit._ENTRIES[shared.loaded.model]
    kept = entry.quant
    again = tryit.try_outcome(outcome, gen, models=models)
    assert entry.quant is kept and entry.packed is outcome.packed
    assert again.fp is d.fp and again.quant.tokens == d.quant.tokens     # full precision's continuation kept too
    other = workspace.Outcome(cfg, result.report, Reconstruction(), packed=dict(result.packed))
    tryit.try_outcome(other, gen, models=models)
    assert entry.quant is not kept and entry.packed is other.packed
    both = tryit.try_outcomes([outcome], models=models, prompt="The game began", tokens=12)
    assert both["gptq"].quant.tokens == d.quant.tokens


def test_try_refuses_what_it_cannot_do(quantized):
    models, cfg, result, outcome = quantized
    with pytest.raises(WorkbenchError, match="run a quantization first"):
        tryit.try_outcomes([], models=models)
    gone = workspace.Outcome(cfg, result.report, Reconstruction(), packed=None)
    with pytest.raises(WorkbenchError, match="no longer kept"):
        tryit.try_outcome(gone, models=models)
    with pytest.raises(WorkbenchError, match=r"Prompt \(\d+ tokens\) and Tokens 256 need \d+ positions, more than "
                                             r"the model's 256 \(max_position_embeddings\); lower Tokens to \d+"):
        tryit.try_outcome(outcome, models=models, face="app", tokens=256)
    with pytest.raises(WorkbenchError, match="either a GenerateConfig or its fields"):
        tryit.try_outcome(outcome, GenerateConfig(), models=models, tokens=3)


def test_html_escapes_and_marks_the_divergence(tokenizer):
    model = tiny_llama()
    other = perturbed(model, 0.1)
    ids = tokenizer("<b>bold</b> & co")["input_ids"]
    d = compare(model, other, ids, STEPS)
    page = continuation_html(tokenizer, d, "GPTQ")
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page and "<b>bold</b>" not in page
    assert page.count('class="wb-try-row"') == 2 and f'data-first="{d.first}"' in page
    assert page.count("wb-tok wb-first") == 2                # one outlined token in each text
    assert page.count('class="wb-tok') == len(pieces(tokenizer, ids, d.fp.tokens)) + \
        len(pieces(tokenizer, ids, d.quant.tokens))
    assert f"parts at token {d.first + 1}" in page
    frame = top_frame(tokenizer, d, "GPTQ")
    assert list(frame.columns) == ["rank", "full precision token", "full precision p", "GPTQ token", "GPTQ p"]
    assert len(frame) == 5 and frame["GPTQ p"].is_monotonic_decreasing
    assert frame["full precision token"][0] == repr(tokenizer.decode([d.fp.tokens[d.first]]))
    assert "first divergence" in top_caption(d)
    many = comparison_html(tokenizer, {"rtn": d, "gptq": compare(model, model, ids, STEPS, fp=d.fp)},
                           {"rtn": "RTN", "gptq": "GPTQ"})
    assert many.count('class="wb-try-row"') == 3 and "the same tokens as full precision" in many


def test_try_threads_are_set_and_put_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with tryit.try_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with tryit.try_threads(4):               # never more than torch has
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with tryit.try_threads(1):
                raise RuntimeError("a failed step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_what_try_it_keeps_goes_with_the_cached_model(tiny_checkpoints):
    import gc
    models = workspace.ModelCache(capacity=1)
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], method="rtn", **SMALL)
    result = workspace.quantize_copy(cfg, models=models)
    outcome = workspace.Outcome(cfg, result.report, Reconstruction(), packed=result.packed)
    tryit.try_outcome(outcome, models=models, tokens=4)
    held = sum(e.quant is not None for e in tryit._ENTRIES.values())
    assert held == 1 and models.get(cfg.model).loaded.model in tryit._ENTRIES
    del result
    models.get(tiny_checkpoints["opt"])          # the llama leaves the cache ...
    gc.collect()
    assert all(e.packed is not outcome.packed for e in tryit._ENTRIES.values())   # ... and its trees with it
