"""Data-parallel DP training under ``torchrun``: the plumbing, kept out of the loop.

One logical DP-SGD step is spread over the ranks the way Opacus prescribes:
each rank Poisson-samples its own share of the private split, clips its examples'
gradients, the clipped sums are all-reduced and the Gaussian noise is added once,
on rank 0 (``DistributedDPOptimizer``), so the released gradient, the sample rate
and the accountant are those of one process with the same logical batch.

What this module adds around Opacus:

- ``process_group``: join torchrun's group (gloo on CPU, nccl on GPU) for one run;
- ``RankPoissonSampler``: Opacus' distributed Poisson sampler drops a rank's empty
  local batch (``opacus/utils/uniform_sampler.py``: ``if len(selected_examples) > 0:
  yield``), which puts that rank one all-reduce behind the others (wrong sums, then a
  hang at the end of the epoch); ours yields every step, empty or not, and draws
  each rank's Bernoulli mask from its own generator (identical masks on every rank
  would correlate examples' inclusions, which Poisson sampling forbids);
- rank-0-only IO (``on_main``, ``main_only``) that never leaves a rank at a barrier
  when rank 0 fails, and the broadcasts that make the flattening levels' state
  (teacher, keep-mask, paper-mode AWP perturbation) identical on every rank;
- ``merged_ledger``: the ranks' private-data read counts summed into one ledger.

Outside torchrun (``WORLD_SIZE`` unset or 1) every helper is a no-op that calls
straight through, so the single-process path is unchanged.
"""

from __future__ import annotations

import copy
import os
import pickle
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, default_collate

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig
    from .privacy import PrivacyLedger

T = TypeVar("T")

#: Ranks wait for rank 0's setup (teacher training, layer selection) and evaluation at
#: collectives; the torch default (10 min for nccl) is too short for a large dev set.
TIMEOUT = timedelta(minutes=int(os.environ.get("DPFLAT_DIST_TIMEOUT_MIN", "60")))


# --- who am I
def launched() -> bool:
    """Started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group with more than one rank is live."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one that writes files, evaluates and owns the run lock."""
    return rank() == 0


