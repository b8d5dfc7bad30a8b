"""Process-group helpers for the callbacks: each is a no-op (or the single-process answer) outside a process group.

Under DeepSpeed/DDP a decision one rank takes alone (stop, raise) leaves the others waiting in the next collective
forever, so the callbacks agree through these: `gather_object` to let every rank see every rank's answer,
`max_over_ranks` for a per-step decision in one small all-reduce (the stop agreement), `barrier` to wait until every
rank has written its files. `check_shared_output_dir` is such an agreement at start: every node must see rank 0's
output_dir. `set_default_timeout` bounds the collectives of groups made without a timeout (training.ddp_timeout).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from tunekit.errors import UserError

SHARED_TOKEN_PREFIX = ".tunekit_shared_check."  # + a fresh id: a new name, so no node can have it cached as absent


def is_rank_zero() -> bool:
    """True on the job's first process, from the launcher's RANK (True without a launcher). Usable before any
    process group exists: for messages printed once per job, not per rank."""
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (returns at once in a single process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def gather_object(obj) -> list:
    """`obj` from every process, in rank order (just [obj] in a single process). Collective: every rank must call it."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def set_default_timeout(seconds: int) -> None:
    """Make `seconds` the collective timeout of every process group created from now on without one of its own.

    Why: the world group gets training.ddp_timeout from its creator (TrainingArguments, or backends.common), but
    DeepSpeed runs ZeRO's gradient reduce-scatter on its own copy of it (deepspeed.utils.groups._clone_world_group:
    `new_group(ranks)`, no timeout), which torch gives its default instead: 30 min on gloo, 10 min on nccl. A rank
    that stalls while the others wait there would hang the job that long (measured on gloo: a new_group barrier
    waits past a 3 s world timeout). torch reads these module values at each new_group; there is no public setting.
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=seconds)
    if c10d.default_pg_nccl_timeout is not None:  # None when torch was built without NCCL
        c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def max_over_ranks(values: list[int]) -> list[int]:
    """Element-wise maximum of `values` over every process (`values` itself in a single process). Collective: every
    rank must call it with a list of the same length.

    One small all-reduce, cheap enough for every optimizer step (the stop agreement in preemption.py); the tensor
    lives where the backend can reduce it: the current CUDA device under nccl, the CPU under gloo.
    """
    if not is_distributed():
        return list(values)
    import torch
    import torch.distributed as dist

    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


def shared_dir_problem(output_dir: str, verdicts: list[tuple[str, bool]]) -> str | None:
    """None when every rank saw rank 0's token in `output_dir`, else the one-line refusal.

    `verdicts`: (host name, saw the token) per rank, in rank order, as `gather_object` returns them, so every rank
    computes the same line from the same list.
    """
    blind = [(rank, host) for rank, (host, seen) in enumerate(verdicts) if not seen]
    if not blind:
        return None
    ranks = _ranges([rank for rank, _ in blind])
    hosts = ", ".join(sorted({host for _, host in blind}))
    return (f"output_dir: {output_dir} is not on a filesystem every node shares: rank(s) {ranks} (on {hosts}) cannot "
            "see the file rank 0 wrote there; checkpoints, completion markers and --resume need one output_dir that "
            "every node mounts (NFS, Lustre, ...)")


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 8, 9] -> '0-2, 5, 8-9'."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_shared_output_dir(output_dir: str | os.PathLike, wait_seconds: float = 5.0) -> None:
    """Refuse (UserError, the same line on every rank) a job whose ranks do not all see rank 0's `output_dir`.

    Collective: every rank must call it, once the process group exists; a no-op in a single process. Leaves
    output_dir as it was (created, empty, when it did not exist).
    Rank 0 writes a token with a fresh id, every rank looks for it after a barrier (retrying for up to
    `wait_seconds`: a network filesystem may show a new file late), the verdicts are gathered, rank 0 removes the
    token, and every rank decides from the same list: no rank raises alone (that would leave the others waiting in
    the next collective until the timeout).
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    # Rank 0's token id and its output_dir (the one the message names), on every rank.
    token_id, rank0_dir = gather_object((uuid.uuid4().hex, str(output_dir)))[0]
    token = Path(output_dir) / f"{SHARED_TOKEN_PREFIX}{token_id}"
    if rank == 0:
        try:
            token.parent.mkdir(parents=True, exist_ok=True)  # so it may also run before the run directory exists
            token.write_text(token_id, encoding="utf-8")
        except OSError:
            pass  # rank 0 sees no token either: the verdicts say so
    barrier()
    deadline = time.monotonic() + wait_seconds
    while True:
        seen = _reads(token, token_id)
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    verdicts = gather_object((socket.gethostname(), seen))
    if rank == 0:
        token.unlink(missing_ok=True)
    barrier()  # no rank goes on while the token is still there
    problem = shared_dir_problem(rank0_dir, verdicts)
    if problem:
        raise UserError(problem)


def _reads(token: Path, expected: str) -> bool:
    try:
        return token.read_text(encoding="utf-8") == expected
    except OSError:
        return False
