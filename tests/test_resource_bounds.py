"""A run that cannot fit in memory is refused before any work with its estimate and the free memory;
heavy runs share a few slots, the others wait their turn."""
import threading
import time

import pytest
import torch

from tests.conftest import tiny_llama
from workbench import memory, workspace
from workbench.cli import main
from workbench.config import QuantizeConfig
from workbench.errors import Cancelled, WorkbenchError


def smollm_like():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):      # shapes only, no memory
        return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                            max_position_embeddings=32768))


def test_the_estimate_grows_with_the_settings():
    model = smollm_like()
    small = memory.estimate(QuantizeConfig(), model, copies=1)
    huge = memory.estimate(QuantizeConfig(calib_samples=4096, seqlen=32768, method="boa"), model, copies=1,
                           attention_aware=True)
    assert 0.3 * memory.GiB < small.host_bytes < 4 * memory.GiB
    assert huge.host["attention"] >= 150 * memory.GiB          # BoA's [b, heads, L, L] alone
    assert huge.host_bytes > 500 * memory.GiB
    with pytest.raises(WorkbenchError, match=r"needs about \d+\.\d GiB of memory at its peak .* GiB is free; lower"):
        memory.check_fits(huge, torch.device("cpu"), "lower the settings")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("long")
    tiny_llama(max_position_embeddings=32768).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


def test_the_cli_refuses_a_run_that_cannot_fit(long_model, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["quantize", "--model", long_model, "--method", "boa", "--calib-samples", "4096", "--seqlen",
                 "32768", "--batch-size", "64", "--device", "cpu", "--quiet", "--report", str(report)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "needs about" in err[0] and "GiB is free" in err[0] and "--calib-samples, --seqlen, --batch-size" in err[0]
    assert not report.exists()


def test_the_workspace_refuses_it_before_copying_the_model(long_model):
    events = []
    cfg = QuantizeConfig(model=long_model, method="boa", calib_samples=4096, seqlen=32768, batch_size=64,
                         device="cpu")
    with pytest.raises(WorkbenchError, match="needs about"):
        workspace.run(cfg, models=workspace.ModelCache(), on_event=events.append)
    assert not any("copying" in (e.message or "") for e in events)


def test_runs_wait_for_a_free_slot_and_can_be_cancelled_while_waiting(monkeypatch):
    slots = workspace.RunSlots(1)
    inside, release = threading.Event(), threading.Event()

    def first():
        with slots.held():
            inside.set()
            release.wait(10)
    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    said = []
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        with slots.held(cancel, lambda ev: said.append(ev.message), "gptq"):
            pytest.fail("ran beside the other run")
    assert time.perf_counter() - t0 < 3
    assert said and "waiting for a free slot (1 of 1 runs going)" in said[0]
    got = []

    def second():
        with slots.held():
            got.append(slots.active)
    t2 = threading.Thread(target=second)
    t2.start()
    time.sleep(0.3)
    assert got == []                    # still waiting
    release.set()
    t.join(5)
    t2.join(5)
    assert got == [1] and slots.active == 0
    with slots.held():
        with slots.held():              # the same thread again: no deadlock
            assert slots.active == 1
