"""A Genie run's events and cancel on a tiny CNN: the counts, the predictions, the unchanged results."""
import json
import math
import threading

import pytest
import torch
from safetensors.torch import save_file

from genie_nets import ResNet18Shaped
from workbench.errors import Cancelled, WorkbenchError
from workbench.genie.distill import DistillConfig, distill
from workbench.genie.model import load_cnn
from workbench.genie.pipeline import GenieRunConfig, run_genie
from workbench.genie.progress import GenieTrace, Watch
from workbench.genie.qlayers import find_units
from workbench.genie.quantize import GenieMConfig, quantize_model

TINY = dict(weight_bits=4, act_bits=4, samples=12, distill_steps=6, distill_batch=8, iters=4, device="cpu")
UNITS = ["stem", "layer1.0", "layer2.0", "layer3.0", "fc"]


@pytest.fixture
def cnn_file(tiny_cnn, tmp_path):
    """The tiny CNN as a bare safetensors file (no JSON beside it: its settings come from the shapes)."""
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_cnn.state_dict().items()}, str(path))
    return str(path)


def test_the_architecture_is_read_from_the_weights_and_loads_them(cnn_file, tiny_cnn):
    model, info = load_cnn(cnn_file)
    assert info["model"]["widths"] == [8, 16, 16] and "data" not in info
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), tiny_cnn(x))


def test_bad_weights_are_refused_with_the_fix(tmp_path, cnn_file):
    with pytest.raises(WorkbenchError, match="not found"):
        load_cnn(tmp_path / "none.safetensors")
    with pytest.raises(WorkbenchError, match="is a directory"):
        load_cnn(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(WorkbenchError, match="is not a safetensors file"):
        load_cnn(junk)
    other = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in ResNet18Shaped().state_dict().items()}, str(other))
    with pytest.raises(WorkbenchError, match="not a digits-resnet: stem.0.weight"):
        load_cnn(other)
    with pytest.raises(WorkbenchError, match="unknown CNN architecture 'vgg'; choose one of digits-resnet"):
        load_cnn(cnn_file, "vgg")
    with pytest.raises(WorkbenchError, match="unknown CNN architecture"):
        GenieRunConfig(architecture="vgg")
    # a JSON beside the weights that contradicts them
    (tmp_path / "tiny.json").write_text(json.dumps({"model": {"widths": [4, 4, 4]}}))
    with pytest.raises(WorkbenchError, match="does not hold digits-resnet weights"):
        load_cnn(cnn_file)


def run(cnn_file, **kw):
    events = []
    out = run_genie(GenieRunConfig(model=cnn_file, **{**TINY, **kw}), on_event=events.append, gallery=10)
    return out, events


def test_events_count_the_steps_images_and_blocks(cnn_file):
    out, events = run(cnn_file)
    kinds = [e.kind for e in events]
    assert kinds.index("plan") < kinds.index("distill_step") < kinds.index("unit_step")
    plan = events[kinds.index("plan")]
    # 12 samples in batches of 8 and 4, 6 steps each
    assert plan.total == 12 and plan.names == UNITS and plan.iters == 4
    steps = [e for e in events if e.kind == "distill_step"]
    assert [e.step for e in steps] == list(range(1, 13)) and all(e.total == 12 for e in steps)
    assert all(e.loss > 0 and math.isfinite(e.loss) for e in steps)
    images = [e for e in events if e.kind == "images"]
    # snapshots every max(1, 6 // 20) = 1 step, then the finished batch; of the second batch only
    # the 2 images that fit in the gallery of 10
    assert [(e.offset, e.step, len(e.images), e.final) for e in images] == (
        [(0, s, 8, False) for s in range(6)] + [(0, 6, 8, True)]
        + [(8, 6 + s, 2, False) for s in range(6)] + [(8, 12, 2, True)])
    finals = torch.cat([e.images for e in images if e.final])
    assert torch.equal(finals, out.images[:10])
    unit_steps = [e for e in events if e.kind == "unit_step"]
    assert len(unit_steps) == 4 * len(UNITS)
    assert [(e.unit, e.step, e.index) for e in unit_steps[:5]] == [("stem", 1, 0), ("stem", 2, 0), ("stem", 3, 0),
                                                                   ("stem", 4, 0), ("layer1.0", 1, 1)]
    finished = [e for e in events if e.kind == "unit_finished"]
    assert [(e.unit, e.index, e.units) for e in finished] == [(u, i + 1, 5) for i, u in enumerate(UNITS)]
    assert [e.rel_error for e in finished] == [b["rel_error"] for b in out.report["blocks"]]
    assert [e.start_rel_error for e in finished] == [b["rtn_rel_error"] for b in out.report["blocks"]]


