"""A memory and cost plan of a training run, from its config alone: no Ray, no GPU, no weights.

Per GPU (one rank), for the configured precision, ZeRO stage, offload and micro-batch:
  weights, gradients, optimizer states     bytes per parameter by stage (DeepSpeed's layout)
  activations                               what autograd saves for backward, counted per layer
  head                                      the chunked loss: one chunk of fp32 logits and its gradient,
                                            plus the hidden-state and weight gradients it keeps
The activation counts are those of pipeline/core/model/gpt2.py as tests/test_plan.py measures them with saved-tensor
hooks: per layer 16 tensors of B x T x C (LayerNorm and attention inputs, q/k/v, attention output,
the MLP's 4C input and GELU output, ...) plus fp32 LayerNorm and attention statistics. Not counted:
the CUDA context and the caching allocator's fragmentation (1-3 GB on a GPU), DeepSpeed's bucket
buffers where ZeRO-2/3 use them (shown separately).

Time and cost are estimates: tokens/s per GPU = MFU x peak FLOP/s / FLOPs per token, with the MFU
measured by the GPU kit when one has been recorded (bench/gpu_measured.json: bench/gpu.py --measured
writes it, for GPT-2 124M at its preset's micro-batch on one H100), else assumed (45%: the project's
H100 target). Larger models reach a higher MFU than 124M, so for them a measured 124M figure is low.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.command import UserError
from pipeline.core.config import Config
from pipeline.core.model.gpt2 import Block
from train.engine import flops_per_token, gpt_config, precision

GIB = 2**30
ASSUMED_MFU = 0.45  # an assumption, used until the kit records a measured figure (MEASURED_MFU_FILE)
MEASURED_MFU_FILE = Path(__file__).resolve().parents[1] / "bench" / "gpu_measured.json"
H100_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM
USD_PER_GPU_HOUR = 3.0  # an example price, as in infra/README.md
GPU_MEMORY_GIB = 79.0  # what an H100 80GB reports to PyTorch
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket, in elements


def mfu_in_force(path: Path = MEASURED_MFU_FILE) -> tuple[float, str]:
    """The MFU the plan uses and where it comes from: the kit's measured figure if recorded, else assumed."""
    try:
        m = json.loads(path.read_text())
        return float(m["mfu"]), f"measured MFU {m['mfu']:.1%} ({m['device']}, {m['date']}, {path.name})"
    except FileNotFoundError:
        return ASSUMED_MFU, f"assumed MFU {ASSUMED_MFU:.0%}, not measured"


class PlanError(UserError, ValueError):
    """A run that does not fit its GPUs; the message gives the numbers."""


@dataclass
class Plan:
    rows: dict[str, float]  # bytes per GPU, by component (what the configured run holds)
    activations_plain: float  # bytes per GPU without activation checkpointing
    activations_checkpointed: float  # and with it
    gpu_memory: float  # bytes
    n_params: int
    tokens_per_step: int
    steps: int
    flops_per_token: float
    tokens_per_s_per_gpu: float  # estimate
    gpus: int
    usd_per_gpu_hour: float
    on_gpu: bool = True
    mfu_source: str = ""  # where the MFU behind tokens_per_s_per_gpu comes from  # cluster.use_gpu: a CPU run's limit is the host's memory, not checked here

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def hours(self) -> float:
        return self.tokens_per_step * self.steps / (self.tokens_per_s_per_gpu * self.gpus) / 3600

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def report(self, name: str) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        unit = "GPU" if self.on_gpu else "worker"
        lines = [f"plan for {name}: {self.n_params / 1e6:.1f}M parameters, {self.gpus} {unit}(s), per {unit}:"]
        lines += [f"  {k:<34}{g(v)}" for k, v in self.rows.items()]
        limit = (f"of {g(self.gpu_memory)} ({'fits' if self.fits else 'DOES NOT FIT'})" if self.on_gpu
                 else "(a CPU run: the limit is the host's memory)")
        lines += [f"  {'total':<34}{g(self.total)}  {limit}",
                  f"  activations without / with activation checkpointing: {g(self.activations_plain)} / "
                  f"{g(self.activations_checkpointed)}",
                  "  not counted: CUDA context and allocator fragmentation (1-3 GiB)",
                  f"run: {self.tokens_per_step:,} tokens/step x {self.steps:,} steps = "
                  f"{self.tokens_per_step * self.steps / 1e9:.2f}B tokens; {self.flops_per_token / 1e9:.2f} GFLOP/token",
                  f"  ESTIMATE ({self.mfu_source}): {self.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
                  f"{self.hours:.1f} h on {self.gpus} GPU(s), {self.hours * self.gpus:.0f} GPU-hours, "
                  f"${self.hours * self.gpus * self.usd_per_gpu_hour:,.0f} at ${self.usd_per_gpu_hour:.2f}/GPU-hour"]
        return "\n".join(lines)


