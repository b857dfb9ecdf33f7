"""The controlled study behind ``sparse-adv-fast study``: arms with equal budgets, paired
seeds, learning rates tuned on validation, intervals and a verdict per claim.

``run_study(config, out_dir)`` plans the jobs of ``pipeline/study_tasks.py`` as a graph,
runs them (in ``workers`` processes, one torch thread each on tiny inputs), and writes to
``out_dir``:

* ``stages/<job>.pt`` one atomically saved result per job; a rerun skips finished jobs,
                      and an interrupted job resumes from its phases' checkpoints;
* ``config.json``     the resolved config, the budget plan, seeds and library versions;
* ``results.json``    per arm and seed the numbers, per arm mean +- interval, paired
                      differences against dense AT, the tuning record and the verdicts
                      (no timings: a resumed run writes the same file as a straight one);
* ``results.md``      the table and the verdicts; ``study_*.png`` plots with error bars;
* ``timing.json``     wall time and which jobs ran or were skipped.

Under torchrun (``process_group``, or the CLI's job) the ranks are the workers: in rounds,
rank ``r`` runs the ``r``-th job that is ready, every rank learns every result, and rank 0
alone writes the outputs. Each job seeds itself from its name and saves its own result and
checkpoints, so the results equal a single process's and a killed run resumes; the
output directory must be on a filesystem every rank shares.

Tuning: on the first seed every arm is trained at each learning rate of its family's
grid and the rate with the best validation worst-case robust accuracy is kept (ties: the
earlier grid entry); the other seeds use it. The first seed's result is its selected
tuning run (selected on validation, then evaluated on test once).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..checkpoint import write_atomic
from ..train.fit import quiet
from . import arms as A
from . import runtime, stats
from .command_config import versions
from .lock import RunLock
from .outputs import check_output_dir
from .stages import StageRunner
from .study_config import StudyConfig
from .study_report import PLOTS
from .study_tasks import JOBS, Ctx

FORMAT = "sparse_adv_fast.study/1"
# The files a run writes into its directory, besides stages/ (see the module docstring).
OUTPUTS = ("results.json", "results.md", *PLOTS, "config.json", "timing.json")
METRIC = "worst_case"


@dataclass(frozen=True)
class Job:
    """A node of the job graph: ``JOBS[kind](ctx, **args)`` once ``deps`` are done."""

    key: str
    kind: str
    args: dict[str, Any] = field(hash=False)
    deps: tuple[str, ...] = ()


def _lr(lr: float) -> str:
    return f"{lr:g}"


def start_key(seed: int, wide: bool, cfg: StudyConfig) -> str:
    """Job name of the dense start of ``seed`` at base width or widened."""
    return f"start.s{seed}.w{cfg.widen if wide else 1}"


def train_key(arm: str, seed: int, lr: float) -> str:
    """Job name of ``arm`` trained at ``lr`` for ``seed``."""
    return f"train.{arm}.s{seed}.lr{_lr(lr)}"


def result_key(arm: str, seed: int) -> str:
    """Job name of ``arm``'s test result for ``seed``."""
    return f"result.{arm}.s{seed}"


