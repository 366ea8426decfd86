"""Calibration and evaluation token windows from text: shipped WikiText-2, a file, or a dataset."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import WorkbenchError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_TEXTS = {
    "wikitext2": ASSETS / "wikitext-2" / "valid.txt",          # calibration
    "wikitext2-detok": ASSETS / "wikitext-2" / "valid.txt",    # the same with WikiText's spacing undone
    "wikitext2-test": ASSETS / "wikitext-2" / "test.raw.txt",  # evaluation only
}
# WikiText's tokenized release splits numbers and punctuation (" @-@ ", " , "). Undoing that was
# measured on smollm2-135m GPTQ W4 g64 (act-order, MSE): ppl 33.93 detokenized vs 33.48 as is,
# so the default keeps the text as released.
_DETOKENIZE = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
               (" : ", ": "), (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")")]


def detokenize_wikitext(text: str) -> str:
    for a, b in _DETOKENIZE:
        text = text.replace(a, b)
    return text
DEFAULT_CALIB = "wikitext2"
HF_FORM = "hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"
DEFAULT_EVAL = "wikitext2-test"


def load_text(source: str) -> str:
    """``wikitext2``/``wikitext2-test``, a text file, or ``hf:NAME[:CONFIG[:SPLIT[:FIELD]]]``."""
    if source in BUILTIN_TEXTS:
        text = BUILTIN_TEXTS[source].read_text(encoding="utf-8")
        return detokenize_wikitext(text) if source == "wikitext2-detok" else text
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if not parts[0] or len(parts) > 4:
            raise WorkbenchError(f"text source {source!r} is not of the form {HF_FORM} (at most 4 fields after hf:)")
        return _dataset_text(*parts)
    path = Path(source).expanduser()
    if path.is_dir():
        raise WorkbenchError(f"text source {source!r} is a directory; give a text file, "
                             f"{', '.join(BUILTIN_TEXTS)}, or {HF_FORM}")
    if not path.is_file():
        raise WorkbenchError(f"text source {source!r} is not a file; use a text file path, "
                             f"{', '.join(BUILTIN_TEXTS)}, or {HF_FORM}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WorkbenchError(f"text source {source!r} cannot be read ({exc.strerror or type(exc).__name__}); "
                             f"check its permissions or give another file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # silently replaced bytes would calibrate on text that is not what the file says
        raise WorkbenchError(f"text source {source!r} is not UTF-8 text (bad byte at offset {exc.start}); "
                             f"convert it, e.g. iconv -t utf-8") from None


def _dataset_text(name: str, config: str | None = None, split: str = "train", field: str = "text") -> str:
    try:
        import datasets
    except ImportError:
        raise WorkbenchError("hf: text sources need the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # the hub client raises many types when offline or misspelt
        raise WorkbenchError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): "
                             f"{type(exc).__name__}; offline, only datasets in the local cache load") from None
    if field not in ds.column_names:
        raise WorkbenchError(f"dataset {name!r} has no column {field!r}; columns: {', '.join(ds.column_names)}")
    return "\n\n".join(ds[field])


# Every run tokenizes its whole calibration and evaluation texts (WikiText-2: 1.2 s each on 2 cores,
# whatever the number of windows taken), and the texts and tokenizers are the same from run to run
_TOKENS: OrderedDict = OrderedDict()      # (tokenizer fingerprint, text digest) -> ids
_TOKENS_CAPACITY = 8
_TOKENS_LOCK = threading.Lock()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of everything a fast tokenizer's encoding depends on (vocabulary, normalizer,
    pre- and post-processing, special tokens), or None where that cannot be read (slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha1(backend.to_str().encode("utf-8"))
    digest.update(repr((type(tokenizer).__name__, sorted(map(str, tokenizer.all_special_tokens)))).encode("utf-8"))
    return digest.hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids, ``[n]`` (a copy of the cached ids when this tokenizer read this text before)."""
    if not text.strip():
        raise WorkbenchError("the text is empty; give a text with content")
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = None if fingerprint is None else (fingerprint, hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest())
    with _TOKENS_LOCK:
        hit = _TOKENS.get(key) if key is not None else None
        if hit is not None:
            _TOKENS.move_to_end(key)
            return hit.clone()
    ids = torch.tensor(tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"], dtype=torch.long)
    if key is not None:
        with _TOKENS_LOCK:
            _TOKENS[key] = ids.clone()
            while len(_TOKENS) > _TOKENS_CAPACITY:
                _TOKENS.popitem(last=False)
    return ids


def calibration_windows(tokenizer, source: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random offsets drawn with ``seed``: ``[samples, seqlen]``."""
    if samples < 1 or seqlen < 2:
        raise WorkbenchError(f"need at least 1 calibration sample of 2 tokens, got {samples} x {seqlen}")
    ids = tokenize(tokenizer, load_text(source))
    if ids.numel() <= seqlen:
        raise WorkbenchError(f"calibration text {source!r} has {ids.numel()} tokens, too short for windows "
                             f"of {seqlen}; use a longer text or a smaller --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(tokenizer, source: str, seqlen: int, windows: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seqlen`` tokens (0 = all): ``[n, seqlen]``."""
    ids = tokenize(tokenizer, load_text(source))
    available = ids.numel() // seqlen
    if available == 0 or windows > available:
        raise WorkbenchError(f"evaluation text {source!r} has {ids.numel()} tokens: {available} windows of "
                             f"{seqlen}, fewer than the {windows} requested; lower --eval-windows or --seqlen")
    n = available if windows == 0 else windows
    return ids[: n * seqlen].view(n, seqlen)


class CachingTokenizer:
    """Wraps a tokenizer: each distinct text is tokenized once, one call at a time.

    Fast tokenizers are not safe to call from two threads at once, and the calibration and
    evaluation texts are the same for every run, so both needs meet in one lock and a cache.
    """

    def __init__(self, tokenizer, capacity: int = 8):
        self._tokenizer, self._capacity = tokenizer, capacity
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    def __call__(self, text, **kwargs):
        if not isinstance(text, str):
            with self._lock:
                return self._tokenizer(text, **kwargs)
        key = (hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest(), tuple(sorted(kwargs.items())))
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                hit = self._tokenizer(text, **kwargs)
                self._cache[key] = hit
                while len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            return hit

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)
