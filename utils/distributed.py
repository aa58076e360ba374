"""torch.distributed set-up and the few reductions the training loops need, on the right device."""
import datetime
import os

import torch


def init_distributed(timeout_minutes: float = 30, *, single_process_group: bool = True) -> tuple[int, int]:
    """DeepSpeed's process group (NCCL on GPUs, gloo on CPUs) with a bounded timeout, so a rank that
    dies or hangs makes the others fail instead of waiting forever. Returns (rank, world size).
    A DeepSpeed engine needs the group even in a single process; with single_process_group=False (step 3,
    no engine) a single process (WORLD_SIZE unset or 1) gets (0, 1) and no group."""
    if not single_process_group and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return 0, 1
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _unlink_shm_buffer()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _unlink_shm_buffer() -> None:
    """On CPUs DeepSpeed's shared-memory all-reduce puts a 69 MB file per rank in /dev/shm and never
    removes it: every run (each on its own port) leaks RAM until the machine runs out. All ranks map
    every buffer inside init_distributed, so after a barrier each rank can drop its file's name; the
    memory then goes back when the processes end, even when they are killed."""
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '127.0.0.1')}_"
            f"{os.environ.get('MASTER_PORT', '29500')}_{torch.distributed.get_rank()}")
    if os.path.exists(name):
        os.unlink(name)


def collective_device() -> torch.device:
    """NCCL reduces only GPU tensors; gloo (CPU runs) only CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sum_across_ranks(*numbers: float) -> list[float]:
    values = torch.tensor(numbers, dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(values)
    return values.tolist()


def mean_across_ranks(metrics: dict) -> dict:
    names = sorted(metrics)
    totals = sum_across_ranks(*(float(metrics[n]) for n in names))
    return {n: v / torch.distributed.get_world_size() for n, v in zip(names, totals)}


def min_across_ranks(number: float) -> float:
    value = torch.tensor([number], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value.item()


def max_across_ranks(number: float) -> float:
    value = torch.tensor([number], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()


def shutdown(*close) -> None:
    """Leave the process group cleanly: a rank that exits with it still open can abort at interpreter
    exit ("terminate called without an active exception") after all its work is done. `close`: functions called
    after the last barrier, before the group goes (a colocated vLLM engine's close_vllm: its own shutdown destroys
    the process groups, and left to interpreter exit, after ours, it fails with a traceback)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    for function in close:
        function()
    if torch.distributed.is_initialized():  # vLLM's shutdown may have destroyed it already
        torch.distributed.destroy_process_group()