def test_the_captions_are_the_full_precision_models_predictions(cnn_file, tiny_cnn):
    _, events = run(cnn_file)
    for e in (ev for ev in events if ev.kind == "images"):
        with torch.no_grad():
            p = torch.softmax(tiny_cnn(e.images), dim=1)
        assert e.classes == p.argmax(1).tolist()
        assert e.confidence == pytest.approx(p.max(1).values.tolist(), abs=1e-6)


def test_watching_changes_no_result(cnn_file):
    plain = run_genie(GenieRunConfig(model=cnn_file, **TINY))
    watched, _ = run(cnn_file)
    assert torch.equal(plain.images, watched.images)
    assert plain.report["quant_accuracy"] == watched.report["quant_accuracy"]
    assert [b["rel_error"] for b in plain.report["blocks"]] == [b["rel_error"] for b in watched.report["blocks"]]
    for source in ("pixels", "noise", "real"):
        a = run_genie(GenieRunConfig(model=cnn_file, data=source, **{**TINY, "iters": 2}))
        b, events = run(cnn_file, data=source, iters=2)
        assert torch.equal(a.images, b.images) and a.report["quant_accuracy"] == b.report["quant_accuracy"]
        trace = GenieTrace(gallery=10)
        for e in events:
            trace.add(e)
        assert torch.equal(trace.shown()[0], b.images[:10])
        shots = [e for e in events if e.kind == "images"]
        if source != "pixels":      # nothing is optimized: one look at each finished batch (real: one set)
            assert len(shots) == (2 if source == "noise" else 1) and all(e.final for e in shots)
            assert not any(e.kind == "distill_step" for e in events)


def test_images_beyond_the_gallery_are_not_sent(tiny_cnn):
    cfg = DistillConfig(samples=12, batch_size=4, steps=3, image_shape=(1, 16, 16))
    seen = []
    x = distill(tiny_cnn, cfg, on_images=lambda first, step, imgs, final: seen.append((first, step, len(imgs), final)),
                image_every=2)
    assert x.shape == (12, 1, 16, 16)
    # three batches of 4; snapshots at steps 0 and 2 of each, then the finished batch
    assert seen == [(0, 0, 4, False), (0, 2, 4, False), (0, 3, 4, True),
                    (4, 3, 4, False), (4, 5, 4, False), (4, 6, 4, True),
                    (8, 6, 4, False), (8, 8, 4, False), (8, 9, 4, True)]
    watch_events = []
    watch = Watch(watch_events.append, gallery=6)
    distill(tiny_cnn, cfg, on_images=watch.on_images(tiny_cnn, "cpu", 9), image_every=2)
    assert [(e.offset, len(e.images)) for e in watch_events] == [(0, 4)] * 3 + [(4, 2)] * 3


def test_the_trace_adds_up_to_the_whole_run(cnn_file):
    out, events = run(cnn_file)
    trace = GenieTrace(gallery=10)
    seen = []
    for e in events:
        trace.add(e)
        seen.append(trace.progress())
    done, total = seen[-1]
    assert total == 12 + 5 * 4 and done == total
    assert all(d <= t for d, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    images, classes, confidence = trace.shown()
    assert torch.equal(images, out.images[:10]) and len(classes) == len(confidence) == 10
    assert trace.losses == [e.loss for e in events if e.kind == "distill_step"]
    assert [u["name"] for u in trace.units] == UNITS
    assert trace.label() == "evaluating on the digits test split"


class CancelAfter:
    """A cancel flag that turns on after ``n`` looks."""

    def __init__(self, n):
        self.n, self.looks = n, 0

    def is_set(self):
        self.looks += 1
        return self.looks > self.n


def test_cancel_stops_distillation_within_a_step(cnn_file):
    cancel = threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "distill_step" and e.step == 2:
            cancel.set()
    with pytest.raises(Cancelled):
        run_genie(GenieRunConfig(model=cnn_file, **TINY), on_event=on_event, cancel=cancel)
    assert [e.step for e in events if e.kind == "distill_step"] == [1, 2]
    assert not any(e.kind == "unit_step" for e in events)


def test_cancel_stops_genie_m_between_steps(tiny_cnn):
    calib = torch.randn(8, 1, 16, 16)
    seen = []
    with pytest.raises(Cancelled):
        # one look before the first unit, then one before each step's callback: the 14th look stops it
        quantize_model(tiny_cnn, calib, GenieMConfig(iters=50), callback=lambda u, s, l: seen.append((u, s)),
                       cancel=CancelAfter(13))
    assert seen == [("stem", s) for s in range(12)]
    # the original model is untouched and usable
    assert tiny_cnn(calib).shape == (8, 10) and len(find_units(tiny_cnn)) == 5
