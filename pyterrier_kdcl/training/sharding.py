"""FSDP through Accelerate: which sharded strategies a fit runs, and the whole model out of the shards.

Under FSDP (version 2, ``fully_shard``) every process holds a shard of each parameter; forward and backward gather
what they need. A fit ends with every process holding the whole trained model again, so that ``output_dir/model``
(written by the first process) and the reranker the trainer transforms with are the full model, never one process's
shard (the trap Tevatron's bug log records). Best weights and checkpoints are gathered in full as well, so a
checkpoint written under FSDP holds what one written under DDP holds.

Accelerate turns FSDP on for accelerators only: on CPU processes (gloo) a launch asking for it would silently run
DDP. :func:`honour_fsdp_on_cpu` honours the request there too, which is how the tests run FSDP on two CPU
processes. DeepSpeed and Megatron-LM are refused with a pointer to FSDP.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn


def honour_fsdp_on_cpu(accelerator) -> None:
    """Switches a multi-process CPU Accelerator to FSDP when the launch asked for it (``accelerate launch
    --use_fsdp``, or ``ACCELERATE_USE_FSDP=true`` under torchrun); Accelerate itself ignores the request on CPU."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU or not _fsdp_requested():
        return
    from accelerate.state import PartialState

    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP  # what AcceleratorState sets on accelerators
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes")


def check_strategy(accelerator) -> None:
    """Refuses what a fit cannot run: DeepSpeed and Megatron-LM, and FSDP version 1."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(f"Accelerate is set up for {kind.value}, which this trainer does not run (validation, the "
                         "best weights and the saved model need the whole model gathered, which the trainer does "
                         "through FSDP). Launch with FSDP version 2 instead: accelerate launch --use_fsdp "
                         "--fsdp_version 2 script.py (or DDP: accelerate launch --multi_gpu, or torchrun)")
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("Accelerate is set up for FSDP version 1, which wraps and flattens the model; this trainer "
                         "runs FSDP version 2 (fully_shard): launch with accelerate launch --use_fsdp --fsdp_version "
                         "2 (or set FSDP_VERSION=2, or fsdp_version: 2 in the Accelerate config)")


def is_sharded(accelerator) -> bool:
    """Whether the fit's model is sharded across processes (FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters lie on the meta device (no weights are copied; buffers are), to
    receive the full weights gathered after sharded training (:func:`unshard`). Tied parameters stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def full_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights on every process, on the CPU (every process must call it: it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if trainable_only:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def unshard(model: nn.Module, plain: nn.Module) -> nn.Module:
    """Loads the full weights of the sharded ``model`` into ``plain`` (its :func:`skeleton`), on every process,
    and returns it on the device the shards were on."""
    device = next(p.device for p in model.parameters())
    # parameters only: the skeleton's buffers are copies already, and FSDP shards no buffer
    missing, unexpected = plain.load_state_dict(full_state(model), strict=False, assign=True)
    still_meta = [name for name, p in plain.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(f"gathering the sharded model left parameters unset ({still_meta[:3]}) or unknown "
                           f"({unexpected[:3]}); please report this with the model's name")
    return plain.to(device)


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, on the first process (every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _unwrapped(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Loads whole weights (trainable ones) and a whole optimizer state into the sharded ``model`` and its
    optimizer: each process keeps its shard (every process must call it, with the same values)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, _unwrapped(optimizer), optimizer_state,
                             options=StateDictOptions(full_state_dict=True))


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer holds torch's
