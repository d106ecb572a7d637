"""The loss heads of model.loss_impl give the same loss and gradients: ours (chunked, any device) and
Liger-Kernel's fused linear cross-entropy (liger, Triton: CUDA only), both against the plain
computation on full logits (F.cross_entropy). On a CPU only the chunked head runs (tests/test_model.py
tests it further); the GPU tests run on a GPU lease: `python -m pytest tests/test_loss_heads.py`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model import full_logits_loss, grads

from pipeline.core.model.gpt2 import GPT, GPTConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (Liger-Kernel's loss is Triton kernels): runs on a GPU lease")
SMALL = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64)


def model_and_batch(device: str, dtype: torch.dtype, impl: str, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(SMALL, loss_impl=impl)).to(device, dtype)
    model.lm_head.chunk_rows = 48  # 4 x 64 rows: several chunks
    idx = torch.randint(0, 50257, (4, 64), device=device)
    targets = torch.randint(0, 50257, (4, 64), device=device)
    targets[0, :9] = -1  # ignored positions add nothing and do not count in the mean
    return model, idx, targets


def compare(device: str, dtype: torch.dtype, impl: str) -> tuple[float, float]:
    """|loss difference| and the largest gradient difference relative to that gradient's largest entry,
    of `impl` against full logits in fp32, on the same weights."""
    model, idx, targets = model_and_batch(device, dtype, impl)
    loss = model(idx, targets)[1]
    ours = grads(model, loss * 3)  # a non-unit upstream gradient
    plain = full_logits_loss(model, idx, targets)
    reference = grads(model, plain * 3)
    worst = max(float((ours[k].float() - reference[k].float()).abs().max() / reference[k].float().abs().max().clamp(min=1e-12))
                for k in reference)
    assert loss.dtype == torch.float32
    return abs(loss.item() - plain.item()), worst


def test_the_chunked_head_equals_full_logits_on_the_cpu():
    loss_diff, grad_diff = compare("cpu", torch.float32, "chunked")
    assert loss_diff < 1e-5 and grad_diff < 1e-4, (loss_diff, grad_diff)


@CUDA
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_each_head_equals_full_logits_on_the_gpu_in_fp32(impl):
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (shared/gpu-wheels has it)")
    torch.backends.cuda.matmul.allow_tf32 = False
    loss_diff, grad_diff = compare("cuda", torch.float32, impl)
    assert loss_diff < 1e-5 and grad_diff < 1e-4, (loss_diff, grad_diff)


@CUDA
def test_liger_equals_chunked_in_bf16_as_training_runs_them():
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (shared/gpu-wheels has it)")
    out = {}
    for impl in ("chunked", "liger"):
        model, idx, targets = model_and_batch("cuda", torch.bfloat16, impl)
        loss = model(idx, targets)[1]
        out[impl] = loss.item(), grads(model, loss)
    (a, ga), (b, gb) = out["chunked"], out["liger"]
    assert abs(a - b) < 1e-2 * abs(a), (a, b)  # bf16 logits: 8 bits of mantissa either way
    for name in ga:
        scale = ga[name].float().abs().max()
        assert (ga[name].float() - gb[name].float()).abs().max() <= 0.05 * scale, name


@CUDA
def test_liger_under_the_trainer_step_gives_the_losses_of_chunked():
    """Three optimizer steps through the trainer's engine (DeepSpeed ZeRO-1, bf16, fp32 gradients):
    the losses of the two heads stay within bf16's precision of each other."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (shared/gpu-wheels has it)")
    pytest.importorskip("deepspeed")
    from pipeline.core.config import load_config
    from train import engine as engines

    engines.local_process_group(use_gpu=True)
    device = torch.device("cuda")
    losses = {}
    for impl in ("chunked", "liger"):
        cfg = load_config("smoke", ["cluster.use_gpu=true", "deepspeed.precision=bf16", f"model.loss_impl={impl}",
                                    "train.warmup_steps=0"])
        engine = engines.initialize(cfg, world_size=1)
        g = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(3):
            seq = torch.randint(0, 50257, (cfg.batch.micro_batch_size, cfg.batch.seq_len + 1), generator=g)
            batches = [(seq[:, :-1], seq[:, 1:])] * engine.gradient_accumulation_steps()
            steps.append(engines.train_step(engine, batches, device)[0].item())
        losses[impl] = steps
    for a, b in zip(losses["chunked"], losses["liger"]):
        assert abs(a - b) < 2e-2 * abs(a), losses
