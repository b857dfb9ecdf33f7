"""``sparse-adv-fast`` (also ``python -m sparse_adv_fast``): argument parsing and dispatch.

Subcommands: ``study`` (the resumable controlled study), ``demo`` (the study's small
default), ``train``, ``prune``, ``iwi``, ``eval``, ``bench`` and ``info``. The work lives in
:mod:`sparse_adv_fast.pipeline`.
Errors are one line on stderr, never a traceback (``--debug`` shows it instead), with one
meaning per exit status:

* 2: what the user gave is wrong: an argument, a path (missing, a directory where a file is
  expected, an output that is not writable or is one of the inputs), a data or checkpoint
  file (malformed, a bad ``arch``, NaN / Inf weights) - raised as ``ValueError``,
  ``FileNotFoundError``, ``IsADirectoryError`` or ``NotADirectoryError``;
* 1: running failed: training diverged (the last finished epoch's checkpoint is kept), a
  write failed (disk full: earlier files are kept), the output is locked by another run, a
  run directory is unusable;
* 130: interrupted (``train`` / ``prune`` / ``iwi`` / ``study`` / ``demo``: rerun the same
  command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "sparse-adv-fast"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message and where to look.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types -------------------------------------------------------------------------
def _number(cast: Any, ok: Any, not_a_number: str, out_of_range: str) -> Any:
    """An argparse type: ``cast`` the text, then require ``ok(value)``; the two messages
    start the one-line error for text that does not parse and for a value out of range."""

    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{not_a_number}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{out_of_range}, got {text}")
        return v

    return parse


_sparsity = _number(float, lambda v: 0.0 <= v < 1.0, "sparsity must be a number",
                    "sparsity must be in [0, 1)")
_positive_int = _number(int, lambda v: v >= 1, *["expected a positive integer"] * 2)
_eps = _number(float, lambda v: 0.0 <= v <= 1.0, "eps must be a number",
               "eps must be in [0, 1] (inputs are in [0, 1])")


def _checked(check: Any) -> Any:
    """An argparse type from a library check ``check(value) -> value`` raising ValueError:
    the rule lives in one place, the CLI applies it at parse time."""

    def parse(value: Any) -> Any:
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _int_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _float_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _check_seed(v: int) -> int:
    from .pipeline.stages import check_seed

    return check_seed(v)


def _check_width(v: float) -> float:
    from .models import check_width

    return check_width(v)


_seed = _checked(lambda t: _check_seed(_int_text(t)))
_width = _checked(lambda t: _check_width(_float_text(t)))


def _suites(text: str) -> tuple[str, ...]:
    from .pipeline.commands import check_suites

    try:
        return check_suites(tuple(p.strip().lower() for p in text.split(",") if p.strip()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- parser ---------------------------------------------------------------------------------
def _cmd(name: str) -> Any:
    from .pipeline.command_config import COMMANDS

    return COMMANDS[name]


def _study_cls() -> Any:
    from .pipeline.study_config import StudyConfig

    return StudyConfig


def _option(p: argparse.ArgumentParser, cls: Any, name: str, *flags: str, help: str = "",
            type: Any = None) -> None:
    """A flag for field ``name`` of command config ``cls``: parsed and checked by the field
    (choices listed by argparse), absent unless given, so that ``--config FILE`` values
    apply and a given flag overrides them."""
    from . import config

    check = config.field_check(cls, name)
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    flags = flags or (f"--{name.replace('_', '-')}",)
    kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS,
                              help=f"{help} (default: {default})".lstrip())
    if check.kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif check.choices is not None:
        kw["choices"] = check.choices
    else:
        kw["type"] = type or config.arg_type(cls, name)
    p.add_argument(*flags, **kw)


def _common_train(p: argparse.ArgumentParser, cmd: str, *, method_key: str = "method",
                  method_flag: str = "--method") -> None:
    cls = _cmd(cmd)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON / YAML file of these settings (keys = flag names with _); "
                   "flags given override it")
    _option(p, cls, method_key, method_flag, help="training method")
    _option(p, cls, "epochs", help="epochs")
    _option(p, cls, "eps", help="L-inf radius (None: 0.1 digits, 0.3 mnist, 8/255 cifar10)")
    _option(p, cls, "lr", help="learning rate (the peak for --schedule cyclic)")
    _option(p, cls, "steps", help="attack steps in training")
    _option(p, cls, "batch_size")
    _option(p, cls, "seed", help="random seed, in [0, 2**32)")
    _option(p, cls, "data_dir", help="folder with mnist / cifar10 files")
    _option(p, cls, "augment", help="random crop + flip of training batches (None: cifar10)")
    _option(p, cls, "momentum")
    _option(p, cls, "weight_decay")
    _option(p, cls, "optimizer")
    _option(p, cls, "schedule", help="cosine, step (x0.1 at 50%%, 75%%), none, cyclic")
    _option(p, cls, "alpha", help="attack step (None: eps/4; 1.25 eps for fgsm_rs)")
    _option(p, cls, "beta", help="TRADES weight")
    _option(p, cls, "eps_warmup", help="epochs over which eps ramps linearly from 0")
    _option(p, cls, "collapse_check", help="stop a run whose training collapses")
    _option(p, cls, "sync_batchnorm", help="under torchrun: SyncBatchNorm over the ranks "
            "(CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--fresh", action="store_true",
                   help="discard the checkpoint of an interrupted run (<out>.ckpt), start over")
    p.set_defaults(resumable=True)


def _study_args(p: argparse.ArgumentParser, *, out: str, config: bool) -> None:
    """The arguments ``study`` and ``demo`` share; ``config``: a CONFIG file in front
    (``study``; the demo is the default config)."""
    if config:
        p.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                       help="study config file, JSON or YAML (default: the built-in defaults "
                       "= configs/study/default.json); the first argument without '='")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="config overrides, applied last: seeds=0,1,2 arms=dense_at,imp "
                   "eps=0.2 lr_grid.at=0.05,0.1 workers=1 ... (keys: the config's fields)")
    p.add_argument("--quick", action="store_true",
                   help="the quick preset (configs/study/quick.json): 1 seed, 1 learning rate "
                   "per family, tiny budgets, about 1 minute on 2 CPU cores")
    p.add_argument("--out", default=out, help="output directory (default: %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the finished jobs of an earlier run in --out, start over")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    p.set_defaults(resumable=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``sparse-adv-fast`` argument parser (one subparser per command)."""
    parser = _Parser(
        prog=PROG,
        description="Sparse, adversarially robust networks: train, prune, IWI, evaluate.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser(
        "demo", help="the controlled study's small default (= study with the default config)",
        description="The controlled study with its default config on digits (= "
        f"`{PROG} study`): every arm (dense AT, one-shot, IMP with rewinding, random and "
        "re-init controls, natural-prune-then-AT, HYDRA, the 2x network from scratch, IWI "
        "ticket and widen) with equal training budgets, learning rates tuned on validation, 3 "
        "paired seeds; prints the table and a verdict per claim, writes results.json/.md, "
        "plots and config.json to --out. About 10 minutes on 2 CPU cores; --quick: 1 seed "
        "and tiny budgets, about 1 minute. Rerun the same command to resume.",
    )
    _study_args(d, out="saf_out", config=False)
    d.add_argument("--seed", type=_seed, default=None,
                   help="first seed: the seeds become S, S+1, S+2 (S alone with --quick; "
                   "default: 0, 1, 2)")
    # Shorthands for the config keys of the same name: the field's own check and choices.
    sc = _study_cls()
    _option(d, sc, "dataset")
    _option(d, sc, "data_dir", help="folder with mnist / cifar10 files")
    _option(d, sc, "eps", help="L-inf radius (None: 0.1 digits, 0.3 mnist, 8/255 cifar10)")
    _option(d, sc, "method", help="adversarial training loss of every arm")
    d.set_defaults(func=_study, config=None)

    s = sub.add_parser(
        "study", help="controlled study: arms with equal budgets, seeds, intervals, verdicts",
        description="Run (or resume) the controlled study of CONFIG (JSON / YAML; none: the "
        "defaults, as configs/study/default.json) with key=value overrides (e.g. seeds=0,1 "
        "arms=dense_at,imp lr_grid.at=0.05,0.1). The config is validated before any work. "
        "Prints the table and the verdicts; writes results.json/.md, study_*.png, "
        "config.json, timing.json and stages/ to --out. Rerun the same command to resume.",
    )
    _study_args(s, out="saf_study", config=True)
    s.set_defaults(func=_study, seed=None)

    t = sub.add_parser("train", help="train a model, save a checkpoint")
    _option(t, _cmd("train"), "dataset")
    _option(t, _cmd("train"), "model")
    _option(t, _cmd("train"), "width", help="width multiplier, in (0, 16]", type=_width)
    t.add_argument("--out", default="model.pt",
                   help="checkpoint file (default: %(default)s); while training, the "
                   "resumable state is kept in <out>.ckpt; the resolved config goes to "
                   "<out>.config.json")
    _common_train(t, "train")
    t.set_defaults(func=_train)

    p = sub.add_parser("prune", help="prune a saved model, save a checkpoint")
    p.add_argument("checkpoint", help="model checkpoint (from train / prune / iwi)")
    pc = _cmd("prune")
    _option(p, pc, "method", help="magnitude / random: prune once; imp / hydra: also train "
            "(--epochs per IMP round / HYDRA score epochs, then as many fine-tuning)")
    _option(p, pc, "sparsity", help="target fraction in [0, 1)", type=_sparsity)
    _option(p, pc, "scope")
    _option(p, pc, "rounds", help="IMP rounds")
    p.add_argument("--out", default="pruned.pt")
    _common_train(p, "prune", method_key="train_method", method_flag="--train-method")
    p.set_defaults(func=_prune)

    w = sub.add_parser("iwi", help="Inverse Weights Inheritance, then adversarial training")
    w.add_argument("source", help="source model checkpoint")
    wc = _cmd("iwi")
    _option(w, wc, "mode")
    _option(w, wc, "width", help="target width, in (0, 16] (widen: None = 2x the source's)",
            type=_width)
    _option(w, wc, "init", help="start of the weights not inherited (None: zero for ticket, "
            "preserve for widen: same function, new units trainable)")
    w.add_argument("--out", default="iwi.pt")
    _common_train(w, "iwi")
    w.set_defaults(func=_iwi)

    e = sub.add_parser("eval", help="clean and robust accuracy of a saved model (JSON)")
    e.add_argument("checkpoint")
    e.add_argument("--attacks", type=_suites, default=("pgd20x5", "apgd"),
                   help="comma-separated suites: pgd10, pgd20x5, pgd<k>x<r>, fgsm, apgd, "
                   "apgd-ce, apgd-dlr, autoattack (APGD-CE, APGD-T, FAB-T, Square; worst "
                   "case per sample), autoattack-rand (EOT, for randomised models)")
    e.add_argument("--eps", type=_eps, default=None, help="L-inf radius (default per dataset)")
    e.add_argument("--max-batches", type=_positive_int, default=None)
    e.add_argument("--batch-size", type=_positive_int, default=128)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--json", dest="json_out", default=None, help="write here, not to stdout")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="run benchmarks/ (source checkout) and print ratio tables")
    b.add_argument("--json", dest="json_out", default=".benchmarks/saf_bench.json")
    b.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                   help="only benchmarks matching EXPR (passed to pytest as -k EXPR)")
    b.add_argument("--quick", action="store_true",
                   help="only the benchmarks marked quick (pytest -m quick)")
    b.add_argument("--suite", default=None, metavar="NAME",
                   help="only benchmarks/bench_NAME.py (e.g. end_to_end)")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="extra pytest arguments, after -- (e.g. -- -x)")
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="versions, devices and backends")
    i.set_defaults(func=_info)
    return parser


