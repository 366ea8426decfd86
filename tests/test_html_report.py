"""The HTML report: every figure of the runs present, plotly embedded once, settings and perplexities in
the text, everything escaped, the JSON files the workbench writes read back, bad input refused; the CLI."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from workbench import workspace
from workbench.cli import main
from workbench.config import QuantizeConfig
from workbench.diagnostics.run import Diagnosis
from workbench.errors import WorkbenchError
from workbench.html_report import (FIGURE_CLASS, RunData, SpectraData, build_page, page_figures, read_runs,
                                   write_page)
from workbench.report import Report
from workbench.ui.views import write_run_files

TINY = dict(calib_samples=4, seqlen=64, eval_windows=2, bits=3, group_size=16, device="cpu", batch_size=2,
            grid_search="minmax")
CALIBRATION = ["Relative output error per layer (calibration windows)",
               "Mean error by layer kind (calibration windows)",
               "Attention output error per q/k/v layer (calibration windows)"]
HELDOUT = ["Relative output error per layer (held-out windows)",
           "Attention error per head after o_proj (held-out windows, block x head)",
           "Attention error per head before o_proj (held-out windows, block x head)",
           "Attention error per block (held-out windows)"]
SPECTRA = ["H_in spectra of block 0, one per input", "Per-head H_out spectra, block 0, q",
           "Per-head H_out spectra, block 0, k", "Condition number of H_in across layers",
           "Layer error against the condition of its H_in"]


@pytest.fixture(scope="module")
def measured(tiny_checkpoints):
    """Two measured runs of the tiny LLaMA (RTN and GPTQ) and the spectra of its full-precision model."""
    models = workspace.ModelCache()
    cfgs = [QuantizeConfig(model=tiny_checkpoints["llama"], method=m, **TINY) for m in ("rtn", "gptq")]
    outcomes = [workspace.run(c, models=models, heldout=2) for c in cfgs]
    spectra = workspace.spectra(cfgs[0], models=models)
    return outcomes, SpectraData.from_config(spectra, cfgs[0])


def figures_of(page: str) -> int:
    return len(re.findall(f'<div id="wb-figure-\\d+" class="{FIGURE_CLASS}"', page))


def shown(page: str, title: str) -> bool:
    """A figure's title in the page, as plotly writes it into the figure's JSON."""
    return title.replace("<", "\\u003c").replace(">", "\\u003e").replace("/", "\\u002f") in page


def test_a_quantize_report_alone_draws_its_calibration_figures_and_says_what_is_missing(measured):
    outcome = measured[0][1]
    page = build_page([RunData(outcome.report)])
    assert figures_of(page) == len(CALIBRATION) and all(shown(page, t) for t in CALIBRATION)
    assert not any(shown(page, t) for t in HELDOUT + SPECTRA)
    assert "No per-head attention errors for GPTQ" in page and "No Hessian spectra" in page
    # the settings and the perplexities in the text, as the report holds them
    r = outcome.report
    assert f"{r.ppl_fp:.3f}" in page and f"{r.ppl_quant:.3f}" in page
    assert f"{100 * (r.ppl_quant / r.ppl_fp - 1):+.2f}%" in page
    assert "Calibration samples <code>calib_samples</code></td><td>4</td>" in page
    assert "solver.damp" in page and r.config["torch"] in page


@pytest.mark.parametrize("n", [1, 2])
def test_every_figure_of_measured_runs_with_spectra(measured, n):
    outcomes, spectra = measured
    runs = [RunData.from_outcome(o) for o in outcomes[-n:]]
    page = build_page(runs, [spectra])
    titles = CALIBRATION + HELDOUT + SPECTRA
    assert figures_of(page) == len(titles) and page.count(f'class="{FIGURE_CLASS}"') == len(titles)
    assert all(shown(page, t) for t in titles), [t for t in titles if not shown(page, t)]
    assert "No per-head" not in page and "No Hessian spectra" not in page
    sections = dict((h, figs) for h, figs, _ in page_figures(runs, [spectra]))
    curve, heldout, kinds = sections["Per-layer error"]
    assert len(curve.data) == n and len(heldout.data) == n and len(kinds.data) == n     # one line per run
    assert [len(t.y) for t in curve.data] == [14] * n                                  # 2 blocks x 7 layers
    after, before, blocks = sections["Attention"][1:]
    assert sum(t.type == "heatmap" for t in after.data) == n                            # one panel per run
    assert len(blocks.data) == 2 * n
    assert len(sections["Hessian spectra"][-1].data) == n                               # error vs condition
    for o in outcomes[-n:]:
        assert f"{o.report.ppl_quant:.3f}" in page
    if n == 2:
        assert "Settings that differ between the runs" in page and "<td>rtn</td><td>gptq</td>" in page


def test_plotly_is_embedded_once_and_nothing_is_fetched(measured):
    page = build_page([RunData.from_outcome(o) for o in measured[0]], [measured[1]])
    lib = get_plotlyjs()
    assert page.count(lib[:2000]) == 1 and page.count(lib[-2000:]) == 1
    rest = page.replace(lib, "")
    assert "cdn.plot.ly" not in rest and "https://" not in rest and not re.search(r"<script[^>]*\bsrc=", rest)
    assert page.index(lib[:200]) < page.index("Plotly.newPlot")


def test_text_is_escaped(measured):
    outcome = measured[0][0]
    d = outcome.report.to_dict()
    d["model"] = d["config"]["model"] = "<script>alert('model')</script>"
    page = build_page([RunData(Report.from_dict(d), outcome.reconstruction)],
                      title="A <b>title</b> & more")
    assert "<script>alert(" not in page
    assert "&lt;script&gt;alert(&#x27;model&#x27;)&lt;/script&gt;" in page
    assert "<title>A &lt;b&gt;title&lt;/b&gt; &amp; more</title>" in page


def test_no_run_is_refused():
    with pytest.raises(WorkbenchError, match="no run to report"):
        build_page([])


def test_the_files_the_workbench_writes_are_read_back(measured, tmp_path):
    outcomes, spectra = measured
    # workbench quantize --report: the report alone
    runs, found = read_runs(outcomes[0].report.to_json(tmp_path / "rtn.json"))
    back, orig = runs[0].report, outcomes[0].report
    assert found == [] and runs[0].reconstruction is None
    assert (back.ppl_fp, back.ppl_quant, back.config["bits"]) == (orig.ppl_fp, orig.ppl_quant, orig.config["bits"])
    assert back.to_frame().equals(orig.to_frame())
    # the app's downloads: one run, and Compare's list of runs, each with its held-out errors
    one = write_run_files(tmp_path / "app", "one", outcomes[:1])[0]
    both = write_run_files(tmp_path / "app", "both", outcomes)[0]
    (run,), _ = read_runs(one)
    # pandas writes floats to 10 significant digits
    pd.testing.assert_frame_equal(run.reconstruction.heads, outcomes[0].reconstruction.heads, check_dtype=False,
                                  rtol=1e-8)
    runs, _ = read_runs(both)
    assert [r.report.method for r in runs] == ["rtn", "gptq"] and all(len(r.reconstruction.blocks) == 2
                                                                       for r in runs)
    # workbench inspect --report: spectra, and the measured run when it has one
    diag = Diagnosis(config={"quantize": {"model": spectra.model, "calib": "wikitext2"}}, spectra=spectra.spectra,
                     reconstruction=outcomes[1].reconstruction, report=outcomes[1].report)
    runs, found = read_runs(diag.to_json(tmp_path / "inspect.json"))
    assert [r.report.method for r in runs] == ["gptq"]
    assert len(found) == 1 and found[0].model == spectra.model
    assert found[0].spectra.layers["condition"].tolist() == pytest.approx(spectra.spectra.layers["condition"].tolist())
    page = build_page(runs, found)
    assert figures_of(page) == len(CALIBRATION + HELDOUT + SPECTRA)


def test_a_non_finite_perplexity_is_shown_not_a_crash(measured, tmp_path):
    d = measured[0][0].report.to_dict()
    d["ppl_quant"] = float("inf")
    path = Report.from_dict(d).to_json(tmp_path / "inf.json")
    assert json.loads(path.read_text())["ppl_quant"] is None
    (run,), _ = read_runs(path)
    page = build_page([run])
    assert "<td>inf</td>" in page and "<td>n/a</td>" in page      # the perplexity, and no change to compute


@pytest.mark.parametrize("content,needle", [
    ("not json at all", "is not JSON (Expecting value at line 1)"),
    ('{"some": "thing"}', "is JSON but not a workbench report (its keys: some)"),
    ("[1, 2]", "holds a JSON int, not a report"),
    ("[]", "holds an empty list, no run to show"),
    ('{"model": "m", "method": "gptq", "layers": [{"name": "x"}]}', "is not a workbench report (TypeError"),
    ('{"model": "m", "method": "gptq", "layers": [], "config": 3}', "config or layers are not what the workbench"),
    ('{"config": {}, "frames": {}, "report": null}', "holds neither a run nor spectra"),
])
def test_a_file_that_is_not_a_report_gets_a_clear_error(tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(WorkbenchError) as info:
        read_runs(bad)
    assert needle in str(info.value) and "bad.json" in str(info.value)
    assert "workbench quantize --report" in str(info.value)


def test_a_missing_file_a_directory_and_bytes_are_refused(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        read_runs(tmp_path / "missing.json")
    with pytest.raises(WorkbenchError, match="is a directory"):
        read_runs(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(WorkbenchError, match="cannot be read"):
        read_runs(tmp_path / "bin.json")


def test_the_page_is_written_atomically(tmp_path):
    out = tmp_path / "page.html"
    out.write_text("old")
    write_page("<html>new</html>", out)
    assert out.read_text() == "<html>new</html>" and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    with pytest.raises(WorkbenchError, match="does not exist; create it first"):
        write_page("x", tmp_path / "missing" / "page.html")
    with pytest.raises(WorkbenchError, match="is a directory"):
        write_page("x", tmp_path)


# -- the command line ---------------------------------------------------------------------------------

def test_cli_writes_one_page_of_several_runs(measured, tmp_path, capsys):
    outcomes, spectra = measured
    a = outcomes[0].report.to_json(tmp_path / "rtn.json")
    b = write_run_files(tmp_path, "gptq-app", outcomes[1:])[0]
    inspect = Diagnosis(config={"quantize": {"model": spectra.model}}, spectra=spectra.spectra).to_json(
        tmp_path / "inspect.json")
    out = tmp_path / "report.html"
    assert main(["report", str(a), b, str(inspect), "--html", str(out), "--title", "Two runs"]) == 0
    err = capsys.readouterr().err
    assert "2 runs and 1 set of spectra" in err and "report.html" in err
    page = out.read_text()
    assert "<h1>Two runs</h1>" in page and "rtn.json, gptq-app.json, inspect.json" in page
    # the RTN run has no held-out errors: its lines are missing from those figures, and the page says so
    assert figures_of(page) == len(CALIBRATION + HELDOUT + SPECTRA) and "No per-head attention errors for RTN" in page
    assert main(["report", str(a), "--html", str(out)]) == 0          # an existing page is replaced, as --report is
    assert figures_of(out.read_text()) == len(CALIBRATION)


def test_cli_bad_input_is_one_line_and_writes_nothing(measured, tmp_path, capsys):
    good = measured[0][0].report.to_json(tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    out = tmp_path / "out.html"
    for args, needle in [([str(good), str(bad)], "bad.json': the file is JSON but not a workbench report"),
                         ([str(tmp_path / "none.json")], "does not exist"),
                         ([str(good), "--html", str(good)], "is one of the input reports"),
                         ([str(good), "--html", str(tmp_path / "no" / "out.html")], "does not exist; create it")]:
        argv = ["report", *args] + ([] if "--html" in args else ["--html", str(out)])
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("workbench: error:") and needle in lines[0], lines
    assert not out.exists() and json.loads(good.read_text())["method"] == "rtn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "good.json"]
