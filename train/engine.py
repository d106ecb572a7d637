"""DeepSpeed around the model: its config built from ours, AdamW, the LR schedule, FLOPs for MFU.

The DeepSpeed dict is derived from the typed config every time, never kept by hand, so the two cannot
drift. Precision: bf16 on GPU and fp32 on CPU unless deepspeed.precision says otherwise.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.config import Config, Schedule
from pipeline.core.model.gpt2 import GPT, GPTConfig


@dataclass(frozen=True)
class Batch:
    """The shape of an optimizer step, which pretraining (batch.*) and fine-tuning (finetune.*) each set."""

    sequences: int  # per optimizer step, over all workers and accumulation steps
    micro_batch_size: int  # sequences per worker per forward pass
    seq_len: int  # tokens per sequence (fine-tuning: at most; examples are padded per batch)

    @classmethod
    def of(cls, cfg: Config) -> Batch:
        """Pretraining's."""
        b = cfg.batch
        return cls(b.tokens_per_step // b.seq_len, b.micro_batch_size, b.seq_len)


def gpt_config(cfg: Config) -> GPTConfig:
    return GPTConfig(**cfg.model.model_dump())  # the same fields: tests/test_model.py keeps them so


def precision(cfg: Config) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if cfg.cluster.use_gpu else "fp32"


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False, batch: Batch | None = None) -> dict:
    """DeepSpeed's dict for `batch` (default: pretraining's, batch.*)."""
    b, z = batch or Batch.of(cfg), cfg.deepspeed
    micro_batches = b.sequences
    if micro_batches % (b.micro_batch_size * world_size):
        raise ValueError(f"the step's batch of {micro_batches} sequences does not divide over {world_size} workers "
                         f"x micro-batches of {b.micro_batch_size} (batch.tokens_per_step / batch.seq_len, "
                         f"batch.micro_batch_size)")
    zero: dict = {"stage": z.zero_stage, "overlap_comm": cfg.cluster.use_gpu, "contiguous_gradients": True}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    if z.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_batch_size": micro_batches,
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": micro_batches // (b.micro_batch_size * world_size),
        # Explicit: DeepSpeed's default for this changed in 0.19.3; 0 means no clipping.
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a bf16 step whose gradients are not finite is discarded (see train_step)
        "bf16": {"enabled": precision(cfg) == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        **_grad_dtypes(cfg),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our own metrics report progress
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming with another number of workers (see train/checkpoint.py)
        ds["checkpoint"] = {"load_universal": True}
    return ds


def _grad_dtypes(cfg: Config) -> dict:
    """Where gradients are summed (over micro-steps) and reduced (over ranks) in bf16 runs: fp32 unless
    deepspeed.fp32_grads is off. ZeRO-1 then runs DeepSpeed's BF16_Optimizer (an fp32 gradient per
    parameter), ZeRO-2/3 accumulate their partition in fp32, and the all-reduce / reduce-scatter moves fp32."""
    if precision(cfg) != "bf16" or not cfg.deepspeed.fp32_grads or cfg.deepspeed.zero_stage == 0:
        return {}  # ZeRO-0: DeepSpeed has no fp32 accumulation for bf16 weights without ZeRO
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def lr_at(step: int, cfg: Config, schedule: Schedule | None = None) -> float:
    """Linear warm-up to the schedule's lr over warmup_steps, then cosine decay to train.min_lr_ratio * lr at
    max_steps. schedule: train.* (default) or finetune.* (lr, warmup_steps, max_steps)."""
    t, floor = schedule or cfg.train, cfg.train.min_lr_ratio
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on 2-D weights (matmuls, embeddings) only, not on biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def optimizer(model: nn.Module, cfg: Config, schedule: Schedule | None = None) -> torch.optim.Optimizer:
    """AdamW with train.betas and eps, the schedule's (train.* or finetune.*) lr and weight decay."""
    t, s = cfg.train, schedule or cfg.train
    groups = param_groups(model, s.weight_decay)
    if cfg.deepspeed.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=s.lr, betas=tuple(t.betas), eps=t.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=s.lr, betas=tuple(t.betas), eps=t.eps, fused=cfg.cluster.use_gpu)


def initialize(cfg: Config, world_size: int, load_universal: bool = False, model: nn.Module | None = None,
               batch: Batch | None = None, schedule: Schedule | None = None):
    """The DeepSpeed engine around `model`, by default a freshly initialised GPT (seeded by run.seed), for
    `batch` and `schedule` (default: pretraining's, batch.* and train.*).
    engine.gpt_params: the parameters without the position embedding (as FLOPs count them), counted
    here because ZeRO-3 partitions them in deepspeed.initialize (numel() 0 afterwards)."""
    import deepspeed

    if model is None:
        torch.manual_seed(cfg.run.seed)
        model = GPT(gpt_config(cfg))
        model.activation_checkpointing = cfg.deepspeed.activation_checkpointing
    n_params = sum(p.numel() for p in model.parameters()) - model.config.block_size * model.config.n_embd
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer(model, cfg, schedule),
                                           config=deepspeed_config(cfg, world_size, load_universal, batch))
    engine.gpt_params = n_params
    if cfg.deepspeed.compile:
        engine.compile()
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def init_distributed(use_gpu: bool, **kwargs) -> None:
    """torch.distributed through DeepSpeed: nccl on GPUs, gloo on CPUs. On CPUs DeepSpeed would also
    JIT-compile its shared-memory all-reduce (deepspeed_shm_comm) behind a lock file in
    ~/.cache/torch_extensions; a process killed while compiling leaves that lock behind and every later
    run on the machine then waits on it forever. gloo's all-reduce serves CPU runs, so it is switched off."""
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps this one dict
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", **kwargs)


