"""Try it: the full-precision model and a run's quantized model continue the same prompt.

A run keeps its codes (``Outcome.packed``), not its model. The quantized model is rebuilt when
asked: a second module tree over the cached full-precision model's tensors, with only the quantized
layers' weights its own (the dequantized codes, as ``save_outcome`` writes them). One quantized
model is kept in the process, the latest asked for, so trying the same run again is immediate and
trying another replaces it. The full-precision side is such a tree too, over all the same tensors:
walks of the shared model swap its first block for a moment (under its lock), and a tree of its own
can generate while a walk goes on. Both are held only while their shared model is cached, and so
are the last few full-precision continuations: the next run tried on the same prompt decodes only
its own side.

Generations run one at a time in the process, on ``THREADS`` of torch's threads.
"""
from __future__ import annotations

import copy
import itertools
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .api import QuantizeResult, rebuild_transformed
from .errors import WorkbenchError
from .generate import Continuation, GenerateConfig, GenerationDiff, check_positions, compare, generate_config, greedy, \
    prompt_ids, stop_ids
from .workspace import MODELS, ModelCache, Outcome, SharedModel, holding

_LOCK = threading.Lock()
# Decoding one token is a matrix-vector product per layer, bound by memory bandwidth, and rebuilding a
# model is elementwise work on many small tensors. On the 2-core CPU with one other busy process, 20 tokens
# of the embedded model took 2.1 s on one thread and 5-9 s on two, and rebuilding the whole model from
# its codes 0.5 s against 5.1 s: the second thread waits on a busy core at every op (the app's own runs
# keep a core busy too).
THREADS = 1
CONTINUATIONS = 16     # full-precision continuations kept per model (a few kilobytes each)


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def with_codes(model: nn.Module, packed: dict) -> nn.Module:
    """``model``'s tree over its tensors, with each layer in ``packed`` holding its dequantized codes
    (in the layer's dtype); ``model`` itself is left as it is."""
    out = structural_copy(model)
    for name, q in packed.items():
        layer = out.get_submodule(name)
        layer.weight = nn.Parameter(q.dequantize().to(layer.weight.dtype).to(layer.weight.device),
                                    requires_grad=False)
    return out.eval()


@dataclass
class _Entry:
    view: nn.Module                 # the full-precision tree
    packed: dict | None = None      # whose codes ``quant`` holds
    quant: nn.Module | None = None
    continuations: OrderedDict = field(default_factory=OrderedDict)   # full precision's, by prompt and length

    def fp(self, ids: list[int], tokens: int, stop: frozenset[int], cancel=None) -> Continuation:
        """The full-precision continuation, made once per prompt: trying the next run on the same prompt
        decodes only the quantized side."""
        key = (tuple(ids), tokens, stop)
        if key not in self.continuations:
            self.continuations[key] = greedy(self.view, ids, tokens, stop, cancel=cancel)
            while len(self.continuations) > CONTINUATIONS:
                self.continuations.popitem(last=False)
        self.continuations.move_to_end(key)
        return self.continuations[key]


# keyed by the shared model's module: an entry goes when the model cache lets the model go
_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()


def _entry(shared: SharedModel, cancel=None) -> _Entry:
    entry = _ENTRIES.get(shared.loaded.model)
    if entry is None:
        with holding(shared.lock, cancel):     # not while a walk has the first block swapped out
            entry = _Entry(structural_copy(shared.loaded.model).eval())
        _ENTRIES[shared.loaded.model] = entry
    return entry


def _quantized(shared: SharedModel, outcome: Outcome, cancel=None) -> nn.Module:
    entry = _entry(shared, cancel)
    packed = outcome.packed
    if entry.packed is not packed:
        for other in list(_ENTRIES.values()):      # one quantized model in the process
            other.packed = other.quant = None
        if outcome.config.transforms_activations:   # rotated weights over all tensors: a full copy of its own
            entry.quant = rebuild_transformed(shared.working_copy(cancel), outcome.config, outcome.report.layers,
                                              packed)
        else:
            entry.quant = with_codes(entry.view, packed)
        entry.packed = packed
    return entry.quant


