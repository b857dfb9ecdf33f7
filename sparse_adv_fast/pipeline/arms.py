"""The controlled study's arms, claims and iteration accounting (pure data, no training).

Budget rule. Every arm starts from the same *dense start*: a fresh network (one per seed
and width) trained adversarially for ``k = start_epochs`` epochs at a constant learning
rate. From there every arm spends exactly ``B = budget_epochs`` epochs of optimizer steps
(one step per training batch; HYDRA's score updates count as steps too), so every arm's
total is ``k + B`` epochs. ``B`` is cut into ``R + 1`` equal segments of ``L = B / (R + 1)``
epochs, ``R`` being the number of IMP rounds. Each segment restarts the *post-k* schedule
(cosine from the arm's learning rate down to 0 over the segment): the schedule of an IMP
round is the one the dense run had from iteration k on, so a rewound ticket "restarts the
schedule at step k, not at 0" (Frankle et al. 2020, "Linear mode connectivity and the
lottery ticket hypothesis").

Arms (``B = (R + 1) L``; widths are the base width unless marked ``@w``)::

    dense_at          AT for B                                  (the reference)
    large_scratch     AT for B, all at width w, from its own dense start at width w
    oneshot           AT for B - L, global magnitude pruning to s, AT fine-tuning for L
    imp               R rounds (AT for L, prune the rate, rewind to the start), AT for L
    random            imp's R rounds (the search is charged), a random mask with the IMP
                      mask's layer-wise densities on the start weights, AT for L
    reinit            imp's R rounds (charged), the IMP mask on freshly drawn weights, AT for L
    natural_prune_at  R IMP rounds under natural training (rewound to the same start), AT for L
    hydra             AT for B - 2L, HYDRA score training for L epochs, AT fine-tuning for L
    iwi_ticket        a sparse source arm's state before its last segment (default: imp's
                      rewound ticket), inherited by a dense net (IWI ``ticket``), AT for L
    iwi_widen         a base-width source arm's state before its last segment (default:
                      dense AT for B - L), widened w times (IWI ``widen``), AT for L @w

So every sparse arm is "prefix, then a final segment of L", and the IWI arms replace that
final segment of their source by inheritance plus dense training: an IWI arm and its
source differ in one thing only, and both spend ``k + B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# ---- arms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One arm of the study.

    ``family`` names the learning-rate grid the arm is tuned on; ``lr_from`` names the arms
    whose *selected* learning rate trains this arm's prefix (their tuning must finish
    first); ``sparse`` says whether the final network is sparse; ``wide`` whether it is
    the widened architecture.
    """

    name: str
    label: str
    family: str
    sparse: bool
    wide: bool = False
    lr_from: tuple[str, ...] = ()


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("dense_at", "dense AT", "at", sparse=False),
    Arm("oneshot", "one-shot magnitude + AT fine-tune", "finetune", sparse=True,
        lr_from=("dense_at",)),
    Arm("imp", "IMP, rewind to k (lottery ticket)", "at", sparse=True),
    Arm("random", "random mask at IMP densities", "at", sparse=True, lr_from=("imp",)),
    Arm("reinit", "IMP mask, re-initialised", "at", sparse=True, lr_from=("imp",)),
    Arm("natural_prune_at", "IMP under natural training, then AT", "at", sparse=True),
    Arm("hydra", "HYDRA scores + AT fine-tune", "at", sparse=True),
    Arm("large_scratch", "large net, AT from scratch", "at", sparse=False, wide=True),
    Arm("iwi_ticket", "IWI ticket -> dense", "finetune", sparse=False),
    Arm("iwi_widen", "IWI widen", "finetune", sparse=False, wide=True),
)}
ARM_NAMES = tuple(ARMS)
# Whose selected learning rate trains an arm's prefix (the part before its final segment).
PREFIX_LR = {"dense_at": "dense_at", "oneshot": "dense_at", "imp": "imp", "random": "imp",
             "reinit": "imp", "natural_prune_at": "natural_prune_at", "hydra": "hydra"}
FAMILIES = ("at", "finetune")
IWI_ARMS = ("iwi_ticket", "iwi_widen")
# Arms whose state before their final segment is a sparse base-width network.
TICKET_SOURCES = ("imp", "oneshot", "hydra", "random", "reinit", "natural_prune_at")
# Arms whose state before their final segment is a base-width network (dense or sparse).
WIDEN_SOURCES = ("dense_at", *TICKET_SOURCES)