# ---- dispatch -------------------------------------------------------------------------------
def _study_config(a: argparse.Namespace) -> Any:
    """The study config of ``study`` / ``demo``: defaults < CONFIG < the ``--quick`` preset <
    the demo's shorthand flags < ``key=value`` overrides; ``--seed S`` then shifts the seeds
    to S, S+1, ... (as many as the config has). Validated here, before any work."""
    from .pipeline import study_config

    items = ([a.config] if a.config is not None else []) + list(a.overrides)
    paths = [i for i in items if "=" not in i]
    if paths and a.cmd == "demo":
        raise ValueError(f"demo takes no CONFIG (it is the default study), got {paths[0]!r}; "
                         f"use `{PROG} study CONFIG` or key=value overrides")
    if len(paths) > 1:
        raise ValueError(f"more than one CONFIG given ({', '.join(map(repr, paths))}); "
                         "overrides are key=value")
    shorthand = {k: getattr(a, k) for k in ("dataset", "data_dir", "eps", "method")
                 if hasattr(a, k)}  # demo's flags, absent unless given
    overrides = study_config.parse_overrides([i for i in items if "=" in i])
    cfg = study_config.load(paths[0] if paths else None, {**shorthand, **overrides},
                            quick=a.quick)
    if a.seed is not None:
        cfg = cfg.replace(seeds=tuple(a.seed + i for i in range(len(cfg.seeds))))
    return cfg