@contextmanager
def try_threads(n: int | None = None):
    """torch's intra-op threads set to ``n`` (default ``THREADS``; at most what it has) while Try it
    builds and decodes, then put back. The setting is the process's: a run in another thread computes on
    as many for those seconds."""
    n = THREADS if n is None else n
    before = torch.get_num_threads()
    if not n or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _codes(outcome: Outcome) -> dict:
    if outcome.packed is None:
        raise WorkbenchError(f"the {outcome.method} run's quantized weights are no longer kept (only the latest "
                             f"runs keep them); run it again to try it")
    return outcome.packed


def _config(gen: GenerateConfig | None, face: str, values: dict) -> GenerateConfig:
    if gen is None:
        return generate_config(values, face)
    if values:
        raise WorkbenchError("give either a GenerateConfig or its fields as keywords, not both")
    return gen.validate(face)


def _prompt(shared: SharedModel, gen: GenerateConfig, face: str) -> list[int]:
    ids = prompt_ids(shared.tokenizer, gen, face)
    check_positions(shared.loaded.model, len(ids), gen.tokens, face)
    return ids


def try_outcomes(outcomes: list[Outcome], gen: GenerateConfig | None = None, *, models: ModelCache = MODELS,
                 cancel=None, face: str = "api", **values) -> dict[str, GenerationDiff]:
    """The full-precision model and each run's quantized model continue the prompt (the full-precision
    continuation is made once); by the runs' names (``Outcome.name``), in the order given. The runs must be
    of one model."""
    gen = _config(gen, face, values)
    if not outcomes:
        raise WorkbenchError("nothing to try yet: run a quantization first")
    names = {o.config.model for o in outcomes}
    if len(names) > 1:
        raise WorkbenchError(f"the runs are of different models ({', '.join(sorted(names))}); try one model's runs")
    for o in outcomes:
        _codes(o)
    shared = models.get(outcomes[0].config.model, cancel)
    ids = _prompt(shared, gen, face)
    with holding(_LOCK, cancel):
        entry = _entry(shared, cancel)     # may wait for a walk's lock: not on fewer threads than the walk
        view = entry.view
        stop = stop_ids(shared.tokenizer, view)
        with try_threads():
            fp = entry.fp(ids, gen.tokens, stop, cancel)
            out = {}
            for o in outcomes:
                quant = _quantized(shared, o, cancel)
                out[o.name] = compare(view, quant, ids, gen.tokens, stop, cancel=cancel, fp=fp)
        return out


def try_outcome(outcome: Outcome, gen: GenerateConfig | None = None, *, models: ModelCache = MODELS, cancel=None,
                face: str = "api", **values) -> GenerationDiff:
    """The full-precision model and ``outcome``'s quantized model continue the same prompt, greedily."""
    return try_outcomes([outcome], gen, models=models, cancel=cancel, face=face, **values)[outcome.name]


def try_result(result: QuantizeResult, gen: GenerateConfig | None = None, *, models: ModelCache = MODELS,
               cancel=None, face: str = "api", **values) -> GenerationDiff:
    """The same for a ``QuantizeResult``, whose quantized model is at hand; the full-precision model is the
    cached one of the report's ``model``."""
    gen = _config(gen, face, values)
    shared = models.get(result.report.model, cancel)
    ids = _prompt(shared, gen, face)
    with holding(_LOCK, cancel):
        entry = _entry(shared, cancel)
        stop = stop_ids(shared.tokenizer, entry.view)
        with try_threads():
            return compare(entry.view, result.model.eval(), ids, gen.tokens, stop, cancel=cancel,
                           fp=entry.fp(ids, gen.tokens, stop, cancel))