def lr_sources(arm: str, iwi_ticket_source: str, iwi_widen_source: str) -> tuple[str, ...]:
    """Arms whose selected learning rate this arm's prefix is trained with (their tuning
    must finish before this arm's jobs can start)."""
    if arm == "iwi_ticket":
        return (PREFIX_LR[iwi_ticket_source],)
    if arm == "iwi_widen":
        return (PREFIX_LR[iwi_widen_source],)
    return ARMS[arm].lr_from


def check_arms(arms: tuple[str, ...], iwi_ticket_source: str, iwi_widen_source: str,
               widen: int) -> None:
    """One-line ValueErrors for unknown arms, missing dependencies and bad IWI pairs."""
    if not arms:
        raise ValueError("arms must not be empty")
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"unknown arm {a!r}; choose from {ARM_NAMES}")
    dup = sorted({a for a in arms if arms.count(a) > 1})
    if dup:
        raise ValueError(f"arms lists {dup} more than once")
    if "iwi_ticket" in arms and iwi_ticket_source not in TICKET_SOURCES:
        why = ("it is dense" if iwi_ticket_source in ("dense_at", "large_scratch")
               else "it is not a pruning arm")
        raise ValueError(
            f"incompatible IWI pair: iwi_ticket needs a sparse source of the target's "
            f"architecture (one of {TICKET_SOURCES}), got {iwi_ticket_source!r} ({why})")
    if "iwi_widen" in arms and iwi_widen_source not in WIDEN_SOURCES:
        why = (f"it is already {widen}x wide" if iwi_widen_source == "large_scratch"
               else "it is not a base-width training arm")
        raise ValueError(
            f"incompatible IWI pair: iwi_widen needs a base-width source (one of "
            f"{WIDEN_SOURCES}) to widen {widen}x, got {iwi_widen_source!r} ({why})")
    for a in arms:
        needs = list(lr_sources(a, iwi_ticket_source, iwi_widen_source))
        if a in IWI_ARMS:
            needs.insert(0, iwi_ticket_source if a == "iwi_ticket" else iwi_widen_source)
        for need in needs:
            if need not in arms:
                raise ValueError(f"arm {a!r} starts from the tuned prefix of arm {need!r}; "
                                 f"add {need!r} to arms")


# ---- claims -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A claim of the paper and the paired comparisons (arm, baseline) that test it."""

    id: int
    text: str
    comparisons: tuple[tuple[str, str], ...]


CLAIMS = (
    Claim(1, "weight sparsity does not hurt robustness but improves it",
          (("oneshot", "dense_at"), ("imp", "dense_at"), ("hydra", "dense_at"))),
    Claim(2, "lottery-ticket weight inheritance and adversarial training both improve the "
             "robustness of pruned networks",
          (("imp", "reinit"), ("imp", "random"), ("imp", "natural_prune_at"))),
    Claim(3, "IWI makes a large network more robust than adversarial training alone",
          (("iwi_widen", "large_scratch"), ("iwi_ticket", "dense_at"))),
)


# ---- pruning schedule and budget ----------------------------------------------------------


def imp_sparsities(rate: float, rounds: int, target: float | None) -> tuple[float, ...]:
    """Per-round IMP sparsities: ``1 - (1 - rate)^r``, the last round exactly ``target``.

    ValueError when the target cannot be reached in ``rounds`` rounds at ``rate``, or is
    reached before the last round (a round that prunes nothing would waste budget).
    """
    # Rounded so that 1 - 0.8**1 prints as 0.2 (and compares equal to a target of 0.2).
    reach = [round(1.0 - (1.0 - rate) ** r, 12) for r in range(1, rounds + 1)]
    if target is None:
        return tuple(reach)
    needed = math.ceil(math.log1p(-target) / math.log1p(-rate) - 1e-9)
    if target > reach[-1] + 1e-12:
        raise ValueError(
            f"unreachable pruning schedule: {rounds} IMP rounds at rate {rate:g} reach "
            f"sparsity {reach[-1]:.4f}, below the target {target:g}; use imp_rounds={needed} "
            f"or imp_rate >= {1 - (1 - target) ** (1 / rounds):.4f}")
    if rounds > 1 and target <= reach[-2] + 1e-12:
        raise ValueError(
            f"pruning schedule: the target sparsity {target:g} is reached after {needed} "
            f"round(s) at rate {rate:g}, so IMP round {rounds} would prune nothing; use "
            f"imp_rounds={needed}")
    return (*reach[:-1], float(target))


