"""Continuations as HTML: the prompt, then each model's tokens, those the other model lacks highlighted
and the first divergence outlined; and the top-k next tokens of both at the first divergence."""
from __future__ import annotations

import html

import pandas as pd

from ..generate import Continuation, GenerationDiff, pieces, token_label

CHANGED = "background:#fde68a;border-radius:3px"
FIRST = "background:#fca5a5;border-radius:3px;outline:2px solid #dc2626"
PROMPT = "color:#6b7280"
TEXT = ("white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:0.92em;"
        "line-height:1.5;padding:6px 10px;border:1px solid #e5e7eb;border-radius:6px")


def divergence_note(diff: GenerationDiff, label: str = "the quantized model") -> str:
    n = len(diff.fp.tokens)
    if diff.first is None:
        return f"{label} gives the same {n} tokens as full precision"
    return f"{label} agrees with full precision on the first {diff.first} tokens and parts at token {diff.first + 1}"


def _tokens_html(tokenizer, context: list[int], cont: Continuation, changed: list[bool], first: int | None) -> str:
    out = []
    for p in pieces(tokenizer, context, cont.tokens):
        span = range(p.first, p.last + 1)
        if first is not None and first in span:
            style, cls = FIRST, "wb-tok wb-first"
        elif any(changed[i] for i in span):
            style, cls = CHANGED, "wb-tok wb-changed"
        else:
            style, cls = "", "wb-tok"
        where = f"token {p.first + 1}" if p.first == p.last else f"tokens {p.first + 1}-{p.last + 1}"
        out.append(f'<span class="{cls}" title="{where}" style="{style}">{html.escape(p.text)}</span>')
    return "".join(out)


def _row(tokenizer, prompt: str, context: list[int], key: str, label: str, note: str, cont: Continuation,
         changed: list[bool], first: int | None) -> str:
    ended = " (the model ended the text)" if cont.stopped else ""
    return (f'<div class="wb-try-row" data-model="{html.escape(key)}" data-first="{"" if first is None else first}" '
            f'style="margin:6px 0">'
            f'<div style="font-size:0.9em;margin-bottom:2px"><b>{html.escape(label)}</b> &middot; '
            f'{len(cont.tokens)} tokens in {cont.seconds:.1f} s{html.escape(ended)}{html.escape(note)}</div>'
            f'<div class="wb-try-text" style="{TEXT}"><span class="wb-try-prompt" style="{PROMPT}">'
            f'{html.escape(prompt)}</span>{_tokens_html(tokenizer, context, cont, changed, first)}</div></div>')


def _legend() -> str:
    return (f'<div style="font-size:0.85em;color:#4b5563">grey: the prompt &middot; '
            f'<span style="{FIRST}">first divergence</span> &middot; '
            f'<span style="{CHANGED}">tokens the other text lacks</span> (aligned, so a phrase shared after a '
            f'detour stays plain)</div>')


def continuation_html(tokenizer, diff: GenerationDiff, label: str = "quantized") -> str:
    """The two continuations, full precision first, one above the other."""
    prompt = tokenizer.decode(diff.prompt_ids, clean_up_tokenization_spaces=False)
    rows = [_row(tokenizer, prompt, diff.prompt_ids, "fp", "full precision", "", diff.fp, diff.fp_changed, diff.first),
            _row(tokenizer, prompt, diff.prompt_ids, "quant", label, "", diff.quant, diff.quant_changed, diff.first)]
    return (f'<div class="wb-try" data-first="{"" if diff.first is None else diff.first}">'
            f'<div style="margin-bottom:4px">{html.escape(divergence_note(diff, label))}</div>'
            + "".join(rows) + _legend() + "</div>")


def comparison_html(tokenizer, diffs: dict[str, GenerationDiff], labels: dict[str, str] | None = None) -> str:
    """Full precision, then each method's continuation marked against it (the diffs share one prompt and
    one full-precision continuation)."""
    if not diffs:
        return ""
    labels = labels or {}
    first = next(iter(diffs.values()))
    prompt = tokenizer.decode(first.prompt_ids, clean_up_tokenization_spaces=False)
    no_marks = [False] * len(first.fp.tokens)
    rows = [_row(tokenizer, prompt, first.prompt_ids, "fp", "full precision", "", first.fp, no_marks, None)]
    for key, d in diffs.items():
        label = labels.get(key, key)
        note = (" · the same tokens as full precision" if d.first is None
                else f" · parts from full precision at token {d.first + 1}")
        rows.append(_row(tokenizer, prompt, d.prompt_ids, key, label, note, d.quant, d.quant_changed, d.first))
    return '<div class="wb-try wb-try-compare">' + "".join(rows) + _legend() + "</div>"


def top_frame(tokenizer, diff: GenerationDiff, label: str = "quantized") -> pd.DataFrame:
    """Rank, token and probability of both models' top-k next tokens at ``diff.at``."""
    fp, quant = diff.top()
    rows = []
    for rank in range(max(len(fp), len(quant))):
        row = {"rank": rank + 1}
        for name, top in (("full precision", fp), (label, quant)):
            token, p = top[rank] if rank < len(top) else (None, None)
            row[f"{name} token"] = None if token is None else token_label(tokenizer, token)
            row[f"{name} p"] = None if p is None else round(float(p), 4)
        rows.append(row)
    return pd.DataFrame(rows)


def top_caption(diff: GenerationDiff) -> str:
    if diff.first is None:
        return f"Top-{len(diff.fp.top(diff.at))} next tokens at the last token ({diff.at + 1}): the texts never part"
    return f"Top-{len(diff.fp.top(diff.at))} next tokens at the first divergence (token {diff.at + 1})"
