"""A walk never moves the models it walks: a shared model stays whole whatever the device does."""
import pytest
import torch

from tests.conftest import tiny_llama
from workbench.config import build_config
from workbench.diagnostics import hessian_spectra
from workbench.diagnostics.walk import on_device, walk_stages
from workbench.errors import WorkbenchError
from workbench.models import family_for
from workbench.settings import FACES

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return {k: (v.device, v.detach().clone()) for k, v in model.state_dict().items()}


def assert_untouched(model, before, block0):
    family = family_for(model.config)
    assert family.blocks(model)[0] is block0
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k, (dev, value) in before.items():
        assert after[k][0] == dev, k
        assert torch.equal(after[k][1], value), k


def test_a_walk_to_a_device_the_block_cannot_come_back_from_leaves_the_model_whole():
    # "meta" keeps no data: a block moved there and back used to fail on the way back and stay there
    model = tiny_llama()
    family, before, block0 = family_for(model.config), snapshot(model), family_for(model.config).blocks(model)[0]
    try:
        for _ in walk_stages([model], family, IDS, batch_size=2, device="meta"):
            pass
    except (RuntimeError, NotImplementedError):
        pass
    assert_untouched(model, before, block0)
    # and the model still works
    spectra = hessian_spectra(model, family, IDS, batch_size=2, device="cpu", heads=False)
    assert len(spectra.layers) > 0


def test_a_failure_while_the_block_is_out_leaves_the_model_whole():
    model = tiny_llama()
    family, before, block0 = family_for(model.config), snapshot(model), family_for(model.config).blocks(model)[0]
    walk = walk_stages([model], family, IDS, batch_size=2, device="meta")
    with pytest.raises(KeyError):
        for _ in walk:
            raise KeyError("the consumer failed half-way")
    walk.close()
    assert_untouched(model, before, block0)


def test_a_block_already_on_the_device_is_used_as_is():
    model = tiny_llama()
    block = family_for(model.config).blocks(model)[0]
    assert on_device(block, torch.device("cpu")) is block
    moved = on_device(block, torch.device("meta"))
    assert moved is not block and next(moved.parameters()).device.type == "meta"
    assert next(block.parameters()).device.type == "cpu"


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("device", ["meta", "mps", "xla", "cuda:x", "cpu:0"])
def test_every_face_refuses_devices_other_than_auto_cpu_cuda(face, device):
    with pytest.raises(WorkbenchError, match="must be one of auto, cpu, cuda or cuda:N"):
        build_config({"device": device}, face)


@pytest.mark.parametrize("face", FACES)
def test_every_face_refuses_a_cuda_index_beyond_the_devices(face, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build_config({"device": "cuda:1"}, face).device == "cuda:1"
    with pytest.raises(WorkbenchError, match="cuda:2: this machine has 2 CUDA devices"):
        build_config({"device": "cuda:2"}, face)
