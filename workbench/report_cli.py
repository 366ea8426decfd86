"""``workbench report``: one self-contained HTML page from the JSON reports of one or more runs."""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import WorkbenchError


def add_parser(sub):
    p = sub.add_parser("report", help="write one self-contained HTML page (works offline) from JSON reports",
                       description="One HTML page with plotly embedded: the settings, perplexities, per-layer error "
                                   "curves, attention errors and Hessian spectra of the runs. Each RUN.json is a "
                                   "`workbench quantize --report` file, a JSON download of the app's Quantize or "
                                   "Compare tab (adds per-head attention errors), or a `workbench inspect --report` "
                                   "file (adds Hessian spectra).")
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="report files, one or more")
    p.add_argument("--html", required=True, metavar="OUT.html",
                   help="write the page here (through a temporary file renamed over it, as --report does)")
    p.add_argument("--title", default=None, help="the page's title (default: the runs and the model)")
    p.set_defaults(run=run_report)
    return p


def run_report(args) -> int:
    from .html_report import build_page, read_runs, write_page
    from .report import check_writable
    out = check_writable(args.html)
    inputs = [Path(r).expanduser() for r in args.runs]
    if any(out.exists() and i.exists() and i.samefile(out) for i in inputs):
        raise WorkbenchError(f"--html {args.html} is one of the input reports; give another file name")
    runs, spectra = [], []
    for path in inputs:
        r, s = read_runs(path)
        runs.extend(r)
        spectra.extend(s)
    page = build_page(runs, spectra, title=args.title, sources=[p.name for p in inputs])
    write_page(page, out)
    print(f"workbench report: {len(runs)} run{'s' if len(runs) != 1 else ''}"
          + (f" and {len(spectra)} set{'s' if len(spectra) != 1 else ''} of spectra" if spectra else "")
          + f" -> {args.html} ({len(page.encode()) / 2 ** 20:.1f} MiB, opens offline)", file=sys.stderr)
    return 0
