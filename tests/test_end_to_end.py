"""End to end on the embedded SmolLM2-135M: two blocks, short windows."""
import pytest

import workbench
from workbench.models.loading import load_model

pytestmark = pytest.mark.slow
SMALL = dict(max_blocks=2, calib_samples=4, seqlen=128, eval_windows=3, device="cpu", bits=4, group_size=64)


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_embedded_model_geometry(smollm):
    geo = smollm.family.geometry(smollm.model.config)
    assert (geo.n_heads, geo.n_kv_heads, geo.head_dim) == (9, 3, 64)
    assert len(smollm.family.blocks(smollm.model)) == 30


@pytest.mark.parametrize("method", ["gptq", "turboboa"])
def test_two_blocks(method, tmp_path):
    res = workbench.quantize(model="smollm2-135m", method=method, report_path=tmp_path / "r.json", **SMALL)
    rep = res.report
    assert len(rep.layers) == 14 and {r.block for r in rep.layers} == {0, 1}
    assert [r.kind for r in rep.layers[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert 1 < rep.ppl_fp < 200
    assert rep.ppl_fp * 0.9 < rep.ppl_quant < rep.ppl_fp * 1.10   # two 4-bit blocks cost little (3 short windows: noisy)
    assert all(0 < r.rel_error < 0.05 for r in rep.layers)
    assert (tmp_path / "r.json").stat().st_size > 1000