def segment_epochs(budget_epochs: int, rounds: int) -> int:
    """``L = B / (R + 1)``; ValueError when the budget cannot hold the rounds."""
    if budget_epochs < rounds + 1:
        raise ValueError(
            f"budget too small for the rounds: budget_epochs={budget_epochs} cannot hold "
            f"{rounds} IMP rounds plus the final training ({rounds + 1} segments of at least "
            "one epoch)")
    if budget_epochs % (rounds + 1):
        lo = budget_epochs - budget_epochs % (rounds + 1)
        raise ValueError(
            f"budget_epochs={budget_epochs} does not split into {rounds + 1} equal segments "
            f"({rounds} IMP rounds + the final training); use {lo} or {lo + rounds + 1}")
    return budget_epochs // (rounds + 1)


Phase = dict[str, Any]


def _ph(what: str, kind: str, epochs: int, spe: int, wide: bool = False) -> Phase:
    return {"phase": what, "kind": kind, "epochs": epochs, "steps": epochs * spe,
            "wide": wide}


def prefix_phases(arm: str, B: int, L: int, R: int, spe: int) -> list[Phase]:
    """Phases of ``arm`` before its final segment (for the IWI sources)."""
    if arm == "dense_at":
        return [_ph("dense AT (source)", "at", B - L, spe)]
    if arm == "oneshot":
        return [_ph("dense AT", "at", B - L, spe), _ph("one-shot prune", "prune", 0, spe)]
    if arm in ("imp", "random", "reinit"):
        out = [_ph(f"IMP round {r}", "at", L, spe) for r in range(1, R + 1)]
        if arm != "imp":
            out.append(_ph("random mask" if arm == "random" else "re-initialise", "prune", 0,
                           spe))
        return out
    if arm == "natural_prune_at":
        return [_ph(f"natural IMP round {r}", "natural", L, spe) for r in range(1, R + 1)]
    if arm == "hydra":
        return [_ph("dense AT", "at", B - 2 * L, spe), _ph("HYDRA scores", "score", L, spe)]
    raise ValueError(f"arm {arm!r} has no prefix")


def arm_phases(arm: str, *, B: int, L: int, R: int, spe: int, start_epochs: int,
               iwi_ticket_source: str = "imp", iwi_widen_source: str = "dense_at"
               ) -> list[Phase]:
    """The planned phases of ``arm``, the shared dense start first (``steps`` per phase)."""
    wide = arm == "large_scratch"  # the only arm trained at width w from its start on
    start = [_ph("dense start (shared)", "at", start_epochs, spe, wide=wide)]
    if arm in ("dense_at", "large_scratch"):
        return start + [_ph("AT", "at", B, spe, wide=wide)]
    if arm == "iwi_ticket":
        return (start + prefix_phases(iwi_ticket_source, B, L, R, spe)
                + [_ph("IWI ticket inherit", "inherit", 0, spe),
                   _ph("AT (dense)", "at", L, spe)])
    if arm == "iwi_widen":
        return (start + prefix_phases(iwi_widen_source, B, L, R, spe)
                + [_ph("IWI widen inherit", "inherit", 0, spe, wide=True),
                   _ph("AT (wide)", "at", L, spe, wide=True)])
    return start + prefix_phases(arm, B, L, R, spe) + [_ph("AT (sparse)", "at", L, spe)]


def total_steps(phases: list[Phase]) -> int:
    """Optimizer steps of a phase list."""
    return sum(int(p["steps"]) for p in phases)


__all__ = ["ARMS", "ARM_NAMES", "CLAIMS", "FAMILIES", "IWI_ARMS", "PREFIX_LR", "TICKET_SOURCES",
           "WIDEN_SOURCES", "Arm", "Claim", "arm_phases", "check_arms", "imp_sparsities",
           "lr_sources", "prefix_phases", "segment_epochs", "total_steps"]