def local_process_group(use_gpu: bool) -> None:
    """This process alone as the whole world (tests, bench/gpu.py): no Ray Train, no launcher."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:  # a free port, passed explicitly: the environment (which children inherit) stays as it was
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(use_gpu, auto_mpi_discovery=False, verbose=False, init_method=f"tcp://127.0.0.1:{port}",
                     rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # the engine insists on it (device index); 0 in a world of one


# --- the training step --------------------------------------------------------------------------------
Targets = torch.Tensor | dict[str, torch.Tensor]  # next tokens (B, T), or labels per task head

def train_step(engine, batches: Iterable[tuple[torch.Tensor, Targets]], device: torch.device,
               max_loss: float | None = None,
               fault: float | None = None) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """One optimizer step over this rank's micro-batches (CPU tensors: inputs (B, T) and targets, (B, T) for
    the LM or {head: labels} for task heads), unless it is bad.
    Returns the sum of the micro-batch losses over all ranks and the gradient norm (None where DeepSpeed reports
    none), both as they are, on the device where they are tensors: reading them (float()) waits for the step
    to finish, which the caller does when it logs (train/loop.py, every train.log_interval steps). The
    forward returns no logits with targets, so none are held through backward.

    A bad step, one whose loss is not finite on some rank, or whose loss sum is above max_loss (a spike: a
    float32 value, train/loop.py's spike check), is not applied on any rank. The losses are summed over the
    ranks before the last backward pass, so every rank sees the same sum; where it is bad, each
    rank scales its last loss by NaN (1 otherwise: the same bits), all gradients turn NaN, and the optimizer
    discards the step on its own overflow check (DeepSpeed's ZeRO 1-3 and bf16 optimizers skip a step whose
    gradient norm is not finite, and clear their buffers) -- all queued on the device, without a wait. A
    non-finite gradient norm with a finite loss is discarded the same way. ZeRO-0 in fp32 steps torch's AdamW,
    which has no such check: there the gradient norm is read (a wait) and a non-finite one leaves AdamW out of
    the step. fault: multiply this rank's losses by it (fault injection, train/faults.py: NaN, or a spike)."""
    import torch.distributed as dist

    accum = engine.gradient_accumulation_steps()
    loss_sum = torch.zeros((), device=device)
    grad_norm = None
    for micro, (x, y) in enumerate(on_device(batches, device)):
        loss = engine(x, y)[1]
        if fault is not None:
            loss = loss * fault
        loss_sum += loss.detach().float()
        if micro == accum - 1:
            dist.all_reduce(loss_sum)  # queued on the device: no wait here
            # a host float against the float32 sum, on the device; NaN and inf are never <= a finite bound
            good = torch.isfinite(loss_sum) if max_loss is None else loss_sum <= max_loss
            loss = loss * torch.where(good, 1.0, float("nan")).to(loss.dtype)
        engine.backward(loss)
        if micro == accum - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = _grad_norm(engine.module)  # ZeRO-0 does not report it; gradients are reduced now
        if grad_norm is not None and not hasattr(engine.optimizer, "overflow") and not math.isfinite(grad_norm):
            _step_without_update(engine)
        else:
            engine.step()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    if isinstance(grad_norm, torch.Tensor):  # a copy: DeepSpeed may reuse its tensor in the next step
        grad_norm = grad_norm.detach().float().clone()
    return loss_sum, grad_norm


def _step_without_update(engine) -> None:
    """engine.step() with the optimizer's update left out, for an optimizer without DeepSpeed's overflow check
    (torch's AdamW under ZeRO-0): the engine still counts the step and clears the gradients."""
    optimizer = engine.optimizer
    optimizer.step = lambda *args, **kwargs: None  # on this instance, for this call only
    try:
        engine.step()
    finally:
        del optimizer.step


def on_device(batches: Iterable[tuple[Targets, ...]], device: torch.device) -> Iterator[tuple[Targets, ...]]:
    """The batches on the device. On a GPU each is pinned and its copy queued one batch ahead
    (non_blocking from pinned memory does not wait), so the next batch is on its way while the current
    one computes; on a CPU they pass through."""
    if device.type != "cuda":
        yield from batches
        return
    ahead = None
    for batch in batches:
        nxt = tuple(_to(t, device) for t in batch)
        if ahead is not None:
            yield ahead
        ahead = nxt
    if ahead is not None:
        yield ahead


def _to(t: Targets, device: torch.device) -> Targets:
    if isinstance(t, dict):
        return {k: _to(v, device) for k, v in t.items()}
    return t.pin_memory().to(device, non_blocking=True)


def _grad_norm(model: nn.Module) -> torch.Tensor | float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0


# --- FLOPs and MFU ---------------------------------------------------------------------------------
# Peak dense bf16 tensor-core FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12,
    "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,  # V100: fp16 (no bf16)
}


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N for the weights (forward + backward) plus
    12 * L * H * Q * T for attention scores and values, with N the parameters without the position
    embedding, L layers, H heads of size Q, T the sequence length."""
    head = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head * seq_len


def mfu(engine, cfg: Config, step_time: float, peak: float | None, world: int) -> float | None:
    """Model FLOPs utilisation of one pretraining step (None without a peak figure for the device)."""
    if not peak:
        return None
    per_step = flops_per_token(engine.module.config, cfg.batch.seq_len, engine.gpt_params) * cfg.batch.tokens_per_step
    return per_step / step_time / (peak * world)


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where we have no reliable figure (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None
