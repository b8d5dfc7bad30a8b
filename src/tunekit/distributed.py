"""Process-group helpers for the callbacks: each is a no-op (or the single-process answer) outside a process group.

Under DeepSpeed/DDP a decision one rank takes alone (stop, raise) leaves the others waiting in the next collective
forever, so the callbacks agree through these: `gather_object` to let every rank see every rank's answer, `barrier`
to wait until every rank has written its files.
"""

from __future__ import annotations


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