def _study(a: argparse.Namespace) -> int:
    from .pipeline import commands, study, study_report
    from .pipeline.commands import check_data_dir

    cfg = _study_config(a)
    check_data_dir(cfg.dataset, cfg.data_dir)
    results = study.run_study(cfg, a.out, fresh=a.fresh, progress=not a.no_progress,
                              process_group=commands.job_group())
    _say(study_report.table(results))
    _say("")
    _say(study_report.claims_section(results))
    _say(f"\nwrote {', '.join(study.OUTPUTS)} and stages/ (one file per job) in {a.out}")
    return 0


def _say(text: str) -> None:
    """Print a command's result: by rank 0 alone under torchrun."""
    from . import distributed

    if distributed.world().main:
        print(text)


def _resolve(a: argparse.Namespace) -> Any:
    """The command's config: its defaults < the ``--config`` file < the flags given."""
    from . import config

    cls = _cmd(a.cmd)
    d = config.read_file(a.config, cls.keys()) if a.config is not None else {}
    d.update({k: getattr(a, k) for k in cls.keys() if hasattr(a, k)})
    return cls.from_dict(d, where=a.config or "arguments")


def _train_kw(c: Any, a: argparse.Namespace) -> dict[str, Any]:
    return dict(epochs=c.epochs, eps=c.eps, lr=c.lr, steps=c.steps, batch_size=c.batch_size,
                seed=c.seed, data_dir=c.data_dir, augment=c.augment, progress=not a.no_progress,
                fresh=a.fresh, **c.fit_settings())