class Graph:
    """The study's jobs, given the learning rates selected so far (``selected``)."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.jobs: dict[str, Job] = {}

    def _add(self, key: str, kind: str, after: list[str], **args: Any) -> str:
        if key not in self.jobs:
            self.jobs[key] = Job(key, kind, args, tuple(after))
        return key

    def _start(self, seed: int, wide: bool) -> str:
        return self._add(start_key(seed, wide, self.cfg), "start", [], seed=seed, wide=wide)

    def _prefix_deps(self, arm: str, seed: int, lr: float) -> dict[str, str]:
        """Jobs holding ``arm``'s prefix trained at ``lr`` (named as ``prefix`` reads them)."""
        s = self._start(seed, False)
        if arm in ("dense_at", "oneshot"):
            return {"pre": self._add(f"pre.s{seed}.lr{_lr(lr)}", "pre", [s], seed=seed, lr=lr,
                                     start=s)}
        if arm in ("imp", "random", "reinit", "natural_prune_at"):
            method = "natural" if arm == "natural_prune_at" else "at"
            key = self._add(f"rounds-{method}.s{seed}.lr{_lr(lr)}", "rounds", [s], seed=seed,
                            lr=lr, start=s,
                            method="natural" if method == "natural" else self.cfg.method)
            return {"rounds": key, "start": s}
        if arm == "hydra":
            return {"hydra": self._add(f"hydra.s{seed}.lr{_lr(lr)}", "hydra", [s], seed=seed,
                                       lr=lr, start=s)}
        raise ValueError(f"arm {arm!r} has no prefix")

    def _train_deps(self, arm: str, seed: int, lr: float, sel: Mapping[str, float]
                    ) -> dict[str, str]:
        c = self.cfg
        if arm in ("dense_at", "large_scratch"):
            return {"start": self._start(seed, arm == "large_scratch")}
        if arm in A.IWI_ARMS:
            source = c.iwi_ticket_source if arm == "iwi_ticket" else c.iwi_widen_source
            return self._prefix_deps(source, seed, sel[A.PREFIX_LR[source]])
        owner = A.PREFIX_LR[arm]
        return self._prefix_deps(arm, seed, lr if owner == arm else sel[owner])

    def build(self, sel: Mapping[str, float]) -> dict[str, Job]:
        """Every job that can be named now: all of the first seed's tuning jobs whose
        prefix learning rates are selected, the other seeds' jobs of selected arms, and
        the result jobs of selected arms."""
        c = self.cfg
        first = c.seeds[0]
        for arm in c.arms:
            if any(n not in sel for n in A.lr_sources(arm, c.iwi_ticket_source,
                                                       c.iwi_widen_source)):
                continue
            for seed in c.seeds:
                lrs = c.family_grid(arm) if seed == first else (
                    (sel[arm],) if arm in sel else ())
                for lr in lrs:
                    deps = self._train_deps(arm, seed, lr, sel)
                    self._add(train_key(arm, seed, lr), "train", sorted(set(deps.values())),
                              arm=arm, seed=seed, lr=lr, deps=deps)
                if arm in sel:
                    t = train_key(arm, seed, sel[arm])
                    self._add(result_key(arm, seed), "result", [t], arm=arm, seed=seed, train=t)
        return self.jobs


def select(cfg: StudyConfig, val: Mapping[str, float]) -> tuple[dict[str, float], dict]:
    """Selected learning rate per arm (all first-seed tuning jobs done) and the record."""
    sel, record = {}, {}
    first = cfg.seeds[0]
    for arm in cfg.arms:
        grid = cfg.family_grid(arm)
        keys = [train_key(arm, first, lr) for lr in grid]
        if not all(k in val for k in keys):
            continue
        scores = [val[k] for k in keys]
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))  # ties: earlier entry
        sel[arm] = grid[best]
        record[arm] = {"family": A.ARMS[arm].family, "grid": list(grid),
                       "val_worst_case": {_lr(lr): s for lr, s in zip(grid, scores, strict=True)},
                       "selected_lr": grid[best], "seed": first}
    return sel, record


# ---- execution ----------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _store(out: Path, cfg: StudyConfig, progress: bool, fresh: bool = False
           ) -> StageRunner:
    # <out>/stages/<job>.pt, plus run.json: resuming with other settings is an error.
    return StageRunner(out, config=cfg.identity(), fresh=fresh, log=None if progress else quiet)


