"""Data-parallel helpers of the training loops: where this process stands, its share of a global micro-batch, means
over the ranks, gradient accumulation without a gradient all-reduce per micro-batch, and what accelerate was asked
for."""
import contextlib
import os

import torch
import torch.distributed as dist


ACCELERATE_FSDP_DROPPED = (
    "accelerate was asked for FSDP (ACCELERATE_USE_FSDP: an FSDP launch config or an fsdp_plugin) but applies its "
    "FSDP plugin only on GPUs and other accelerators; on CPU it drops the plugin and runs {runs}, so every rank would "
    "hold the whole model and optimizer state, not shards. To shard on CPUs, run ceu's own FSDP2 loop (torchrun "
    "--nproc_per_node N -m ceu unlearn --parallel fsdp); for DDP on purpose, launch without the FSDP config "
    "(accelerate launch --multi_gpu)")


def accelerate_requested(plugin: str) -> bool:
    """Whether accelerate is asked for ``plugin`` ("fsdp" or "deepspeed"): ``accelerate launch`` with such a config
    sets ``ACCELERATE_USE_FSDP`` or ``ACCELERATE_USE_DEEPSPEED``, as does an ``Accelerator`` given an FSDP plugin
    (``TrainingArguments(fsdp=...)``)."""
    return os.environ.get(f"ACCELERATE_USE_{plugin.upper()}", "false").lower() == "true"


def accelerate_fsdp_dropped(state=None) -> bool:
    """Whether accelerate was asked for FSDP (:func:`accelerate_requested`) but drops its plugin, as it does everywhere
    but on GPUs and other accelerators (on CPU it sets up ``MULTI_CPU``, DDP). With ``state``, accelerate's
    ``AcceleratorState`` once it is set up (``Accelerator.state``): whether it kept no plugin. Without (checking a
    launch before anything loads): whether this process will run on the CPU (:func:`local_device`), where ceu's
    Trainer arguments ask accelerate for the CPU (``use_cpu``)."""
    if not accelerate_requested("fsdp"):
        return False
    if state is not None:
        return getattr(state, "fsdp_plugin", None) is None
    return local_device().type == "cpu"


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher), known before any group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> torch.device:
    """This process's device: its local rank's GPU (``LOCAL_RANK``, 0 without a launcher) where there are GPUs, else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def data_parallel_position() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the default ``torch.distributed`` group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return data_parallel_position()[0] == 0


def rank_share(indices: list[int], rank: int, world_size: int) -> tuple[list[int], bool]:
    """This rank's samples of a global micro-batch (every ``world_size``-th, so the ranks never overlap) and whether
    they count. A rank left without samples (a short last batch) runs one stand-in sample with weight 0, so that every
    rank still takes part in the forward and backward that DDP and FSDP synchronise."""
    share = indices[rank::world_size]
    return (share, True) if share else (indices[:1], False)


def distributed_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of ``value`` over the ranks of ``group`` when ``torch.distributed`` is initialised; else ``value``."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total / world_size


@contextlib.contextmanager
def gradient_sync(model, enabled: bool):
    """Run a backward with (``enabled``) or without the data-parallel gradient reduction: off for every micro-batch
    of an accumulation window but the last, so a window costs one all-reduce (DDP: ``no_sync()``) or one
    reduce-scatter (FSDP2: ``set_requires_gradient_sync(False)``, gradients accumulate unsharded until the last
    backward reduces their sum). A model that is neither is left alone."""
    if enabled:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 (fully_shard) root
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
