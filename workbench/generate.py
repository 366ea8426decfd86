"""Greedy continuations of one prompt by two models, and where they part.

``greedy`` continues a prompt one token at a time, always taking the most likely token, with the
model's key-value cache (each step feeds one token, not the whole text again). ``compare`` puts a
full-precision and a quantized continuation side by side: the first token where they differ, the
tokens each has that the other lacks (aligned with difflib, so a shared phrase after a detour is
not counted as different), and both models' top-k next-token probabilities at the first
divergence, or at the last token when they never diverge. Up to the first divergence both models
saw the same text, so their probabilities there answer the same question.

The prompt is continued as plain text by default, the way perplexity reads text; ``chat`` wraps
it in the tokenizer's chat template first, so an instruct model answers it as a user's message.
"""
from __future__ import annotations

import difflib
import inspect
import time
from dataclasses import dataclass, field, fields

import torch

from .errors import Cancelled, WorkbenchError
from .settings import Setting, setting, settings_of

TOP_K = 5
MAX_TOKENS = 256      # a CPU continues the embedded model by about 20 tokens a second per model
DEFAULT_PROMPT = "Once upon a time, in a small village by the sea,"
CONTEXT_TOKENS = 8    # tokens of left context a piece is decoded after (spaces and merges depend on them)


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str = setting(DEFAULT_PROMPT, str, "Prompt", "the text both models continue")
    tokens: int = setting(40, int, "Tokens", "tokens each model adds, each time its most likely one",
                          low=1, high=MAX_TOKENS)
    chat: bool = setting(False, bool, "As a chat message", "wrap the prompt in the tokenizer's chat template "
                         "(an instruct model answers it) instead of continuing it as plain text")

    def validate(self, face: str = "api") -> "GenerateConfig":
        """Every field through its declaration; messages name the fields the way ``face`` does."""
        return GenerateConfig(**{f.name: GENERATE_SETTINGS[f.name].parse(getattr(self, f.name), face)
                                 for f in fields(self)})


GENERATE_SETTINGS: dict[str, Setting] = settings_of(GenerateConfig)


def generate_config(values: dict | None = None, face: str = "api") -> GenerateConfig:
    """Raw values by field name (from a form, keywords) as a checked config."""
    values = dict(values or {})
    unknown = set(values) - set(GENERATE_SETTINGS)
    if unknown:
        raise WorkbenchError(f"unknown settings: {', '.join(sorted(unknown))}; known: {', '.join(GENERATE_SETTINGS)}")
    return GenerateConfig(**values).validate(face)


# -- the prompt ---------------------------------------------------------------------------------

def prompt_ids(tokenizer, cfg: GenerateConfig, face: str = "api") -> list[int]:
    """The prompt's token ids: the plain text, or the text as the chat template lays out a user's message."""
    if cfg.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise WorkbenchError(f"this model's tokenizer has no chat template; turn "
                                 f"{GENERATE_SETTINGS['chat'].who(face)} off to continue the prompt as plain text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": cfg.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(cfg.prompt)["input_ids"]
    if not ids:
        raise WorkbenchError(f"{GENERATE_SETTINGS['prompt'].who(face)} gives no tokens; type some text")
    return list(ids)


def check_positions(model, n_prompt: int, tokens: int, face: str = "api"):
    """Refuse a prompt and continuation longer than the positions the model was trained on."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit or n_prompt + tokens <= limit:
        return
    who_p, who_t = (GENERATE_SETTINGS[n].who(face) for n in ("prompt", "tokens"))
    if n_prompt >= limit:
        raise WorkbenchError(f"{who_p} is {n_prompt} tokens, as long as or longer than the model's {limit} positions "
                             f"(max_position_embeddings); shorten it")
    raise WorkbenchError(f"{who_p} ({n_prompt} tokens) and {who_t} {tokens} need {n_prompt + tokens} positions, more "
                         f"than the model's {limit} (max_position_embeddings); lower {who_t} to {limit - n_prompt} or "
                         f"shorten the prompt")


def stop_ids(tokenizer, model) -> frozenset[int]:
    """Tokens that end a continuation: the tokenizer's end of text, and the model's own end tokens that
    the tokenizer knows as special (a random test model's default id 2 is an ordinary token)."""
    found = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    ends = getattr(config, "eos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for e in ([ends] if isinstance(ends, int) else list(ends or ())):
        if int(e) in special:
            found.add(int(e))
    return frozenset(found)


# -- one model ----------------------------------------------------------------------------------

@dataclass
class Continuation:
    """What one model added: its tokens (the stop token included when it gave one) and, for every step,
    its top-k next tokens and their probabilities."""
    tokens: list[int]
    top_ids: torch.Tensor        # [steps, k]
    top_probs: torch.Tensor      # [steps, k]
    stopped: bool = False        # ended on a stop token before the requested length
    seconds: float = 0.0

    def top(self, step: int) -> list[tuple[int, float]]:
        return list(zip(self.top_ids[step].tolist(), self.top_probs[step].tolist()))


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Forward:
    """One model's forward calls for decoding, in the argument names its transformers version takes: the
    key-value cache is ``cache`` in transformers 5 and ``past_key_values`` before; only the last
    positions' logits are computed where the model can be told so."""

    def __init__(self, model):
        self.model, self.device = model, _device(model)
        params = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.keep_name = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)

    def __call__(self, ids: list[int], cache=None, last: int = 1):
        kw = {} if cache is None else {self.cache_name: cache}
        if self.keep_name is not None:
            kw[self.keep_name] = last
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **kw)
        return out.logits[0, -last:], out["cache"] if "cache" in out else out["past_key_values"]


def _step_top(logits: torch.Tensor, k: int):
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, min(k, probs.shape[-1]))
    return int(torch.argmax(logits)), top.indices.cpu(), top.values.cpu()