def _threads(cfg: StudyConfig) -> int:
    if cfg.dataset in runtime.SINGLE_THREAD:
        return 1
    return max(1, (os.cpu_count() or 1) // cfg.workers)


def _init_worker(out: str, cfg_dict: dict[str, Any], progress: bool) -> None:
    cfg = StudyConfig.from_dict(cfg_dict)
    torch.set_num_threads(_threads(cfg))
    _WORKER["ctx"] = Ctx(cfg, _store(Path(out), cfg, progress))


def _run_job(job: Job) -> dict[str, Any]:
    """Run one job in this process (its result is saved by the store); its summary."""
    ctx: Ctx = _WORKER["ctx"]
    store = ctx.store
    ctx.key = job.key
    from .. import backends

    with backends.using(ctx.cfg.backend):
        result = store.run(job.key, lambda: JOBS[job.kind](ctx, **job.args))
    for p in store.stage_dir.glob(f"{job.key}.*.partial.pt"):
        p.unlink(missing_ok=True)
    return _summary(result)


def _summary(result: Any) -> dict[str, Any]:
    return result.get("summary", {}) if isinstance(result, dict) else {}


def budget_plan(cfg: StudyConfig, steps_per_epoch: int) -> dict[str, Any]:
    """The planned iteration accounting of every arm (``pipeline/arms.py``)."""
    L, R = cfg.segment, cfg.imp_rounds
    per_arm = {a: A.arm_phases(a, B=cfg.budget_epochs, L=L, R=R, spe=steps_per_epoch,
                               start_epochs=cfg.start_epochs,
                               iwi_ticket_source=cfg.iwi_ticket_source,
                               iwi_widen_source=cfg.iwi_widen_source) for a in cfg.arms}
    return {"steps_per_epoch": steps_per_epoch, "start_epochs": cfg.start_epochs,
            "start_steps": cfg.start_epochs * steps_per_epoch,
            "budget_epochs": cfg.budget_epochs, "budget_steps": cfg.budget_epochs *
            steps_per_epoch, "segment_epochs": L, "imp_rounds": R,
            "imp_sparsities": list(cfg.sparsities), "target_sparsity": cfg.sparsities[-1],
            "arms": {a: {"total_steps": A.total_steps(p), "phases": p}
                     for a, p in per_arm.items()}}


class Study:
    """One study over one output directory."""

    def __init__(self, cfg: StudyConfig, out: str | os.PathLike[str], *, fresh: bool = False,
                 progress: bool = True, world: D.World = D.SINGLE) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.world = world
        self.progress = progress and world.main
        self.store = _store(self.out, cfg, progress, fresh)
        self.ctx = Ctx(cfg, self.store)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def _log(self, msg: str) -> None:
        if self.progress:
            print(f"[saf study] {msg}", file=sys.stderr, flush=True)

    def run(self) -> dict[str, Any]:
        """Run or resume every job; write the outputs; return the results dict."""
        t0 = time.perf_counter()
        plan = budget_plan(self.cfg, self.ctx.steps_per_epoch)
        if self.world.main:
            self._write_config(plan)
        summaries = self._execute()
        from . import study_report

        results = aggregate(self.cfg, plan, summaries)
        if self.world.main:
            study_report.write_all(results, self.out)
            timing = {"seconds": time.perf_counter() - t0, "workers": self.cfg.workers,
                      "ranks": self.world.size, "jobs_ran": self.ran,
                      "jobs_skipped": self.skipped}
            write_atomic(self.out / "timing.json", json.dumps(timing, indent=2) + "\n")
        return results

    def _write_config(self, plan: dict[str, Any]) -> None:
        info = {"format": FORMAT, "config": self.cfg.as_dict(), "seeds": list(self.cfg.seeds),
                "eps": self.cfg.resolved_eps, "budget": plan, "versions": versions()}
        write_atomic(self.out / "config.json", json.dumps(info, indent=2) + "\n")

    def _execute(self) -> dict[str, dict[str, Any]]:
        graph = Graph(self.cfg)
        done: dict[str, dict[str, Any]] = {}
        if self.world.active:
            _WORKER["ctx"] = self.ctx
            with runtime.threads_for(self.cfg.dataset):
                return self._rounds(graph, done)
        if self.cfg.workers == 1:
            _WORKER["ctx"] = self.ctx
            with runtime.threads_for(self.cfg.dataset):
                return self._loop(graph, done, lambda job: _Now(_run_job(job)))
        cfg_dict = self.cfg.as_dict()
        with ProcessPoolExecutor(
            max_workers=self.cfg.workers, mp_context=_spawn(), initializer=_init_worker,
            initargs=(str(self.out), cfg_dict, self.progress),
        ) as pool:
            return self._loop(graph, done, lambda job: pool.submit(_run_job, job))

    def _loop(self, graph: Graph, done: dict[str, dict[str, Any]],
              submit: Callable[[Job], Any]) -> dict[str, dict[str, Any]]:
        running: dict[Any, str] = {}
        while True:
            found, ready, pending = self._next(graph, done, set(running.values()))
            if found:
                self._found(done, found)
                continue  # finished earlier: their results may select more learning rates
            if not ready and not running:
                if pending:
                    raise RuntimeError(_STUCK)
                break  # every job nameable under the current selection is done
            for job in ready:
                running[submit(job)] = job.key
            finished, _ = _wait(list(running))
            for fut in finished:
                key = running.pop(fut)
                done[key] = fut.result()  # re-raises a job's exception here
                self.ran.append(key)
        return done


    def _next(self, graph: Graph, done: dict[str, dict[str, Any]], busy: set[str]
              ) -> tuple[dict[str, dict[str, Any]], list[Job], bool]:
        """``(jobs finished in an earlier run with their summaries, jobs ready to run,
        whether any nameable job is still to do)`` given what is done and running."""
        val = {k: s["val"][METRIC] for k, s in done.items() if k.startswith("train.")}
        sel, _ = select(self.cfg, val)
        jobs = graph.build(sel)
        found = {k: _summary(self.store.load(k)) for k in jobs
                 if k not in done and k not in busy and self.store.done(k)}
        ready = [j for k, j in jobs.items() if k not in done and k not in busy
                 and all(d in done for d in j.deps)]
        return found, ready, any(k not in done for k in jobs)

    def _found(self, done: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> None:
        done.update(found)
        self.skipped.extend(found)

    def _rounds(self, graph: Graph, done: dict[str, dict[str, Any]]
                ) -> dict[str, dict[str, Any]]:
        """The job loop over the ranks of a torchrun job: rank 0 plans each round (what
        an earlier run finished, which jobs are ready), rank ``r`` runs the ``r``-th ready
        job, and every rank records every result. A failed job stops every rank."""
        w = self.world
        while True:
            found, ready, pending = D.broadcast(
                self._next(graph, done, set()) if w.main else None, w)
            if found:
                self._found(done, found)
                continue
            if not ready:
                if pending:
                    raise RuntimeError(_STUCK)
                return done
            mine = ready[w.rank] if w.rank < len(ready) else None
            outcome: tuple[str, Any] | None = None
            err: Exception | None = None
            if mine is not None:
                try:
                    outcome = ("ok", _run_job(mine))
                except Exception as e:  # noqa: BLE001 - every rank raises below
                    err, outcome = e, ("error", f"{type(e).__name__}: {D.one_line(e)}")
            for rank, (key, result) in enumerate(
                    D.gather((mine.key if mine else None, outcome), w)):
                if key is None:
                    continue
                status, value = result
                if status == "error":
                    if err is not None:
                        raise err
                    raise D.DistributedError(f"study job {key} failed on rank {rank}: {value}")
                done[key] = value
                self.ran.append(key)


_STUCK = "study: the job graph is stuck (a dependency never ran)"


class _Now:
    """A finished 'future' for in-process execution."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _wait(futs: list[Any]) -> tuple[list[Any], list[Any]]:
    now = [f for f in futs if isinstance(f, _Now)]
    if now:
        return now, [f for f in futs if f not in now]
    finished, pending = wait([f for f in futs if isinstance(f, Future)],
                             return_when=FIRST_COMPLETED)
    return list(finished), list(pending)


def _spawn() -> Any:
    import multiprocessing

    # spawn, not fork: a forked child of a process whose OpenMP pool already ran can hang.
    return multiprocessing.get_context("spawn")


# ---- results ------------------------------------------------------------------------------


def aggregate(cfg: StudyConfig, plan: dict[str, Any], summaries: Mapping[str, dict[str, Any]]
              ) -> dict[str, Any]:
    """``results.json``: per-seed numbers, intervals, paired differences, verdicts."""
    level = cfg.level
    val = {k: s["val"][METRIC] for k, s in summaries.items() if k.startswith("train.")}
    _, tuning = select(cfg, val)
    arms_out: dict[str, Any] = {}
    per_seed: dict[str, dict[int, float]] = {}
    for arm in cfg.arms:
        seeds = {}
        for seed in cfg.seeds:
            s = summaries.get(result_key(arm, seed))
            if s is None:
                continue
            t = s["test"]
            seeds[str(seed)] = {
                "clean": t["clean"], "worst_case": t["worst_case"], "robust": t["robust"],
                "n": t["n"], "sparsity": s["sparsity"], "params": s["params"], "lr": s["lr"],
                "val_worst_case": s["val"][METRIC], "steps": s["steps"],
                "ledger": [{k: p[k] for k in ("phase", "steps", "lrs") if k in p}
                           for p in s["ledger"]],
                **({"iwi": s["iwi"]} if "iwi" in s else {}),
                **({"radius": s["radius"]} if "radius" in s else {}),
            }
        per_seed[arm] = {int(k): v[METRIC] for k, v in seeds.items()}
        row = {"label": A.ARMS[arm].label, "family": A.ARMS[arm].family,
               "lr": tuning.get(arm, {}).get("selected_lr"), "seeds": seeds,
               "planned_steps": plan["arms"][arm]["total_steps"]}
        for metric in ("worst_case", "clean", "sparsity"):
            row[metric] = stats.interval([v[metric] for v in seeds.values()], level)
        for metric in ("median_radius", "spearman"):
            vals = [v["radius"][metric] for v in seeds.values()
                    if "radius" in v and math.isfinite(v["radius"][metric])]
            if vals:  # NaN where too few points were correct for a correlation
                row[f"radius_{metric}"] = stats.interval(vals, level)
        dead = [v["iwi"]["dead_fraction"] for v in seeds.values()
                if v.get("iwi", {}).get("dead_fraction") is not None]
        if arm in A.IWI_ARMS:
            row["dead_fraction"] = stats.interval(dead, level)
        arms_out[arm] = row
    if "dense_at" in per_seed:
        for arm, row in arms_out.items():
            if arm != "dense_at":
                d = stats.paired(per_seed[arm], per_seed["dense_at"], level)
                row["vs_dense_at"] = {**d, "verdict": stats.verdict(d)}
    claims = []
    for claim in A.CLAIMS:
        comps = []
        for arm, base in claim.comparisons:
            if arm in per_seed and base in per_seed:
                d = stats.paired(per_seed[arm], per_seed[base], level)
                comps.append({"arm": arm, "baseline": base, "metric": METRIC, **d,
                              "verdict": stats.verdict(d)})
        claims.append({"id": claim.id, "text": claim.text, "comparisons": comps,
                       "verdict": stats.combine([c["verdict"] for c in comps]) if comps
                       else "not tested"})
    return {"format": FORMAT, "config": cfg.identity(), "eps": cfg.resolved_eps,
            "metric": METRIC, "level": level, "seeds": list(cfg.seeds), "budget": plan,
            "tuning": tuning, "arms": arms_out, "claims": claims}


def run_study(config: StudyConfig | Mapping[str, Any], out_dir: str | os.PathLike[str], *,
              fresh: bool = False, progress: bool = True,
              process_group: Any = None) -> dict[str, Any]:
    """Run or resume the study ``config`` in ``out_dir``; returns the results dict that is
    also saved as ``results.json`` (see the module docstring for every file written).

    ``config`` is a :class:`StudyConfig` or a dict of its fields (validated before any work).
    ``fresh`` deletes the job results of an earlier run in ``out_dir``; without it, a run in
    a directory holding a study with other settings is a ``StageError``. ``out_dir`` is
    checked writable (:func:`~.outputs.check_output_dir`) and locked for the run: a second
    run into it (also with ``fresh``) raises :class:`~.lock.RunLockedError` at once.
    ``process_group``: fan the jobs out over the group's ranks (see the module docstring;
    ``workers`` is then unused: each rank runs one job at a time); every rank returns the
    results, rank 0 writes the files.
    """
    cfg = config if isinstance(config, StudyConfig) else StudyConfig.from_dict(config)
    w = D.of_group(process_group) if process_group is not None else D.SINGLE
    with D.together(w, "study's checks"):
        out = check_output_dir(out_dir)
        _check_world(cfg, w)
    # Taken before --fresh deletes anything; rank 0 holds it for the whole job.
    with RunLock(out) if w.main else contextlib.nullcontext():
        with D.together(w, f"opening the study directory {out}"):
            study = Study(cfg, out, fresh=fresh, progress=progress, world=w) if w.main \
                else None
        D.barrier(w)  # the others open the directory once rank 0 has set it up
        if study is None:
            study = Study(cfg, out, progress=progress, world=w)
        return study.run()


def _check_world(cfg: StudyConfig, w: D.World) -> None:
    """A torchrun job with more ranks than the study has training jobs leaves ranks idle
    for the whole run: refused before any work."""
    jobs = sum(len(cfg.family_grid(a)) for a in cfg.arms) + len(cfg.arms) * (len(cfg.seeds) - 1)
    if w.size > jobs:
        raise ValueError(f"study: {w.size} ranks for {jobs} training jobs (some ranks would "
                         "never run one); use at most that many ranks or more seeds / arms")


__all__ = ["FORMAT", "OUTPUTS", "Graph", "Job", "Study", "aggregate", "budget_plan", "result_key",
           "run_study", "select", "start_key", "train_key", "versions"]
