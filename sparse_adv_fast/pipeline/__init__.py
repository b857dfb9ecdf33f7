"""The resumable ``demo`` pipeline behind ``sparse-adv-fast demo``.

``stages``  resumable stage runner with atomic per-stage result files,
``modelio`` self-describing model checkpoints (architecture spec + state_dict),
``demo``    the demo's stages (PGD-AT, IMP tickets, IWI, evaluation),
``report``  results.json / results.md, ``plots`` the PNG plots.
"""

from .demo import DemoConfig, run_demo
from .stages import StageError, StageRunner

__all__ = ["DemoConfig", "StageError", "StageRunner", "run_demo"]
