"""``workbench sweep``: the command line of ``workbench.sweep``."""
from __future__ import annotations

from .config import SETTINGS
from .errors import WorkbenchError
from .flags import add_setting_flags


def add_parser(sub):
    p = sub.add_parser("sweep", help="quantize a grid of settings, each point a Ray task",
                       description="One workbench quantize per point of the grid (methods x bits x group sizes x "
                                   "seeds, over the other settings given), each a Ray task. Finished points are "
                                   "skipped on a rerun; failed points are recorded and retried.")
    grid = p.add_argument_group("the grid (comma-separated values)")
    grid.add_argument("--methods", default=None, help="e.g. gptq,boa,turboboa")
    grid.add_argument("--bits", default=None, help="e.g. 2,3,4")
    grid.add_argument("--group-size", dest="group_size", default=None, help="e.g. 64,-1")
    grid.add_argument("--seeds", default=None, help="e.g. 0,1")
    grid.add_argument("--grid", dest="grid_file", default=None, metavar="FILE",
                      help="YAML or JSON: {base: {setting: value}, grid: {setting: [values]}}; flags add to it")
    add_setting_flags(p, skip=("method", "bits", "group_size", "seed"))
    ray = p.add_argument_group("where it runs")
    ray.add_argument("--out", required=True, metavar="DIR", help="sweep directory: reports, summary, plots")
    ray.add_argument("--ray", default="local", metavar="ADDRESS",
                     help="local (a Ray cluster of this machine's cores) or the address of a running cluster")
    ray.add_argument("--cpus-per-point", type=float, default=1.0, help="CPUs each point's task asks for")
    ray.add_argument("--gpus-per-point", type=float, default=0.0, help="GPUs each point's task asks for")
    ray.add_argument("--cluster-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    ray.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_sweep)
    return p


def base_settings(args) -> dict:
    """The settings given as flags (raw text, read by the one validation per point)."""
    return {k: v for k, v in vars(args).items() if k in SETTINGS and k not in ("method", "bits", "group_size", "seed")
            and v is not None}


def run_sweep(args) -> int:
    from .sweep import config_axes, grid_points, parse_axes, read_grid_file, sweep
    base, axes = read_grid_file(args.grid_file) if args.grid_file else ({}, {})
    base = {**base, **base_settings(args)}
    base = {k: SETTINGS[k].parse(v, "cli") for k, v in base.items()}
    axes = parse_axes({**{k: [str(x) for x in v] for k, v in axes.items()}, **config_axes(args)})
    if not axes:
        raise WorkbenchError("the grid is empty; give --methods, --bits, --group-size, --seeds or --grid FILE")
    if args.cpus_per_point <= 0 or args.gpus_per_point < 0:
        raise WorkbenchError("--cpus-per-point must be positive and --gpus-per-point at least 0")
    points = grid_points(base, axes)
    result = sweep(points, args.out, address=args.ray, cpus_per_point=args.cpus_per_point,
                   gpus_per_point=args.gpus_per_point, cluster_cpus=args.cluster_cpus, progress=not args.quiet)
    done = [r for r in result.rows if r["status"] == "done"]
    print(f"sweep {args.out}: {len(done)} of {len(result.rows)} points done, {len(result.failed)} failed; "
          f"summary.csv, ppl_vs_bits.png/.html, seconds.png/.html")
    for r in result.rows:
        ppl = "n/a" if r["ppl_quant"] is None else f"{r['ppl_quant']:.3f}"
        tail = f"failed: {r['error']}" if r["status"] == "failed" else f"ppl {ppl}, {r['quant_seconds']:.1f} s"
        print(f"  {r['id']}: {tail}")
    return 1 if result.failed and not done else 0

