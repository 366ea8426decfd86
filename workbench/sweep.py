"""``workbench sweep``: a grid of settings, one ``workbench.quantize`` per point, each a Ray task.

A sweep directory holds one report per finished point (``points/ID.json``), one error record per
failed point (``points/ID.failed.json``), the summary table (``summary.csv``, ``summary.json``)
and the plots (``ppl_vs_bits`` and ``seconds``, PNG and HTML). A rerun skips the points with a
report; a failed point is retried. Ctrl-C cancels the running tasks and keeps the finished reports.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULTS, SETTINGS, build_config
from .errors import WorkbenchError
from .report import write_atomic

INSTALL_HINT = "pip install 'quant-workbench[sweep]' (or: pip install ray matplotlib)"
AXES = {"methods": "method", "bits": "bits", "group_size": "group_size", "seeds": "seed"}   # flag -> setting


@dataclass(frozen=True)
class Point:
    settings: tuple          # (name, value) pairs that differ from the defaults, sorted

    @property
    def values(self) -> dict:
        return dict(self.settings)

    @property
    def id(self) -> str:
        v = {**DEFAULTS, **self.values}
        digest = hashlib.sha1(json.dumps(self.settings, default=str).encode()).hexdigest()[:8]
        group = "pc" if v["group_size"] == -1 else v["group_size"]
        return f"{v['method']}-w{v['bits']}-g{group}-s{v['seed']}-{digest}"


@dataclass
class SweepResult:
    directory: Path
    rows: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]


def grid_points(base: dict, axes: dict[str, list]) -> list[Point]:
    """Every combination of ``axes`` (setting name -> values) over ``base`` settings."""
    names = list(axes)
    out = []
    for combo in itertools.product(*(axes[n] for n in names)):
        values = {**base, **dict(zip(names, combo))}
        out.append(Point(tuple(sorted((k, v) for k, v in values.items() if v != DEFAULTS.get(k)))))
    return list(dict.fromkeys(out))


def read_grid_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """``{"base": {setting: value}, "grid": {setting: [values]}}`` from YAML or JSON."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WorkbenchError(f"--grid {str(path)!r} is not a file; give a YAML or JSON file with 'base' and 'grid'")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("grid", {}), dict):
        raise WorkbenchError(f"--grid {str(path)!r} must hold a mapping with 'base' (settings) and 'grid' "
                             f"(setting: list of values)")
    base, grid = data.get("base") or {}, data.get("grid") or {}
    unknown = sorted(k for k in {**base, **grid} if k not in SETTINGS)
    if unknown:
        raise WorkbenchError(f"--grid {str(path)!r} names unknown settings: {', '.join(unknown)}")
    return base, {k: v if isinstance(v, list) else [v] for k, v in grid.items()}


def run_point(values: dict) -> dict:
    """One point, in whichever process runs it (a Ray worker): its report as a dict."""
    import workbench
    cfg = build_config(values, "api")
    return workbench.quantize(cfg).report.to_dict()


def run_outcome(cfg, events=None, tag=None):
    """One measured run (``workspace.run``) in whichever process runs it: the app's Compare on Ray.

    Its progress events go to ``events`` (a ``ray.util.queue.Queue``) as ``(tag, event)``; the codes
    stay behind (the whole model's worth, too much to ship back for a comparison)."""
    from . import workspace
    on_event = None if events is None else (lambda ev: events.put((tag, ev)))
    outcome = workspace.run(cfg, on_event=on_event)
    outcome.packed = None
    return outcome


def _row(point: Point, report: dict | None = None, error: str | None = None) -> dict:
    v = {**DEFAULTS, **point.values}
    row = {"id": point.id, "method": v["method"], "bits": v["bits"], "group_size": v["group_size"], "seed": v["seed"],
           "status": "failed" if error else "done", "ppl_fp": None, "ppl_quant": None, "quant_seconds": None,
           "error": error}
    if report:
        row.update(ppl_fp=report.get("ppl_fp"), ppl_quant=report.get("ppl_quant"),
                   quant_seconds=report.get("quant_seconds"))
    return row


