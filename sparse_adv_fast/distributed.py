"""Data-parallel runs on ``torch.distributed``: who this process is, and the few collective
steps the library needs (joining a torchrun job, sharding a loader, agreeing on errors,
checking that masks and weights are equal on every rank).

A :class:`World` names this process's place in a process group. ``fit`` and
``evaluate`` take one through their ``process_group`` argument (or a model wrapped in
``DistributedDataParallel``), and the CLI builds one from torchrun's environment
(:func:`init_from_env`). Nothing here starts processes: torchrun (or the user's own
launcher) does, and rendezvous, NCCL or gloo are torch's.

Every check that can fail on one rank only is run on all of them together
(:func:`together`): the failing rank raises its own error, the others a
:class:`DistributedError` that names it, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_CHUNK = 1 << 20


class DistributedError(RuntimeError):
    """A distributed run cannot start or go on: no rendezvous, another rank failed, or
    the ranks disagree (masks, weights)."""


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` in ``group`` (``None``: the default group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: Any = None

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, logs and shows progress bars."""
        return self.rank == 0

    def tag(self) -> str:
        """``"[rank r/n] "`` in a distributed run, else ``""`` (for one-line messages)."""
        return f"[rank {self.rank}/{self.size}] " if self.active else ""


SINGLE = World()
_current: World = SINGLE


def world() -> World:
    """The world the CLI joined (:func:`init_from_env`); :data:`SINGLE` otherwise."""
    return _current


