"""The work behind the command line: the controlled study and the single-model commands.

``study``   the controlled study behind ``sparse-adv-fast study`` and ``demo`` (its small
            default): ``study_config`` its settings, ``arms`` the arms and budget rule,
            ``study_tasks`` the jobs, ``stats`` intervals and verdicts, ``study_report``
            results.md and plots,
``commands`` ``train`` / ``prune`` / ``iwi`` / ``eval`` / ``bench``,
``stages``  resumable stage runner with atomic per-stage result files and per-stage seeds,
``modelio`` self-describing model checkpoints (architecture spec + state_dict),
``lock``    one run per output directory, ``outputs`` output paths checked before any work.
"""

from .lock import RunLock, RunLockedError
from .outputs import OutputPathError
from .stages import StageError, StageRunner, TrainingDiverged
from .study import run_study
from .study_config import StudyConfig

__all__ = ["OutputPathError", "RunLock", "RunLockedError", "StageError", "StageRunner",
           "StudyConfig", "TrainingDiverged", "run_study"]