def activation_bytes(cfg: Config, checkpointing: bool) -> float:
    """Bytes autograd keeps for backward at the end of the forward pass (one micro-batch, one rank)."""
    m, b = cfg.model, cfg.batch
    e = 2 if precision(cfg) == "bf16" else 4
    n = b.micro_batch_size * b.seq_len  # tokens
    layer = n * (16 * m.n_embd * e + 16 + 4 * m.n_head)  # 16 tensors of (n, C); LN mean/rstd, attention lse
    embed = n * 8 * 2  # token and position indices (int64)
    if checkpointing:  # each block keeps its input; backward recomputes one block at a time
        return m.n_layer * n * m.n_embd * e + layer + embed
    return m.n_layer * layer + embed


def head_saved_bytes(cfg: Config) -> float:
    """What the chunked loss keeps for backward: ln_f's input and the gradient of x in the model's dtype,
    ln_f's fp32 mean and rstd per token, the gradient of W in fp32."""
    m, b = cfg.model, cfg.batch
    e = 2 if precision(cfg) == "bf16" else 4
    n = b.micro_batch_size * b.seq_len
    return n * (m.n_embd * (e + e) + 8) + gpt_config(cfg).padded_vocab_size * m.n_embd * 4


def head_bytes(cfg: Config) -> float:
    """The chunked loss (pipeline/core/model/gpt2.py LMHead): the gradients it keeps for backward (hidden states in
    the model's dtype, the weight's in fp32) and, at its peak, one chunk of fp32 logits with the
    low-precision copies around it. Liger's (model.loss_impl=liger) keeps the same gradients; its chunk is
    smaller and in the model's dtype (an estimate from its chunking rule: the kit measures it)."""
    m, b = cfg.model, cfg.batch
    e = 2 if precision(cfg) == "bf16" else 4
    n = b.micro_batch_size * b.seq_len
    vocab = gpt_config(cfg).padded_vocab_size
    kept = head_saved_bytes(cfg)
    if m.loss_impl == "liger":  # its chunk: about n x C logits in all, in the model's dtype (rows a power of 2)
        rows = min(n, 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(m.vocab_size / m.n_embd)))))
        return kept + rows * m.vocab_size * e + n * 4
    rows = min(n, 4096)  # LMHead.chunk_rows
    chunk = rows * vocab * (4 + (e if e != 4 else 0)) + vocab * m.n_embd * e  # fp32 logits + a bf16 copy, W grad part
    return kept + chunk


