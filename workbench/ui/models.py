"""Full-precision models shared by every session of the app, loaded once and never modified.

A run quantizes its own deep copy. Walking a model (spectra, reconstruction) briefly swaps
its first block for an input catcher, so walks of the shared model take its lock.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass

from ..models.loading import LoadedModel, load_model


@dataclass
class SharedModel:
    loaded: LoadedModel
    lock: threading.Lock

    def private(self) -> LoadedModel:
        """The shared weights with a tokenizer of its own (fast tokenizers are not thread-safe)."""
        return dataclasses.replace(self.loaded, tokenizer=copy.deepcopy(self.loaded.tokenizer))

    def working_copy(self) -> LoadedModel:
        """A deep copy to quantize in place."""
        with self.lock:
            model = copy.deepcopy(self.loaded.model).eval()
        return dataclasses.replace(self.private(), model=model)


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
            shared = SharedModel(self._loader(spec), threading.Lock())
            with self._guard:
                while len(self._models) >= self._capacity:   # oldest out: models are large
                    self._models.pop(next(iter(self._models)))
                self._models[spec] = shared
            return shared

    def loaded(self, spec: str) -> bool:
        return spec.strip() in self._models


MODELS = ModelCache()