def start_ray(address: str = "local", cpus: int | None = None):
    """Ray, connected: a local cluster of this machine's cores (``local``) or the cluster at ``address``."""
    try:
        import ray
    except ImportError:
        raise WorkbenchError(f"running on Ray needs ray: {INSTALL_HINT}") from None
    if not ray.is_initialized():
        if address == "local":
            # Ray renices its workers to 15: beside any other job on the machine they would starve,
            # and a sweep is the job the user started
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        else:
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise WorkbenchError(f"no Ray cluster answers at {address!r} ({str(exc).strip().splitlines()[0]}); "
                                     f"start one there with `ray start --head`, or give local") from None
    return ray


def _check_reachable(address: str, timeout: float = 3.0):
    """A cluster address nobody listens on is said at once (Ray itself waits a minute or more)."""
    import socket
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise WorkbenchError(f"the Ray address {address!r} is not of the form HOST:PORT (or local)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise WorkbenchError(f"no Ray cluster answers at {address!r} ({exc.strerror or exc}); start one there "
                             f"with `ray start --head`, or give local") from None


def sweep(points: list[Point], directory: str | os.PathLike, address: str = "local", cpus_per_point: float = 1,
          gpus_per_point: float = 0, cluster_cpus: int | None = None, progress: bool = True) -> SweepResult:
    """Run every point not yet finished in ``directory`` as a Ray task; returns the summary rows."""
    from tqdm.auto import tqdm
    out = Path(directory).expanduser()
    (out / "points").mkdir(parents=True, exist_ok=True)
    done, todo, rows = {}, [], {}
    for p in points:
        report_file = out / "points" / f"{p.id}.json"
        if report_file.is_file():
            done[p] = json.loads(report_file.read_text())
            rows[p] = _row(p, done[p])
            continue
        try:
            build_config(p.values, "api")       # bad settings fail here, without a task
        except WorkbenchError as exc:
            _fail(out, p, str(exc))
            rows[p] = _row(p, error=str(exc))
            continue
        todo.append(p)
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", unit="point", disable=not progress)
    if todo:
        ray = start_ray(address, cluster_cpus)
        task = ray.remote(run_point).options(num_cpus=cpus_per_point, num_gpus=gpus_per_point, max_retries=0)
        pending = {task.remote(p.values): p for p in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                p = pending.pop(ready[0])
                try:
                    report = ray.get(ready[0])
                except Exception as exc:   # the point's own error, carried back by Ray
                    message = task_error(exc)
                    _fail(out, p, message)
                    rows[p] = _row(p, error=message)
                else:
                    write_atomic(out / "points" / f"{p.id}.json", json.dumps(report, indent=1, allow_nan=False))
                    (out / "points" / f"{p.id}.failed.json").unlink(missing_ok=True)
                    rows[p] = _row(p, report)
                bar.update(1)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
    result = SweepResult(out, [rows[p] for p in points])
    write_summary(result)
    return result


def task_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, WorkbenchError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def _fail(out: Path, p: Point, message: str):
    write_atomic(out / "points" / f"{p.id}.failed.json",
                 json.dumps({"id": p.id, "settings": p.values, "error": message}, indent=1, default=str))


def write_summary(result: SweepResult) -> list[Path]:
    """The table as CSV and JSON, the plots as PNG and HTML; returns the files written."""
    import pandas as pd

    from .figures.sweep import ppl_vs_bits_figure, seconds_figure, save_png
    frame = pd.DataFrame(result.rows)
    d = result.directory
    files = [write_atomic(d / "summary.csv", frame.to_csv(index=False)),
             write_atomic(d / "summary.json", json.dumps(result.rows, indent=1, default=str))]
    finished = frame[frame["status"] == "done"] if len(frame) else frame
    for name, build in (("ppl_vs_bits", ppl_vs_bits_figure), ("seconds", seconds_figure)):
        fig = build(finished)
        files.append(write_atomic(d / f"{name}.html", fig.to_html(include_plotlyjs=True, full_html=True)))
        files.append(save_png(finished, name, d / f"{name}.png"))
    return files


def config_axes(args) -> dict[str, list]:
    """The grid axes given on the command line, as setting name -> raw values."""
    axes = {}
    for flag, name in AXES.items():
        raw = getattr(args, flag)
        if raw:
            axes[name] = [v.strip() for v in raw.split(",") if v.strip()]
    return axes


def parse_axes(axes: dict[str, list], face: str = "cli") -> dict[str, list]:
    """Each axis value through its setting's declaration (``"-1"`` -> -1), named the way ``face`` does."""
    return {name: [SETTINGS[name].parse(v, face) for v in values] for name, values in axes.items()}

