"""Full-precision models shared by every session of the app, loaded once and never modified.

A run quantizes its own deep copy. Walking a model (spectra, reconstruction) briefly swaps
its first block for an input catcher, so walks of the shared model take its lock. Texts are
tokenized once per model and full-precision perplexities computed once per evaluation set:
on a CPU they cost as much as quantizing a few blocks.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass, field

from ..data import CachingTokenizer
from ..models.loading import LoadedModel, load_model


@dataclass
class SharedModel:
    loaded: LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer: CachingTokenizer = None
    _perplexities: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer = CachingTokenizer(self.loaded.tokenizer)

    def private(self) -> LoadedModel:
        """The shared weights with the shared, thread-safe tokenizer."""
        return dataclasses.replace(self.loaded, tokenizer=self.tokenizer)

    def working_copy(self) -> LoadedModel:
        """A deep copy to quantize in place."""
        with self.lock:
            model = copy.deepcopy(self.loaded.model).eval()
        return dataclasses.replace(self.private(), model=model)

    def fp_perplexity(self, key, compute) -> float:
        """The full-precision perplexity for ``key`` (text, windows, device), computed once."""
        if key not in self._perplexities:
            self._perplexities[key] = compute()
        return self._perplexities[key]


class ModelCache:
    def __init__(self, loader=load_model, capacity: int = 2):
        self._loader, self._capacity = loader, capacity
        self._models: dict[str, SharedModel] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, spec: str) -> SharedModel:
        spec = spec.strip()
        with self._guard:
            if spec in self._models:
                return self._models[spec]
            lock = self._loading.setdefault(spec, threading.Lock())
        with lock:   # one load per name even when two sessions ask at once
            with self._guard:
                if spec in self._models:
                    return self._models[spec]
            shared = SharedModel(self._loader(spec))
            with self._guard:
                while len(self._models) >= self._capacity:   # oldest out: models are large
                    self._models.pop(next(iter(self._models)))
                self._models[spec] = shared
            return shared

    def loaded(self, spec: str) -> bool:
        return spec.strip() in self._models


MODELS = ModelCache()