def local_device(device: str) -> str:
    """Each rank of a node gets its own GPU (``LOCAL_RANK``); the CPU is shared."""
    if is_distributed() and str(device).startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def rank_config(cfg: "RunConfig") -> "RunConfig":
    """The config this rank trains with: its own GPU under torchrun, else ``cfg`` itself."""
    dev = local_device(cfg.train.device)
    return cfg if dev == cfg.train.device else cfg.replace(train={"device": dev})


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the launcher's process group for one run (and leave it afterwards).

    A group that is already up (a caller that set it up itself, a sweep inside one
    torchrun) is used as is and left up.
    """
    if not launched() or dist.is_initialized():
        yield
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --- rank 0 does it, everyone learns the outcome
def _to_cpu(obj: Any) -> Any:
    """Tensors to CPU before pickling, so a receiving rank does not land them on GPU 0."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; tensors arrive on the CPU)."""
    if not is_distributed():
        return obj
    box = [_to_cpu(obj) if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return obj if rank() == src else box[0]


def gathered(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (a collective: all ranks call it); ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    box: list[Any] = [None] * world_size()
    dist.all_gather_object(box, _to_cpu(obj))
    return box


def total(x: int) -> int:
    """The sum of an integer over ranks (e.g. a step's logical batch size); ``x`` alone."""
    if not is_distributed():
        return int(x)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(x)], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises its error.

    Why the error travels too: a rank-0 failure (the run is locked, the folder holds
    another config) must stop every rank, not leave them waiting at the next collective.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    out: tuple[str, Any] = ("ok", None)
    error: Exception | None = None
    if is_main():
        try:
            out = ("ok", fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
            try:
                pickle.dumps(e)
                out = ("err", e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle still has to travel
                out = ("err", RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
    kind, val = broadcast(out)
    if kind == "err":
        raise error if error is not None else val
    return val


@contextmanager
def main_only(make_cm: Callable[[], Any]) -> Iterator[None]:
    """Enter a context manager on rank 0 only (the run lock); a failure to enter reaches all ranks."""
    if not is_distributed():
        with make_cm():
            yield
        return
    cm = make_cm() if is_main() else None
    on_main(lambda: cm.__enter__())
    try:
        yield
    except BaseException as e:
        if cm is not None:
            cm.__exit__(type(e), e, e.__traceback__)
        raise
    if cm is not None:
        cm.__exit__(None, None, None)


# --- the ledger: one over all ranks
def merged_ledger(ledger: "PrivacyLedger") -> "PrivacyLedger":
    """The ledger with every rank's read counts summed (a collective: all ranks call it).

    Each rank counts the private examples it touched; rank 0 alone ran the levels'
    setup. The result is what one process reading the same examples would have recorded.
    """
    if not is_distributed():
        return ledger
    all_reads: list[list[Any]] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(all_reads, [(r.who, r.how, r.accounted, r.count, r.examples) for r in ledger.reads])
    out = copy.deepcopy(ledger)
    out.reads = []
    for reads in all_reads:
        for who, how, accounted, count, examples in reads:
            out.declare(who, how, accounted)
            r = next(x for x in out.reads if (x.who, x.how, x.accounted) == (who, how, accounted))
            r.count += count
            r.examples += examples
    return out


def keep_counts_on_main(ledger: "PrivacyLedger") -> None:
    """After a resume: the checkpoint's counts are totals over ranks, so only rank 0 keeps them."""
    if is_distributed() and not is_main():
        for r in ledger.reads:
            r.count = r.examples = 0


# --- non-private training: shard the global batch, sum the gradients
def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (every rank drew the same one from the same seed)."""
    if not is_distributed():
        return batch
    return {k: v[rank() :: world_size()] for k, v in batch.items()}


def sum_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce (sum) plain gradients: each rank's loss was already scaled by its share."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters on every rank (what DPDDP does for the private path)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, 0)


# --- Poisson sampling, each rank its share
class RankPoissonSampler(Sampler[list[int]]):
    """Distributed Poisson sampling that keeps the ranks in step.

    The private split is divided between ranks (rank r holds examples r, r+W, ...);
    each rank includes each of its examples independently with probability
    ``sample_rate`` at every step, so the union over ranks is a Poisson sample of the
    whole split at that rate: the sampled Gaussian mechanism the accountant assumes.
    Every rank yields exactly ``steps`` batches, an empty one included, so each rank
    takes part in every step's all-reduce. Each rank draws from its own secret
    generator (``engine.MechanismRNG``: OS entropy, or ``--noise-seed`` mixed with the
    rank), never from a public seed; the generator runs on across passes, and its state
    goes into the checkpoint, so a resumed run replays the same batches.

    Not a subclass of Opacus' sampler, so that importing this module does not import
    Opacus (a second per process); ``BatchMemoryManager`` only iterates it.
    """

    def __init__(self, *, total_size: int, sample_rate: float, steps: int,
                 replica: int | None = None, replicas: int | None = None, generator: torch.Generator | None = None):
        self.total_size, self.sample_rate, self.num_batches = total_size, sample_rate, steps
        self.num_replicas = world_size() if replicas is None else replicas
        self.rank = rank() if replica is None else replica
        self.num_samples = len(range(self.rank, total_size, self.num_replicas))
        if generator is None:  # no caller-held generator: a fresh secret one (OS entropy)
            import secrets

            generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        mine = torch.arange(self.rank, self.total_size, self.num_replicas)
        for _ in range(self.num_batches):
            yield mine[torch.rand(self.num_samples, generator=g) < self.sample_rate].tolist()

    def __len__(self) -> int:
        return self.num_batches


class _CollateWithEmpty:
    """Default collation, and an empty batch of the dataset's columns for an empty sample.

    Opacus' wrapper builds empty batches from the first non-empty one it saw, and
    from nothing useful when a rank's very first local batch is empty.
    """

    def __init__(self, dataset):
        self.empty = {k: v[:0] for k, v in default_collate([dataset[0]]).items()}

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        return default_collate(items) if items else {k: v.clone() for k, v in self.empty.items()}


def rank_poisson_loader(loader: DataLoader, generator: torch.Generator | None = None) -> DataLoader:
    """Opacus' distributed DP loader with its sampler replaced by :class:`RankPoissonSampler`.

    Same dataset, sample rate and number of steps per pass, so the accountant and the
    optimizer's expected batch size (set by ``make_private``) stay valid.
    """
    ds = loader.dataset
    sampler = RankPoissonSampler(total_size=len(ds), sample_rate=loader.sample_rate, steps=len(loader),
                                 generator=generator)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=_CollateWithEmpty(ds))


__all__ = [
    "RankPoissonSampler",
    "barrier",
    "broadcast",
    "broadcast_parameters",
    "gathered",
    "total",
    "is_distributed",
    "is_main",
    "keep_counts_on_main",
    "launched",
    "local_device",
    "main_only",
    "merged_ledger",
    "on_main",
    "process_group",
    "rank",
    "rank_config",
    "rank_poisson_loader",
    "shard",
    "sum_gradients",
    "world_size",
]