def _train(a: argparse.Namespace) -> int:
    from .pipeline import commands

    c = _resolve(a)
    res = commands.train(dataset=c.dataset, model=c.model, width=c.width, method=c.method,
                         out=a.out, **_train_kw(c, a))
    _say(f"saved {res['out']} (config: {commands.config_path(res['out'])})")
    return 0


def _prune(a: argparse.Namespace) -> int:
    from .pipeline import commands

    c = _resolve(a)
    res = commands.prune(checkpoint=a.checkpoint, method=c.method, sparsity=c.sparsity,
                         scope=c.scope, out=a.out, rounds=c.rounds, train_method=c.train_method,
                         **_train_kw(c, a))
    _say(f"saved {res['out']} (sparsity {res['sparsity']:.4f})")
    return 0


def _iwi(a: argparse.Namespace) -> int:
    from .pipeline import commands

    c = _resolve(a)
    res = commands.iwi(source=a.source, mode=c.mode, width=c.width, init=c.init, out=a.out,
                       method=c.method, **_train_kw(c, a))
    _say(f"saved {res['out']} (width {res['width']:g})")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from .pipeline import commands
    from .pipeline.outputs import check_output_file

    if a.json_out is not None:
        check_output_file(a.json_out, flag="--json", inputs=[a.checkpoint])
    res = commands.evaluate(checkpoint=a.checkpoint, attacks=a.attacks, eps=a.eps,
                            max_batches=a.max_batches, batch_size=a.batch_size,
                            data_dir=a.data_dir, progress=not a.no_progress)
    from . import distributed

    if distributed.world().main:
        commands.dump_json(res, a.json_out)
    return 0


def _bench(a: argparse.Namespace) -> int:
    from .pipeline import commands
    from .pipeline.outputs import check_output_file

    commands.benchmarks_dir()
    Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)  # .benchmarks/ by default
    check_output_file(a.json_out, flag="--json")
    extra = [x for x in a.pytest_args if x != "--"]
    return commands.bench(json_out=a.json_out, keyword=a.keyword, quick=a.quick,
                          suite=a.suite, extra=extra)


def _info(a: argparse.Namespace) -> int:
    from . import info

    info.main()
    return 0


# Exit status 2: what the user gave is wrong (checked first: FileNotFoundError is an OSError).
_INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Exit status 1: running failed (CheckpointError, StageError, TrainingDiverged and
# RunLockedError are RuntimeErrors; a failed write is an OSError).
_RUNTIME_ERRORS = (RuntimeError, OSError, TypeError, ArithmeticError)


def _one_line(e: BaseException) -> str:
    from .distributed import one_line

    return one_line(e)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed by :func:`build_parser`; usage errors exit with status 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills the key=value positionals from their first run only: later ones,
        # after an option (`study cfg.json --quick seeds=0`), come back here as extras.
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparse-adv-fast``; returns the exit status.

    Under torchrun (``WORLD_SIZE`` > 1) it first joins the job; every rank then prints its
    own one-line error, tagged ``[rank r/n]``, and only rank 0 writes files and output.
    """
    args = parse_args(argv)
    prog = f"{PROG} {args.cmd}"
    from . import distributed as D

    tag = ""
    try:
        w = D.init_from_env()
        tag = w.tag()
        with D.stopped_by_peers(w):
            return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        return 0
    except KeyboardInterrupt:
        then = "; rerun the same command to resume" if getattr(args, "resumable", False) else ""
        print(f"{prog}: {tag}interrupted{then}", file=sys.stderr)
        return 130
    except _INPUT_ERRORS as e:
        if args.debug:
            raise
        print(f"{prog}: {tag}error: {_one_line(e)}", file=sys.stderr)
        return 2
    except _RUNTIME_ERRORS as e:
        if args.debug:
            raise
        print(f"{prog}: {tag}error: {_one_line(e)} (--debug for the traceback)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, with the type to report it by
        if args.debug:
            raise
        print(f"{prog}: {tag}internal error: {type(e).__name__}: {_one_line(e)} (--debug for "
              "the traceback; please report it)", file=sys.stderr)
        return 1
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
