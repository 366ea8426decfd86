"""Per-browser-session state: the run in flight and the results this session has seen.

Gradio creates one ``Session`` per page load (``gr.State(Session)``) and hands the same object
to every handler of that page, so two visitors never share runs, caches or cancel buttons.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import WorkbenchError
from ..jobs import Job
from ..workspace import spectra_key

_ROOT: Path | None = None
_ROOT_LOCK = threading.Lock()
RESULT_CAPACITY = 32
SAVABLE_CAPACITY = 2       # runs whose codes stay in memory for Save and Try it (the whole model's, ~1 byte per weight)
SPECTRA_CAPACITY = 4


def files_root() -> Path:
    """This process's folder for the files pages download, the only one Gradio is allowed to serve.

    Made by ``mkdtemp``: a fresh name nobody could have planted (a link there would make the app serve
    what it points to), mode 0700 so other users of the host read nothing of it; removed at exit.
    """
    global _ROOT
    with _ROOT_LOCK:
        if _ROOT is None or not _ROOT.is_dir():
            _ROOT = Path(tempfile.mkdtemp(prefix="quant-workbench-app-"))
            atexit.register(shutil.rmtree, _ROOT, True)
        return _ROOT


class Session:
    def __init__(self):
        self.job: Job | None = None
        self.results: OrderedDict = OrderedDict()     # QuantizeConfig -> Outcome, oldest first
        self.spectra: OrderedDict = OrderedDict()     # workspace.spectra_key(config) -> (config, Spectra)
        self.last_quantize = None                     # Outcome
        self.last_compare: list = []                  # Outcomes of the latest Compare
        self.current_spectra = None                   # (QuantizeConfig, Spectra) shown in Inspect
        self.plan_draft = None                        # planning.Draft of the Plan panel
        self._files: Path | None = None
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        # Gradio deep-copies state values; a session holds threads and events, and is per page anyway
        return self

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def start(self, work, name: str) -> Job:
        # two clicks arrive on two server threads: the check and the start are one step
        with self._lock:
            if self.busy:
                raise WorkbenchError("a run is already going in this page; wait for it or press Cancel")
            self.job = Job(work, name).start()
            return self.job

    def cancel(self) -> bool:
        if self.busy:
            self.job.cancel.set()
            return True
        return False

    def remember(self, outcome):
        key = outcome.config
        self.results.pop(key, None)
        self.results[key] = outcome
        while len(self.results) > RESULT_CAPACITY:
            self.results.popitem(last=False)
        # the runs shown in Quantize and in the latest comparison keep their codes too: Save and Try it use them
        shown = [self.last_quantize, *self.last_compare]
        for old in list(self.results.values())[:-SAVABLE_CAPACITY]:
            if not any(old is o for o in shown):
                old.packed = None

    def cached(self, config):
        return self.results.get(config)

    def cached_spectra(self, config):
        hit = self.spectra.get(spectra_key(config))
        return None if hit is None else hit[1]

    def remember_spectra(self, config, spectra):
        key = spectra_key(config)
        self.spectra.pop(key, None)
        self.spectra[key] = (config, spectra)
        while len(self.spectra) > SPECTRA_CAPACITY:
            self.spectra.popitem(last=False)
        self.current_spectra = (config, spectra)

    def outcomes_for(self, model: str) -> list:
        """The latest outcome per method for ``model``, in method order of first appearance."""
        latest = {}
        for config, outcome in self.results.items():
            if config.model == model:
                latest[config.method] = outcome
        return list(latest.values())

    def files_dir(self) -> Path:
        if self._files is None:
            self._files = Path(tempfile.mkdtemp(prefix="session-", dir=files_root()))
        return self._files

    def close(self):
        self.cancel()
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)


def close_session(session):
    """``gr.State`` delete callback: the page is gone, stop its run and drop its files."""
    if isinstance(session, Session):
        session.close()