def of_group(group: Any) -> World:
    """The :class:`World` of an initialised process group (``None``: the default one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError("a process group was given but torch.distributed is not "
                               "initialised: call torch.distributed.init_process_group first")
    size = dist.get_world_size(group)
    local = _env_int("LOCAL_WORLD_SIZE", size)
    return World(rank=dist.get_rank(group), size=size,
                 local_rank=_env_int("LOCAL_RANK", 0), local_size=local, group=group)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer "
                               "(set by torchrun; launch with torchrun)") from None


def launched() -> bool:
    """Whether the environment asks for a multi-process run (torchrun sets WORLD_SIZE)."""
    return _env_int("WORLD_SIZE", 1) > 1


def init_from_env(timeout_s: float = 600.0) -> World:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` from the environment): NCCL when CUDA is available, else gloo.

    A single process (no ``WORLD_SIZE`` or 1) needs no group: :data:`SINGLE`. A missing
    rendezvous or one that cannot be reached is a :class:`DistributedError` in one line.
    ``timeout_s`` bounds how long a collective waits for a rank that died.
    """
    global _current
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        _current = SINGLE
        return SINGLE
    rank = _env_int("RANK", -1)
    if not 0 <= rank < size:
        raise DistributedError(f"WORLD_SIZE={size} but RANK is {os.environ.get('RANK')!r}; "
                               "launch with torchrun, which sets both")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={size} asks for a distributed run but {' and '.join(missing)} "
            "(the rendezvous endpoint) is not set: launch with torchrun (--rdzv-endpoint "
            "HOST:PORT on several machines) or set MASTER_ADDR and MASTER_PORT"
        )
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    local = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as e:
        reason = " ".join(str(e).split())[:200]
        raise DistributedError(f"rank {rank} could not join the process group at {where} "
                               f"({reason}); check the rendezvous endpoint") from e
    _current = of_group(None)
    return _current


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` joined (if any)."""
    global _current
    if _current.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _current = SINGLE


@contextlib.contextmanager
def stopped_by_peers(w: World) -> Iterator[None]:
    """While inside, a SIGTERM (what torchrun sends the other ranks when one fails) is a
    :class:`DistributedError` saying so, so every rank ends with a one-line message and
    its ``finally`` blocks run; nothing half-written is kept since every write is atomic."""
    if not w.active:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise DistributedError(f"rank {w.rank} was stopped (SIGTERM): another rank of the "
                               "job failed or the job was cancelled; see that rank's error")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---- collectives ---------------------------------------------------------------------------
def gather(obj: Any, w: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when single)."""
    if not w.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj, group=w.group)
    return out


def broadcast(obj: Any, w: World, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not w.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=w.group)
    return box[0]


def all_sum(values: list[float], w: World, device: torch.device | None = None) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64, so counts stay exact)."""
    if not w.active:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device or _device(w))
    dist.all_reduce(t, group=w.group)
    return t.tolist()


def barrier(w: World) -> None:
    """Wait for every rank."""
    if w.active:
        import torch.distributed as dist

        dist.barrier(group=w.group)


def _device(w: World) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(w.group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else \
        torch.device("cpu")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def together(w: World, what: str) -> Iterator[None]:
    """Run the block on every rank and agree on how it ended: if it raised on any rank,
    it raises on all (its own error where it failed, a :class:`DistributedError` naming
    the rank and the message elsewhere). The block must hold no collective of its own."""
    if not w.active:
        yield
        return
    err: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        err = e
    status = gather(None if err is None else f"{type(err).__name__}: {one_line(err)}", w)
    if err is not None:
        raise err
    for rank, msg in enumerate(status):
        if msg is not None:
            raise DistributedError(f"{what} failed on rank {rank}: {msg}")


# ---- equality checks ----------------------------------------------------------------------
_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def digest(t: Tensor) -> Tensor:
    """Two int64 numbers of ``t``'s bits: their sum and a position-weighted sum.

    Integer arithmetic, so it is exact and independent of reduction order: equal tensors
    give equal digests on every rank and device, and any flipped element changes it.
    """
    flat = t.detach().contiguous().view(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    bits = flat.view(_INT_OF[flat.element_size()]) if flat.is_floating_point() else flat
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        b = bits[start:start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + b.numel(), device=b.device, dtype=torch.int64)
        total += b.sum()
        weighted += (b * (pos * 2654435761 % 4294967291 + 1)).sum()
    return torch.stack([total, weighted])


def _compare(named: list[tuple[str, Tensor]], w: World, what: str, when: str) -> None:
    import torch.distributed as dist

    if not named:
        return
    mine = torch.stack([digest(t) for _, t in named]).to(_device(w))
    every = [torch.empty_like(mine) for _ in range(w.size)]
    dist.all_gather(every, mine, group=w.group)
    for rank, other in enumerate(every[1:], start=1):
        if not torch.equal(other, every[0]):
            row = int((other != every[0]).any(dim=1).nonzero()[0])
            raise DistributedError(f"the {what} differ between rank 0 and rank {rank} {when}: "
                                   f"first at {named[row][0]}")


def check_masks(model: nn.Module, w: World, when: str) -> None:
    """Raise :class:`DistributedError` on every rank unless every masked layer's mask is
    bit-identical on all ranks (a cheap digest per layer is compared, not assumed)."""
    if not w.active:
        return
    from .nn.convert import masked_layers

    _compare([(f"{n}.weight_mask", m.weight_mask) for n, m in masked_layers(model).items()],
             w, "masks", when)


def check_weights(model: nn.Module, w: World, when: str) -> None:
    """Like :func:`check_masks` for every parameter and buffer: data-parallel ranks must
    hold the same model after every optimiser step."""
    if not w.active:
        return
    _compare(list(model.state_dict().items()), w, "weights", when)


def average_buffers(model: nn.Module, w: World) -> None:
    """Replace every BatchNorm running mean and variance by its mean over the ranks,
    bit-identical everywhere.

    DDP gives each step rank 0's buffers, and then every rank updates them from its own
    shard, so after the last step of an epoch they differ. The mean over the shards is
    the better estimate of the full batch's statistics, and it makes the ranks equal
    again before the weight check and rank 0's checkpoint.
    """
    if not w.active:
        return
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    stats = [b for m in model.modules() if isinstance(m, _BatchNorm)
             for b in (m.running_mean, m.running_var) if b is not None]
    if not stats:
        return
    # One flat tensor: two collectives per epoch, not two per buffer.
    flat = torch.cat([b.detach().reshape(-1).to(_device(w), torch.float64) for b in stats])
    dist.all_reduce(flat, group=w.group)
    flat /= w.size
    # The reduction order may differ per rank in some backends: rank 0's result wins.
    dist.broadcast(flat, src=0, group=w.group)
    for buf, part in zip(stats, flat.split([b.numel() for b in stats]), strict=True):
        buf.copy_(part.reshape(buf.shape))


def broadcast_masks(model: nn.Module, w: World) -> None:
    """Give every rank rank 0's masks (after a pruning step that every rank ran)."""
    if not w.active:
        return
    import torch.distributed as dist

    from .nn.convert import apply_masks, masked_layers

    masks = {}
    for name, m in masked_layers(model).items():
        buf = m.weight_mask.detach().clone().to(_device(w))
        dist.broadcast(buf, src=0, group=w.group)
        masks[name] = buf.to(m.weight_mask.device)
    if masks:
        apply_masks(model, masks)


# ---- data ---------------------------------------------------------------------------------
def shard_loader(loader: Any, w: World, *, seed: int, what: str) -> Any:
    """``loader`` split over the ranks: a ``DistributedSampler`` (shuffling when the
    loader shuffled, from ``seed`` and the epoch) and ``batch_size / size`` per rank, so
    the global batch is the loader's. A loader that already has a ``DistributedSampler``
    is the user's own sharding and is returned as it is."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    if not w.active or isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise ValueError(f"{what}: a distributed run shards a torch DataLoader with a "
                         f"batch_size; got {type(loader).__name__} (give it a "
                         "DistributedSampler yourself to shard it your way)")
    batch = loader.batch_size
    if batch % w.size:
        raise ValueError(f"{what}: the global batch size {batch} does not split evenly over "
                         f"{w.size} ranks; use a multiple of {w.size}")
    n = len(loader.dataset)
    if n < w.size * (batch // w.size):
        raise ValueError(f"{what}: {n} training samples cannot fill one global batch of "
                         f"{batch} on {w.size} ranks; use fewer ranks or a smaller batch")
    sampler = DistributedSampler(loader.dataset, num_replicas=w.size, rank=w.rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler),
                                 seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=batch // w.size, sampler=sampler,
                      drop_last=loader.drop_last, **_loading(loader))


def _loading(loader: Any) -> dict[str, Any]:
    """How ``loader`` loads (workers, collation, pinning), for a loader over its dataset
    that samples differently."""
    return {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory, "generator": loader.generator,
            "worker_init_fn": loader.worker_init_fn,
            "persistent_workers": loader.persistent_workers}


def rank_batches(loader: Any, w: World, limit: int | None = None
                 ) -> Iterator[tuple[int, Any]]:
    """``(i, batch)`` for this rank's batches of ``loader``: ``i % size == rank`` and
    ``i < limit``, in order (every batch in a single process).

    A map-style ``DataLoader`` in sequential order (an evaluation loader) is re-batched
    over the same index lists, so each rank loads only its own batches. Any other
    iterable is read in full on every rank and the other ranks' batches are skipped,
    since only that keeps its order the same everywhere.
    """
    own = _own_batches(loader, w, limit)
    if own is not None:
        yield from own
        return
    for i, item in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if i % w.size == w.rank:
            yield i, item


def _own_batches(loader: Any, w: World, limit: int | None
                 ) -> Iterator[tuple[int, Any]] | None:
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

    if not (w.active and isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and type(loader.batch_sampler) is BatchSampler
            and type(loader.batch_sampler.sampler) is SequentialSampler):
        return None
    batches = list(loader.batch_sampler)[:limit]
    ids = list(range(w.rank, len(batches), w.size))
    mine = DataLoader(loader.dataset, batch_sampler=[batches[i] for i in ids],
                      **_loading(loader))
    return zip(ids, mine, strict=True)


def set_epoch(loader: Any, epoch: int) -> None:
    """``sampler.set_epoch(epoch)`` for a ``DistributedSampler`` (its shuffle of ``epoch``)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def rank_seed(seed: int, rank: int) -> int:
    """A seed of rank ``rank``'s own from ``seed`` (rank 0 keeps ``seed``), so the ranks'
    random starts and augmentations are not copies of each other."""
    if rank == 0:
        return seed
    from .seeding import derive_seed

    return derive_seed(seed, rank)


__all__ = ["SINGLE", "DistributedError", "World", "all_sum", "barrier", "broadcast",
           "broadcast_masks", "check_masks", "check_weights", "digest", "gather",
           "init_from_env", "launched", "of_group", "one_line", "rank_seed", "set_epoch",
           "shard_loader", "shutdown", "stopped_by_peers", "together", "world"]
