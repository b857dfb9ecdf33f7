"""The resumable ``demo`` pipeline behind ``sparse-adv-fast demo``.

``stages``  resumable stage runner with atomic per-stage result files and per-stage seeds,
``modelio`` self-describing model checkpoints (architecture spec + state_dict),
``demo``    the demo's stages (PGD-AT, IMP tickets, IWI, evaluation),
``report``  results.json / results.md, ``plots`` the PNG plots,
``lock``    one run per output directory, ``outputs`` output paths checked before any work.
"""

from .demo import DemoConfig, run_demo
from .lock import RunLock, RunLockedError
from .outputs import OutputPathError
from .stages import StageError, StageRunner, TrainingDiverged

__all__ = ["DemoConfig", "OutputPathError", "RunLock", "RunLockedError", "StageError",
           "StageRunner", "TrainingDiverged", "run_demo"]