def state_bytes(cfg: Config, n: int, world: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU, by ZeRO stage (DeepSpeed 0.19's layout)."""
    z = cfg.deepspeed
    bf16 = precision(cfg) == "bf16"
    e = 2 if bf16 else 4
    stage = z.zero_stage
    fp32_grads = bf16 and z.fp32_grads and stage >= 1
    weights = 0.0 if z.offload_params else (n * e / world if stage == 3 else n * e)
    if stage <= 1:  # the whole gradient on every rank; ZeRO-1 adds fp32 ones: BF16_Optimizer's (fp32_grads),
        # else the fp32 gradient of the rank's partition of the master weights
        grads = n * e + (n * 4 if fp32_grads else n * 4 / world if stage == 1 else 0)
    else:  # ZeRO-2/3 keep their partition, in the accumulation dtype
        grads = n * (4 if fp32_grads else e) / world
    master = 4 if bf16 or stage >= 1 else 0  # fp32 master weights (ZeRO >= 1 keeps an fp32 partition even for fp32)
    optim = n * (master + 8) / (world if stage >= 1 else 1)  # + Adam's two moments
    if z.offload_optimizer:
        optim = 0.0
    rows = {"weights": weights, "gradients": grads, "optimizer states (master + Adam)": optim}
    if stage >= 2:  # reduce bucket (ZeRO-2/3) and ZeRO-3's gathered layers, at DeepSpeed's defaults
        buffers = min(DS_BUCKET, n) * e
        if stage == 3:
            per_layer = 12 * cfg.model.n_embd ** 2 + 13 * cfg.model.n_embd
            buffers += 2 * per_layer * e + min(50_000_000, n) * e  # two live layers + the prefetch bucket
        rows["DeepSpeed buffers (estimate)"] = buffers
    return rows


def n_params(cfg: Config, embeddings: bool = True) -> int:
    """GPT.num_params of the configured model, from one block's count (shapes only), so a plan answers at
    once for any depth (building 100,000 blocks, even on the meta device, takes minutes)."""
    c = gpt_config(cfg)
    with torch.device("meta"):
        block = sum(p.numel() for p in Block(c).parameters())
    wpe = c.block_size * c.n_embd
    total = c.padded_vocab_size * c.n_embd + wpe + c.n_layer * block + 2 * c.n_embd  # tied head; final LayerNorm
    return total if embeddings else total - wpe


def plan(cfg: Config, gpu_memory_gib: float = GPU_MEMORY_GIB, mfu: float | None = None,
         peak: float = H100_PEAK, usd_per_gpu_hour: float = USD_PER_GPU_HOUR) -> Plan:
    """mfu: None for the one in force (mfu_in_force: measured if recorded, else assumed)."""
    mfu, source = mfu_in_force() if mfu is None else (mfu, f"MFU {mfu:.1%} as given")
    world = cfg.cluster.num_workers
    n = n_params(cfg)
    plain, ckpt = activation_bytes(cfg, False), activation_bytes(cfg, True)
    rows = state_bytes(cfg, n, world)
    rows["activations" + (" (checkpointed)" if cfg.deepspeed.activation_checkpointing else "")] = (
        ckpt if cfg.deepspeed.activation_checkpointing else plain)
    rows[f"loss head ({cfg.model.loss_impl})"] = head_bytes(cfg)
    fpt = flops_per_token(gpt_config(cfg), cfg.batch.seq_len, n_params(cfg, embeddings=False))
    return Plan(rows, plain, ckpt, gpu_memory_gib * GIB, n, cfg.batch.tokens_per_step, cfg.train.max_steps,
                fpt, mfu * peak / fpt, world, usd_per_gpu_hour, cfg.cluster.use_gpu, source)


def check(cfg: Config, name: str, **kwargs) -> Plan:
    """The plan, or PlanError when the run does not fit its GPUs (GPU runs only: a CPU run's limit is
    the host's memory, which the plan does not know)."""
    p = plan(cfg, **kwargs)
    if cfg.cluster.use_gpu and not p.fits:
        raise PlanError(f"{name} needs {p.total / GIB:.1f} GiB per GPU, more than the {p.gpu_memory / GIB:.0f} GiB "
                        f"it has:\n{p.report(name)}\nlower batch.micro_batch_size, raise deepspeed.zero_stage, "
                        f"or set deepspeed.activation_checkpointing=true")
    return p