@torch.inference_mode()
def greedy(model, ids: list[int], tokens: int, stop: frozenset[int] = frozenset(), k: int = TOP_K,
           cancel=None, guess: list[int] | None = None) -> Continuation:
    """``tokens`` greedy steps after ``ids``, feeding only the newest token at each step (the key-value
    cache holds the rest). Stops early after a token in ``stop``; ``cancel.is_set()`` ends it with
    ``Cancelled`` between steps.

    ``guess`` is a continuation another model made (the full-precision one). The prompt and the guess go
    through the model in one pass, which gives the model's own choice after every prefix of the guess:
    the guess is kept as far as the model would have chosen the same tokens, and the model goes on alone
    from the first token it chooses differently. The tokens are those it chooses without a guess; a
    quantized model that agrees with full precision for long costs one pass instead of a step per token.
    """
    if tokens < 1:
        raise WorkbenchError(f"tokens must be at least 1, got {tokens}")
    started = time.perf_counter()
    forward = _Forward(model)
    chosen, top_ids, top_probs = [], [], []

    def take(row) -> bool:
        """Record the step the logits ``row`` decide; True when the continuation is complete."""
        token, ti, tp = _step_top(row, k)
        chosen.append(token)
        top_ids.append(ti)
        top_probs.append(tp)
        return token in stop or len(chosen) == tokens

    def check():
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")

    check()
    guess = list(guess or [])[:tokens - 1]
    rows, cache = forward(list(ids) + guess, last=len(guess) + 1)
    done = False
    for i in range(len(guess) + 1):
        done = take(rows[i])
        if done or i == len(guess) or chosen[-1] != guess[i]:
            break
    if not done:
        # the cache holds the prompt and the whole guess; the next step follows the prompt and chosen[:-1]
        keep = len(ids) + len(chosen) - 1
        if hasattr(cache, "crop"):
            extra = cache.get_seq_length() - keep
            if extra > 0:
                cache.crop(-extra)      # a negative crop removes tokens, in every transformers version
        else:
            _, cache = forward(list(ids) + chosen[:-1])
    while not done:
        check()
        rows, cache = forward([chosen[-1]], cache)
        done = take(rows[-1])
    return Continuation(chosen, torch.stack(top_ids), torch.stack(top_probs), chosen[-1] in stop,
                        time.perf_counter() - started)


# -- two models ---------------------------------------------------------------------------------

@dataclass
class GenerationDiff:
    """A full-precision and a quantized continuation of the same prompt, compared."""
    prompt_ids: list[int]
    fp: Continuation
    quant: Continuation
    first: int | None                      # first step whose tokens differ; None: the same throughout
    fp_changed: list[bool] = field(default_factory=list)      # fp tokens the quantized text lacks
    quant_changed: list[bool] = field(default_factory=list)   # quantized tokens the fp text lacks

    @property
    def at(self) -> int:
        """The step whose top-k both models are compared at: the first divergence, or the last step."""
        last = min(len(self.fp.tokens), len(self.quant.tokens)) - 1
        return last if self.first is None else min(self.first, last)

    def top(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        return self.fp.top(self.at), self.quant.top(self.at)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (one ending early counts); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def changed_tokens(a: list[int], b: list[int]) -> tuple[list[bool], list[bool]]:
    """For each token of ``a`` and of ``b``: whether it lies outside the blocks the two share, aligned."""
    in_a, in_b = [True] * len(a), [True] * len(b)
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            in_a[block.a + i] = in_b[block.b + i] = False
    return in_a, in_b


def diff(ids: list[int], fp: Continuation, quant: Continuation) -> GenerationDiff:
    fp_changed, quant_changed = changed_tokens(fp.tokens, quant.tokens)
    return GenerationDiff(list(ids), fp, quant, first_divergence(fp.tokens, quant.tokens), fp_changed, quant_changed)


def compare(fp_model, quant_model, ids: list[int], tokens: int, stop: frozenset[int] = frozenset(), k: int = TOP_K,
            cancel=None, fp: Continuation | None = None) -> GenerationDiff:
    """Both models continue ``ids`` greedily, the quantized one checking the full-precision tokens first
    (see ``greedy``); ``fp`` reuses a full-precision continuation already made."""
    fp = fp or greedy(fp_model, ids, tokens, stop, k, cancel)
    return diff(ids, fp, greedy(quant_model, ids, tokens, stop, k, cancel, guess=fp.tokens))


# -- as text ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    text: str
    first: int      # index of its first token in the continuation
    last: int       # and of its last: a character split over tokens is one piece


def pieces(tokenizer, context: list[int], tokens: list[int]) -> list[Piece]:
    """The continuation as text pieces, one per token except where a character spans several (its bytes
    decode to U+FFFD until the last one). Each piece is decoded after the tokens before it, so the
    spaces a tokenizer puts at word starts come out as in the whole text."""
    left = list(context[-CONTEXT_TOKENS:])

    def text(upto: int) -> str:
        return tokenizer.decode(left + tokens[:upto], clean_up_tokenization_spaces=False)

    out, start, before = [], 0, text(0)
    for j in range(1, len(tokens) + 1):
        now = text(j)
        if now.endswith("\ufffd") and j < len(tokens):
            continue          # an unfinished character: wait for its last byte
        common = len(before) if now.startswith(before) else _common_prefix(before, now)
        out.append(Piece(now[common:], start, j - 1))
        start, before = j, now
    return out


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_label(tokenizer, token: int) -> str:
    """One token as a quoted string that shows its spaces and line breaks."""
    return repr(tokenizer.decode([token], clean_up_tokenization_spaces=False))
