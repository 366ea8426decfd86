"""Options of the learned-rounding methods (aespa, BRECQ)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import WorkbenchError
from ..quant.rounding import RoundingConfig

INITS = ("rtn", "gptq", "boa")


@dataclass(frozen=True)
class LearnedOptions:
    """Options of the learned-rounding methods (aespa, brecq)."""
    iters: int = 200
    # Adam on V. From given codes (GPTQ's, BoA's) on SmolLM2-135M block 1 at W3 g64, 100 steps:
    # lr 1e-2 with h starting 0.3 inside its ends began 30x above the start on the moment loss and
    # ended above it on every layer; lr 0.1, margin 0.05 and regularizer 1e-3 end 1-8% below it
    lr: float = 0.1
    # starting rounding, aespa only: rtn, gptq or boa. On SmolLM2-135M block 0 at W3 g64 (300
    # steps) learning from round to nearest ends 4-15x above the BoA codes on the same moment loss
    # (v: 0.015 vs 0.0011 relative), so aespa learns around a solver's codes. From GPTQ's, two
    # blocks at W3 g64 (100 steps) gave perplexity 30.62 against 30.76 from BoA's, in less time
    init: str = "gptq"
    init_margin: float = 0.05      # h starts this far inside {0, 1} at the starting codes
    reg_weight: float = 1e-3
    keep_better: bool = True       # aespa: keep the starting rounding if learning ends worse on the loss
    seed: int = 0                  # brecq: order of the calibration batches

    def __post_init__(self):
        if not 0 < self.init_margin < 0.5:
            raise WorkbenchError(f"the starting margin must be in (0, 0.5), got {self.init_margin}")
        if self.init not in INITS:
            raise WorkbenchError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        self.rounding()   # raises on bad iterations / learning rate

    def rounding(self) -> RoundingConfig:
        return RoundingConfig(iters=self.iters, lr=self.lr, reg_weight=self.reg_weight)
