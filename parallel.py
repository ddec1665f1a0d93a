"""Training beyond one device's memory: train.py's processes, one or many under torchrun, each holding the
whole model (DDP) or a shard of it (FSDP2: torch.distributed.fsdp.fully_shard); the whole weights and
optimizer shards a sharded run saves; activation checkpointing.

    torchrun --nproc_per_node 2 train.py ...           # DDP: a copy of the model per process
    torchrun --nproc_per_node 2 train.py ... --fsdp    # FSDP2: parameters, gradients, AdamW's state sharded

FSDP2 (PyTorch's per-parameter sharding, Zhao et al. 2023 "PyTorch FSDP") gives each process 1/N of
every parameter as a DTensor; a block's weights are all-gathered just before it runs and freed after,
and gradients are reduce-scattered, so each process holds about 1/N of the weights, gradients and
AdamW moments (16 bytes a parameter in float32) plus one block's whole weights at a time.
"""

import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from cli import check_device, fail
from model import LanguageModel

def setup_distributed(cfg):
    """Under torchrun: one process per device, NCCL on GPUs and gloo on CPUs. Returns
    (rank, world_size, device). --fsdp needs two processes at least, else one line."""
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        fail("--fsdp shards the model over processes: run it under torchrun with --nproc_per_node 2 or more "
             "(one process trains without it)")
    if "RANK" not in os.environ:
        try:
            device = torch.device("cuda" if cuda else "cpu") if cfg.device == "auto" else check_device(cfg.device)
        except ValueError as e:
            fail(e)
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def all_sum(x: float, world: int, device, op=dist.ReduceOp.SUM) -> float:
    """x summed over the processes (op=dist.ReduceOp.MAX: the largest, e.g. a stop signal any of them
    got); x itself in one process."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)  # (1,)
    dist.all_reduce(t, op=op)
    return t.item()


def blocks(model) -> list:
    """The transformer blocks of the LM and of the tower (the Q-Former's layers stay in the whole model)."""
    lm = model if isinstance(model, LanguageModel) else model.lm
    return [*lm.layers, *(model.vision.layers if lm is not model else [])]


def shard(model, device, bf16: bool):
    """FSDP2 in place: each transformer block its own unit (gathered just before it runs), then the
    whole model (the embeddings, norms, connector and head). On CUDA with bf16: parameters computed in
    bfloat16, gradients reduced in float32 (MixedPrecisionPolicy); the sharded weights stay float32."""
    bf16 = bf16 and device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def recompute_activations(model, on: bool):
    """Activation checkpointing (Chen et al. 2016): in training, every transformer block of the LM and
    the tower keeps only its input and runs again in the backward (torch.utils.checkpoint, non-reentrant):
    activation memory of one block instead of all, for one more forward pass."""
    for module in model.modules():  # LanguageModel and VisionTower read it in their forward
        if hasattr(module, "checkpointing"):
            module.checkpointing = on


def wrap(model, cfg, world: int):
    """The module a step runs: the model itself (one process, or FSDP: already sharded in place),
    or its DDP wrapper, which averages gradients over the processes."""
    if world == 1 or cfg.fsdp:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def held_mib(model, optimizer) -> float:
    """MiB of parameters and optimizer state this process holds (a sharded tensor: its own shard only)."""
    tensors = [*model.parameters(), *(t for state in optimizer.state.values() for t in state.values()
                                      if isinstance(t, torch.Tensor))]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2 ** 20


def sharded_state(model, optimizer, folder: str) -> tuple[dict, str]:
    """What a sharded run's checkpoint holds, written by every process (each call is collective): the
    whole weights, gathered on rank 0's CPU for its single-file model.safetensors (the others get {}),
    and AdamW's state, each process writing its own shard into `folder` (torch.distributed.checkpoint)."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    try:
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)
    except CheckpointException as e:  # (a BaseException: a full disk would otherwise be a traceback)
        shutil.rmtree(folder, ignore_errors=True)
        fail(f"saving the optimizer's shards in {folder} failed ({str(e)[:300]}); the last checkpoint is kept")
    return weights, folder


def sharded_optimizer_loader(model, optimizer):
    """A function reading AdamW's shards back from a checkpoint's optimizer/ folder, each process its own
    (on as many processes as wrote them): load_trainer_state's `load_optimizer`."""
    def load(folder: str):
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the shards' shapes, to fill
        try:
            dcp.load(state, checkpoint_id=folder)
        except CheckpointException as e:  # missing or damaged shards (a BaseException, not an OSError)
            raise OSError(f"the optimizer's shards in {folder} cannot be read ({str(e)[:300]})") from None
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return load
