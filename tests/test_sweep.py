"""workbench sweep: points as Ray tasks on a local cluster, equal to the same points run one by one."""
from __future__ import annotations

import json

import pytest
import torch

import workbench
from workbench.errors import WorkbenchError
from workbench.sweep import Point, grid_points, read_grid_file, sweep

TINY = dict(calib_samples=4, seqlen=32, eval_windows=2, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is installed by scripts/setup.sh (the sweep extra)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_grid_points_are_the_product_and_ids_are_stable():
    points = grid_points({"model": "m"}, {"method": ["rtn", "gptq"], "bits": [4, 3, 2]})
    assert len(points) == 6 and len({p.id for p in points}) == 6
    assert points[0].id == grid_points({"model": "m"}, {"method": ["rtn"], "bits": [4]})[0].id
    assert points[0].id.startswith("rtn-w4-g64-s0-")


def test_grid_file_is_read_and_checked(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("base: {calib_samples: 4}\ngrid: {method: [rtn, gptq], bits: [3, 4]}\n")
    assert read_grid_file(f) == ({"calib_samples": 4}, {"method": ["rtn", "gptq"], "bits": [3, 4]})
    f.write_text("grid: {bitz: [3]}\n")
    with pytest.raises(WorkbenchError, match="unknown settings: bitz"):
        read_grid_file(f)


def test_sweep_on_ray_equals_the_points_one_by_one(ray_cluster, tiny_checkpoints, tmp_path):
    points = grid_points({"model": tiny_checkpoints["llama"], **TINY},
                         {"method": ["rtn", "gptq"], "bits": [4, 3, 2]})
    result = sweep(points, tmp_path / "sw", progress=False)
    assert [r["status"] for r in result.rows] == ["done"] * 6
    # Ray gives each task one thread; the references run with one thread too, so the sums agree
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p, row in zip(points, result.rows):
            ref = workbench.quantize(**p.values).report
            saved = json.loads((tmp_path / "sw" / "points" / f"{p.id}.json").read_text())
            assert saved["ppl_quant"] == pytest.approx(ref.ppl_quant, rel=1e-6) == row["ppl_quant"]
            assert [layer["loss"] for layer in saved["layers"]] == pytest.approx([r.loss for r in ref.layers], rel=1e-5)
    finally:
        torch.set_num_threads(threads)
    for name in ("summary.csv", "summary.json", "ppl_vs_bits.png", "ppl_vs_bits.html", "seconds.png", "seconds.html"):
        assert (tmp_path / "sw" / name).stat().st_size > 0
    assert (tmp_path / "sw" / "ppl_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun finds every report and runs nothing
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "sw" / "points").iterdir()}
    again = sweep(points, tmp_path / "sw", progress=False)
    assert [r["ppl_quant"] for r in again.rows] == [r["ppl_quant"] for r in result.rows]
    assert stamps == {f.name: f.stat().st_mtime_ns for f in (tmp_path / "sw" / "points").iterdir()}


def test_failed_points_are_recorded_and_the_others_finish(ray_cluster, tiny_checkpoints, tmp_path):
    base = {"model": tiny_checkpoints["llama"], **TINY, "method": "rtn"}
    points = grid_points(base, {"group_size": [16, 48]}) + [Point((("bits", 9),))]   # 48 does not divide 64
    result = sweep(points, tmp_path / "sw", progress=False)
    assert [r["status"] for r in result.rows] == ["done", "failed", "failed"]
    assert "does not divide the input width 64" in result.rows[1]["error"]
    assert "--bits must be at most 8" in result.rows[2]["error"]
    failed = json.loads((tmp_path / "sw" / "points" / f"{points[1].id}.failed.json").read_text())
    assert failed["settings"]["group_size"] == 48


def test_cli_sweep(ray_cluster, tiny_checkpoints, tmp_path, capsys):
    from workbench.cli import main
    code = main(["sweep", "--model", tiny_checkpoints["llama"], "--methods", "rtn", "--bits", "4,3", "--group-size",
                 "-1", "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "sw")])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 of 2 points done" in out and "rtn-w3-gpc-s0" in out
    assert main(["sweep", "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_compare_on_ray_gives_the_outcomes_of_the_runs_here(ray_cluster, tiny_checkpoints):
    """The app's Compare with a Ray address: four tasks at once, their events streamed back, the same numbers."""
    from workbench import workspace
    from workbench.config import build_config
    from workbench.jobs import Job
    from workbench.ui.compare_tab import COMPARE_METHODS, ray_work
    configs = {m: build_config({"model": tiny_checkpoints["llama"], **TINY, "method": m}, "api").validate()
               for m in COMPARE_METHODS}
    cached = dict.fromkeys(COMPARE_METHODS)
    job = Job(ray_work(configs, cached, "local"), "compare").start()
    messages = [m for m in job.messages() if m is not None]
    assert messages[-1].kind == "result", messages[-1].payload
    outcomes = dict(m.payload for m in messages if m.kind == "outcome")      # row key -> outcome
    assert sorted(outcomes) == sorted(COMPARE_METHODS)
    finished = {m.payload[0] for m in messages if m.kind == "event" and m.payload[1].kind == "layer_finished"}
    assert finished == set(COMPARE_METHODS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in ("rtn", "turboboa"):
            here = workspace.run(configs[m], models=workspace.ModelCache())
            assert outcomes[m].report.ppl_quant == pytest.approx(here.report.ppl_quant, rel=1e-6)
            assert list(outcomes[m].layers["rel_error"]) == pytest.approx(list(here.layers["rel_error"]), rel=1e-5)
            assert outcomes[m].packed is None
    finally:
        torch.set_num_threads(threads)
    # a method already in the page's cache is shown from it, not run again
    again = Job(ray_work(configs, {**cached, "rtn": outcomes["rtn"]}, "local"), "compare").start()
    kinds = [(m.kind, m.payload if m.kind == "method" else None) for m in again.messages() if m is not None]
    assert ("method", "rtn") not in kinds and ("method", "gptq") in kinds and kinds[-1][0] == "result"


def test_compare_on_ray_cancels_its_tasks(ray_cluster, tiny_checkpoints):
    from workbench.config import build_config
    from workbench.jobs import Job
    from workbench.ui.compare_tab import COMPARE_METHODS, ray_work
    configs = {m: build_config({"model": tiny_checkpoints["llama"], **TINY, "method": m}, "api").validate()
               for m in COMPARE_METHODS}
    job = Job(ray_work(configs, dict.fromkeys(COMPARE_METHODS), "local"), "compare").start()
    for msg in job.messages():
        if msg is not None and msg.kind == "method":
            job.cancel.set()
        if msg is not None and msg.kind in ("result", "cancelled", "error"):
            break
    assert msg.kind == "cancelled"
    job.join(10)
    assert not job.running


def test_a_ray_address_nobody_answers_is_refused_at_once():
    from workbench.sweep import _check_reachable
    with pytest.raises(WorkbenchError, match="no Ray cluster answers at '127.0.0.1:1'.*ray start --head"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(WorkbenchError, match="not of the form HOST:PORT"):
        _check_reachable("nonsense")
