"""Cancel stops a run wherever it waits; sessions start runs one at a time; memory and compiled
kernels are per run, not left to whichever run came first."""
import threading
import time

import pytest
import torch

from workbench import workspace
from workbench.config import QuantizeConfig
from workbench.errors import Cancelled, WorkbenchError
from workbench.models.loading import load_model
from workbench.quant import compiled
from workbench.ui import session as session_module
from workbench.ui.session import Session

TINY = dict(calib_samples=2, seqlen=32, eval_windows=2, group_size=16, max_blocks=1, device="cpu", batch_size=1)


def cancelled_soon(delay=0.3):
    cancel = threading.Event()
    threading.Timer(delay, cancel.set).start()
    return cancel


def timed(fn):
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        fn()
    return time.perf_counter() - t0


def test_cancel_while_the_model_loads(tiny_checkpoints):
    def slow(spec):
        time.sleep(4)
        return load_model(spec)
    models = workspace.ModelCache(loader=slow)
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], **TINY)
    assert timed(lambda: workspace.run(cfg, models=models, cancel=cancelled_soon())) < 2
    # the load went on in the background and serves the next run
    deadline = time.time() + 30
    while not models.loaded(cfg.model) and time.time() < deadline:
        time.sleep(0.1)
    assert models.loaded(cfg.model)


@pytest.mark.parametrize("what", ["run", "spectra"])
def test_cancel_while_waiting_on_the_model_lock(tiny_checkpoints, what):
    models = workspace.ModelCache()
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], **TINY)
    shared = models.get(cfg.model)
    shared.lock.acquire()         # another session's walk of the shared model
    try:
        fn = workspace.run if what == "run" else workspace.spectra
        # the lock stays held throughout: without a cancellable wait this would never return
        # (the seconds allowed cover tokenizing the calibration text on a busy machine)
        assert timed(lambda: fn(cfg, models=models, cancel=cancelled_soon())) < 10
    finally:
        shared.lock.release()


def test_cancel_during_the_quantized_perplexity(tiny_checkpoints):
    models = workspace.ModelCache()
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], **{**TINY, "eval_windows": 8})
    cancel = threading.Event()

    def on_event(ev):
        if ev.kind == "phase" and "quantized perplexity" in ev.message:
            cancel.set()
    with pytest.raises(Cancelled):
        workspace.run(cfg, models=models, on_event=on_event, cancel=cancel)


def test_a_session_starts_one_run_even_when_two_clicks_race(monkeypatch):
    class SlowJob(session_module.Job):
        def __init__(self, *a, **k):
            time.sleep(0.2)          # the window between the check and the start
            super().__init__(*a, **k)
    monkeypatch.setattr(session_module, "Job", SlowJob)
    s, started, refused = Session(), [], []
    release = threading.Event()
    gate = threading.Barrier(2)

    def click():
        gate.wait()
        try:
            started.append(s.start(lambda post, cancel: release.wait(5), "run"))
        except WorkbenchError:
            refused.append(1)
    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    release.set()
    assert len(started) == 1 and len(refused) == 1


def test_peak_memory_is_the_runs_own(tiny_checkpoints):
    import workbench
    big = torch.ones(600 * 2 ** 20 // 4)       # 600 MB touched, then freed: a large earlier run
    del big
    report = workbench.quantize(model=tiny_checkpoints["llama"], **{**TINY, "eval_windows": -1}).report
    import resource
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0 < report.peak_memory_bytes < process_peak - 300 * 2 ** 20


def test_an_out_of_memory_in_a_compiled_kernel_does_not_turn_it_eager_for_every_run():
    calls = []

    def eager(x):
        calls.append("eager")
        return x + 1

    def flaky(x):
        calls.append("compiled")
        if calls.count("compiled") == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x + 1
    fn = compiled._with_fallback(eager, flaky)
    assert fn(1) == 2 and fn(1) == 2
    assert calls == ["compiled", "eager", "compiled"]
    # a compiler that cannot work is given up on
    broken = compiled._with_fallback(eager, lambda x: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    calls.clear()
    with pytest.warns(RuntimeWarning):
        broken(1)
    broken(1)
    assert calls == ["eager", "eager"]
