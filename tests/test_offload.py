"""``--offload disk``: the blocks stay in the checkpoint's files, and the run gives what the same run
in memory gives: the same codes and grids, the same perplexities, the same exported tensors."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors import safe_open

import workbench
from tests.conftest import tiny_llama, tiny_opt
from workbench import offload, workspace
from workbench.activations import ActivationPool
from workbench.cli import main
from workbench.config import QuantizeConfig
from workbench.errors import Cancelled, WorkbenchError
from workbench.evaluate import perplexity
from workbench.models.loading import load_model
from workbench.models.streamed import StreamedModel, load_streamed
from workbench.packed_spill import PackedSpill
from workbench.quant.grid import GridConfig
from workbench.quant.weight import QuantizedWeight

pytest.importorskip("compressed_tensors")

# minmax ranges keep the solvers quick; what is compared is the offloaded walk, not the range search
RUN = dict(calib_samples=4, seqlen=32, eval_windows=3, batch_size=2, group_size=16, grid_search="minmax",
           device="cpu")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def checkpoint(request, tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp(str(request.param).removeprefix("torch."))
    tiny_llama(num_hidden_layers=3).to(request.param).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


def shards(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_same_run(a, b):
    assert set(a.packed) == set(b.packed) and len(a.packed) > 0
    for name in a.packed:
        p, q = a.packed[name], b.packed[name]
        assert torch.equal(p.codes, q.codes) and torch.equal(p.scale, q.scale) and torch.equal(p.zero, q.zero), name
    assert a.report.ppl_fp == b.report.ppl_fp
    assert a.report.ppl_quant == b.report.ppl_quant
    assert [r.rel_error for r in a.report.layers] == [r.rel_error for r in b.report.layers]


@pytest.mark.parametrize("method", ["rtn", "gptq", "turboboa"])
def test_offloaded_runs_give_the_in_memory_codes_perplexity_and_export(checkpoint, method, tmp_path):
    memory = workbench.quantize(model=checkpoint, method=method, save_dir=tmp_path / "memory", **RUN)
    disk = workbench.quantize(model=checkpoint, method=method, offload="disk", save_dir=tmp_path / "disk", **RUN)
    assert isinstance(disk.model, StreamedModel) and isinstance(disk.packed, PackedSpill)
    assert disk.report.config["offload_resolved"] == "disk" and memory.report.config["offload_resolved"] == "none"
    assert disk.report.config["dtype"] == memory.report.config["dtype"]
    assert_same_run(memory, disk)
    # the streamed export holds exactly the tensors the in-memory export writes, over one shard per block
    a, b = shards(tmp_path / "memory"), shards(tmp_path / "disk")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) == 4    # 3 blocks + the rest
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "memory" / "config.json").read_text())["quantization_config"]
    info = json.loads((tmp_path / "disk" / "export.json").read_text())
    assert info["quantized_layers"] == len(memory.packed) and info["ratio"] > 1
    back = workbench.load_quantized(tmp_path / "disk")     # transformers + compressed-tensors read the shards
    for name, q in memory.packed.items():
        assert torch.equal(back.packed[name].codes, q.codes), name


def test_streamed_blocks_and_perplexity_equal_the_loaded_model(tmp_path, tokenizer):
    for build in (tiny_llama, tiny_opt):
        d = tmp_path / build.__name__
        build(num_hidden_layers=3).save_pretrained(d)
        tokenizer.save_pretrained(d)
        memory, streamed = load_model(str(d)), load_streamed(str(d))
        family = memory.family
        for b in range(3):
            block = streamed.model.block(b)
            for (n, p), (m, q) in zip(family.blocks(memory.model)[b].named_parameters(), block.named_parameters()):
                assert n == m and torch.equal(p, q), n
        # only the embeddings, norms and head are loaded; the blocks are on the meta device
        assert all(p.device.type == "meta" for p in family.blocks(streamed.model)[0].parameters())
        assert streamed.model.residency.resident < sum(p.numel() * 4 for p in memory.model.parameters()) / 2
        windows = torch.randint(0, 512, (5, 40), generator=torch.Generator().manual_seed(0))
        assert perplexity(memory.model, windows, batch_size=2) == perplexity(streamed.model, windows, batch_size=2)


def test_activations_spill_to_disk_beyond_the_bound_and_change_nothing(checkpoint, monkeypatch):
    monkeypatch.setattr(workbench.api, "_FP_PERPLEXITY", {})      # every phase runs, none is reused
    memory = workbench.quantize(model=checkpoint, method="turboboa", **RUN)
    spilled = workbench.quantize(model=checkpoint, method="turboboa", offload="disk", activation_memory=0, **RUN)
    assert_same_run(memory, spilled)
    assert set(spilled.report.memory) == {"perplexity_fp", "quantize", "perplexity_quant"}
    for phase, figures in spilled.report.memory.items():
        assert figures["activations_bytes"] == 0 and figures["activations_on_disk_bytes"] > 0, phase
        assert figures["peak_rss_bytes"] > 0 and figures["weights_bytes"] > 0
    # the fp and the quantized stream (TurboBoA) of 4 windows x 32 tokens x 64 wide
    dtype_bytes = 2 if "bfloat16" in checkpoint else 4
    assert spilled.report.memory["quantize"]["activations_on_disk_bytes"] >= 2 * 4 * 32 * 64 * dtype_bytes
    in_memory = memory.report.memory["quantize"]
    assert in_memory["activations_on_disk_bytes"] == 0 and in_memory["activations_bytes"] > 0


def test_the_activation_pool_keeps_what_fits_and_reads_back_the_rest():
    pool = ActivationPool(limit=768)
    # bytes: 256, 256, 128 in memory; 256 would pass 768, to disk; 128 fits exactly; 256 to disk; 0 fits
    tensors = [torch.randn(64), torch.randn(64), torch.randn(64).bfloat16(), torch.randn(8, 8),
               torch.randn(2, 32).bfloat16(), torch.randn(64), torch.empty(0)]
    held = pool.hold(tensors)
    assert held.spilled == 2 and len(held) == 7
    for t, back in zip(tensors, held):
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    files = list(pool.scratch().path.glob("*-act"))
    assert len(files) == 2 and pool.memory == 768 and pool.disk == 512 and pool.peak_memory == 768
    held.release()
    assert pool.memory == pool.disk == 0 and not any(f.exists() for f in files)
    folder = pool.scratch().path
    pool.close()
    assert not folder.exists()


def test_the_packed_spill_reads_back_the_exact_layers():
    spill = PackedSpill()
    grid = GridConfig(bits=3, group_size=8, symmetric=True)
    q = QuantizedWeight(torch.randint(0, 8, (4, 16), dtype=torch.uint8), torch.rand(4, 2), torch.full((4, 2), 4.0), grid)
    spill["a.b"] = q
    back = spill["a.b"]
    assert "a.b" in spill and list(spill) == ["a.b"] and spill.shape("a.b") == (4, 16) and back.grid == grid
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale) and torch.equal(back.zero, q.zero)
    folder = spill._scratch.path
    del spill, back
    import gc
    gc.collect()
    assert not folder.exists()      # the scratch folder goes with the spill


def test_auto_offloads_only_a_run_that_would_not_fit(checkpoint, monkeypatch):
    cfg = QuantizeConfig(model=checkpoint, offload="auto", **RUN).validate()
    need = offload.in_memory_bytes(cfg)
    model_bytes = sum(p.numel() * p.element_size() for p in load_model(checkpoint).model.parameters())
    assert need > model_bytes
    monkeypatch.setattr(offload, "available_bytes", lambda device: 2 * need)
    assert offload.choose(cfg) == "none"
    monkeypatch.setattr(offload, "available_bytes", lambda device: need)
    assert offload.choose(cfg) == "disk"
    result = workbench.quantize(cfg, method="rtn")
    assert result.report.config["offload_resolved"] == "disk" and isinstance(result.model, StreamedModel)


def test_what_offload_cannot_take_is_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(WorkbenchError, match=r"^--format gguf:q4_0 is written from the whole model in memory; with "
                                             r"--offload disk save as pack-quantized or fake-quant$"):
        QuantizeConfig(format="gguf:q4_0", offload="disk").validate()
    with pytest.raises(WorkbenchError, match=r"offload='disk' reads the model from its checkpoint; leave out loaded="):
        workbench.quantize(model=checkpoint, loaded=load_model(checkpoint), offload="disk", **RUN)
    folder = tmp_path / "bin"
    tiny_llama().save_pretrained(folder)
    state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    from tests.conftest import tiny_tokenizer
    tiny_tokenizer().save_pretrained(folder)
    code = main(["quantize", "--model", str(folder), "--offload", "disk", "--quiet", "--eval-windows", "-1"])
    assert code == 2


def test_the_cli_offloads_and_saves(checkpoint, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["quantize", "--model", checkpoint, "--method", "rtn", "--offload", "disk", "--activation-memory",
                 "0.000001", "--seqlen", "32", "--calib-samples", "4", "--eval-windows", "2", "--group-size", "16",
                 "--device", "cpu", "--quiet", "--report", str(report), "--save", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["config"]["offload"] == "disk" and data["config"]["activation_memory"] == 0.000001
    assert set(data["memory"]) == {"perplexity_fp", "quantize", "perplexity_quant"}
    assert data["memory"]["quantize"]["activations_on_disk_bytes"] > 0
    assert workbench.load_quantized(tmp_path / "q").info.quantized_layers == 21


def test_a_cancelled_offloaded_run_leaves_no_export(checkpoint, tmp_path):
    cancel = threading.Event()

    def on_event(ev):
        if ev.kind == "block_finished":     # a shard is written by now
            assert list(tmp_path.glob(".q.partial-*/model-00001-of-00004.safetensors"))
            cancel.set()

    with pytest.raises(Cancelled):
        workbench.quantize(model=checkpoint, method="rtn", offload="disk", save_dir=tmp_path / "q", on_event=on_event,
                           cancel=cancel, **RUN)
    assert os.listdir(tmp_path) == []


def test_the_workspace_offloads_runs_spectra_and_saves(checkpoint, tmp_path):
    cfg = QuantizeConfig(model=checkpoint, method="rtn", **RUN)
    memory = workspace.run(cfg)
    disk = workspace.run(QuantizeConfig(**{**cfg.__dict__, "offload": "disk"}))
    assert disk.report.config["offload_resolved"] == "disk"
    assert (memory.report.ppl_fp, memory.report.ppl_quant) == (disk.report.ppl_fp, disk.report.ppl_quant)
    for a, b in zip(memory.reconstruction.frames().values(), disk.reconstruction.frames().values()):
        assert a.equals(b)
    assert workspace.spectra(cfg).layers.equals(workspace.spectra(QuantizeConfig(**{**cfg.__dict__,
                                                                                    "offload": "disk"})).layers)
    workspace.save_outcome(disk, tmp_path / "disk")
    workspace.save_outcome(memory, tmp_path / "memory")
    a, b = shards(tmp_path / "memory"), shards(tmp_path / "disk")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_runs_scratch_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    from workbench.scratch import Scratch
    monkeypatch.setenv("WORKBENCH_SCRATCH", str(tmp_path))
    dead = tmp_path / f"run-{4_194_304 + 7}-0123456789ab"      # above Linux's largest pid_max: no such process
    dead.mkdir()
    (dead / "000001-act").write_bytes(b"x" * 10)
    mine = Scratch("activations")
    assert not dead.exists() and mine.path.parent == tmp_path and mine.path.stat().st_mode & 0o777 == 0o700
    mine.close()
    assert list(tmp_path.iterdir()) == []


def test_the_memory_estimate_counts_one_block_not_the_model(checkpoint):
    from workbench.memory import estimate
    cfg = QuantizeConfig(model=checkpoint, **RUN)
    streamed, memory = load_streamed(checkpoint).model, load_model(checkpoint).model
    block = sum(p.numel() * p.element_size() for p in memory.model.layers[0].parameters())
    on_disk = estimate(cfg, streamed, copies=1, fp_stream=True, streamed=True)
    in_memory = estimate(cfg, memory, copies=1, fp_stream=True)
    assert on_disk.host["model copy"] == 0 and on_disk.host["blocks read"] == 2 * block
    assert in_memory.host["model copy"] == sum(p.numel() * p.element_size() for p in memory.parameters())
    assert on_disk.host_bytes < in_memory.host_bytes
