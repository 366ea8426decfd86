"""What ``workbench inspect`` runs: Hessian spectra on the calibration windows and, after
quantizing a copy, reconstruction errors on held-out windows, through the workspace. Frames out,
no figures."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import workspace
from ..config import QuantizeConfig
from ..atomic import write_all_atomic
from ..errors import WorkbenchError
from ..jsonsafe import dumps
from ..report import Report, check_writable, write_atomic
from .reconstruction import Reconstruction
from .spectra import Spectra


@dataclass
class DiagnoseConfig:
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    spectra: bool = True              # Hessian spectra of the full-precision model
    heads: bool = True                # per-head attention factors in the spectra
    method: bool = True               # quantize a copy and measure its reconstruction errors
    heldout_windows: int = 4          # windows of the evaluation text for reconstruction errors

    def validate(self):
        self.quantize.validate("cli")
        if self.method and self.heldout_windows < 1:
            raise WorkbenchError(f"--heldout-windows must be at least 1, got {self.heldout_windows}")


@dataclass
class Diagnosis:
    config: dict
    spectra: Spectra | None = None
    reconstruction: Reconstruction | None = None
    report: Report | None = None

    def frames(self) -> dict[str, pd.DataFrame]:
        out = {}
        if self.spectra is not None:
            out.update(self.spectra.frames())
        if self.reconstruction is not None:
            out.update(self.reconstruction.frames())
        if self.report is not None:
            out["report_layers"] = self.report.to_frame()
        return out

    def to_dict(self) -> dict:
        # through pandas' JSON so NaN and infinities become null, which every JSON reader accepts
        frames = {k: json.loads(f.to_json(orient="records")) for k, f in self.frames().items()}
        return {"config": self.config, "report": None if self.report is None else self.report.to_dict(),
                "frames": frames}

    def to_json(self, path: str | os.PathLike) -> Path:
        return write_atomic(path, dumps(self.to_dict(), indent=1))

    def to_csv(self, directory: str | os.PathLike) -> list[Path]:
        directory = Path(directory).expanduser()
        # all or none: a failure half-way must not leave a set of CSVs from two different runs
        return write_all_atomic({directory / f"{name}.csv": frame.to_csv(index=False)
                                 for name, frame in self.frames().items()})


def diagnose(config: DiagnoseConfig, *, models: workspace.ModelCache = workspace.MODELS, on_event=None,
             cancel=None, report_path=None, csv_dir=None) -> Diagnosis:
    """Spectra and/or reconstruction errors for ``config``; optionally written as JSON and CSVs."""
    config.validate()
    if report_path is not None:
        check_writable(report_path)
    if csv_dir is not None and not Path(csv_dir).expanduser().is_dir():
        raise WorkbenchError(f"--csv directory {str(csv_dir)!r} does not exist; create it first")
    q = config.quantize
    out = Diagnosis(config=dataclasses.asdict(config))
    if config.spectra:
        out.spectra = workspace.spectra(q, models=models, on_event=on_event, cancel=cancel, heads=config.heads)
    if config.method:
        outcome = workspace.run(q, models=models, on_event=on_event, cancel=cancel,
                                heldout=config.heldout_windows)
        out.reconstruction, out.report = outcome.reconstruction, outcome.report
    if report_path is not None:
        out.to_json(report_path)
    if csv_dir is not None:
        out.to_csv(csv_dir)
    return out
