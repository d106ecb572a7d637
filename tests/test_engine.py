"""The training step in one process (no Ray): MFU under ZeRO-3, bf16 with fp32 gradients across ZeRO
stages against an fp32 reference, the GPU-side settings derived for DeepSpeed."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import REPO, run_tree

from pipeline.core.config import load_config
from pipeline.core.model.gpt2 import GPT
from train import engine as engines


@pytest.fixture(scope="module")
def process_group():
    engines.local_process_group(use_gpu=False)


def tiny(*overrides: str):
    """2 layers x 64 wide, 4 micro-batches of 4 x 32 tokens per step (gradient accumulation 4)."""
    return load_config("smoke", ["batch.seq_len=32", "batch.micro_batch_size=4", "batch.tokens_per_step=512",
                                 "train.warmup_steps=0", "train.lr=1e-3", *overrides])


def accum(cfg) -> int:
    return cfg.batch.tokens_per_step // (cfg.batch.micro_batch_size * cfg.batch.seq_len)


def batches(cfg, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    b = cfg.batch
    out = []
    for _ in range(accum(cfg)):
        seq = torch.randint(0, 50257, (b.micro_batch_size, b.seq_len + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def run(cfg, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of `steps` optimizer steps through the trainer's step code, and the final fp32 weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine = engines.initialize(cfg, world_size=1)
    losses = []
    for step in range(steps):
        engines.set_lr(engine, engines.lr_at(step, cfg))
        loss_sum, _ = engines.train_step(engine, batches(cfg, step), torch.device("cpu"))
        losses.append(loss_sum.item() / accum(cfg))
    weights = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    return losses, weights


def test_a_compile_lock_left_by_a_killed_process_does_not_hang_training_on_cpu(tmp_path):
    # DeepSpeed's CPU all-reduce is JIT-compiled behind this lock; one left behind hung every later run
    lock = tmp_path / "deepspeed_shm_comm" / "lock"  # where torch builds it under TORCH_EXTENSIONS_DIR
    lock.parent.mkdir(parents=True)
    lock.touch()
    code = ("from test_engine import batches, tiny; from train import engine as e; e.local_process_group(False); "
            "cfg = tiny(); print('LOSS', e.train_step(e.initialize(cfg, 1), batches(cfg, 0), __import__('torch').device('cpu'))[0].item())")
    proc = run_tree([sys.executable, "-c", code], 120, cwd=REPO,
                    env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert proc.returncode == 0 and "LOSS" in proc.stdout, proc.stderr[-3000:]
    assert sorted(tmp_path.rglob("*")) == [lock.parent, lock]  # nothing was built


def test_bf16_runs_sum_and_reduce_gradients_in_fp32_by_default():
    ds = engines.deepspeed_config(load_config("gpt2-124m"), world_size=8)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    off = engines.deepspeed_config(load_config("gpt2-124m", ["deepspeed.fp32_grads=false"]), world_size=8)
    assert "data_types" not in off and "communication_data_type" not in off
    assert "data_types" not in engines.deepspeed_config(load_config("smoke"), world_size=1)  # fp32 runs


def test_zero3_reports_the_mfu_of_zero1_for_the_same_model_and_step_time(process_group):
    zero1 = engines.initialize(tiny("deepspeed.zero_stage=1"), world_size=1)
    zero3 = engines.initialize(tiny("deepspeed.zero_stage=3"), world_size=1)
    with torch.device("meta"):
        n = GPT(zero1.module.config).num_params(embeddings=False)
    assert zero3.module.num_params(embeddings=False) < n / 100  # the bug: partitioned parameters count 0
    cfg = tiny()
    expected = engines.flops_per_token(zero1.module.config, 32, n) * 512 / 0.5 / 989e12
    for engine in (zero1, zero3):
        assert engines.mfu(engine, cfg, step_time=0.5, peak=989e12, world=1) == pytest.approx(expected, rel=1e-12)
    assert engines.mfu(zero1, cfg, 0.5, None, 1) is None


def distance(a: dict, b: dict) -> float:
    return float(torch.cat([(a[n] - b[n]).flatten() for n in a]).norm())


@pytest.mark.slow
def test_bf16_with_fp32_gradients_agrees_across_zero_stages_and_with_fp32(process_group):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    fp32 = tiny("deepspeed.zero_stage=1", "deepspeed.precision=fp32")
    initial = run(fp32, 0)[1]
    reference, ref_weights = run(fp32, 3)
    update = distance(ref_weights, initial)  # how far 3 fp32 steps move the weights
    results = {stage: run(tiny(f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16"), 3) for stage in (1, 2, 3)}
    # gpt2-1558m's combination: ZeRO-3 with activation checkpointing (the tied head gathered in its module)
    results["3+checkpointing"] = run(tiny("deepspeed.zero_stage=3", "deepspeed.precision=bf16",
                                          "deepspeed.activation_checkpointing=true"), 3)
    for stage, (losses, weights) in results.items():
        assert losses == pytest.approx(reference, rel=1e-3), stage  # bf16 forward, fp32 loss
        assert losses[-1] < losses[0], stage
        assert distance(weights, ref_weights) < 0.05 * update, stage  # measured: 2.3% (bf16 forward/backward)
        assert distance(weights, results[1][1]) < 0.01 * update, stage  # measured: 0 (ZeRO-2), 0.4% (ZeRO-3)
    engine = engines.initialize(tiny("deepspeed.zero_stage=1", "deepspeed.precision=bf16"), world_size=1)
    assert isinstance(engine.optimizer, BF16_Optimizer)  # ZeRO-1's fp32-gradient path, not bf16 sums


def test_only_the_keeping_rank_builds_the_full_fp32_copy_and_it_is_the_master_weights(process_group):
    from train.checkpoint import full_state_dict

    cfg = tiny("deepspeed.zero_stage=3")
    engine = engines.initialize(cfg, world_size=1)
    engines.train_step(engine, batches(cfg, 0), torch.device("cpu"))  # master weights move off the init
    kept, dropped = full_state_dict(engine, engine.module), full_state_dict(engine, engine.module, keep=False)
    assert dropped == {}
    assert set(kept) == {n for n, _ in engine.module.named_parameters()} | {"lm_head.weight"}
    torch.manual_seed(cfg.run.seed)
    initial = GPT(engine.module.config)
    assert (kept["transformer.h.0.mlp.c_fc.weight"] - initial.transformer.h[0].mlp.c_fc.weight).abs().max() > 1e-4
    assert kept["transformer.wte.weight"].shape == (50304, 64) and kept["lm_head.weight"] is kept["transformer.wte.weight"]


@pytest.mark.slow
def test_compiled_engine_gives_the_eager_losses_and_gradients(process_group):
    # deepspeed.compile=true: torch.compile (inductor; on CPU it builds C++ with gcc) inside the engine
    from deepspeed.utils import safe_get_full_grad

    results = []
    for compiled in (False, True):
        cfg = tiny("model.n_layer=1", "batch.tokens_per_step=128", f"deepspeed.compile={str(compiled).lower()}")
        engine = engines.initialize(cfg, world_size=1)
        assert engine.is_compiled == compiled
        x, y = batches(cfg, 0)[0]
        first = engine(x, y)[1]
        engine.backward(first)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()  # one micro-batch per step (no accumulation)
        loss_sum, _ = engines.train_step(engine, batches(cfg, 1), torch.device("cpu"))
        results.append((first.item(), grads, loss_sum.item()))
    (eager_loss, eager_grads, eager_next), (loss, grads, following) = results
    assert loss == pytest.approx(eager_loss, rel=1e-6) and following == pytest.approx(eager_next, rel=1e-5)
    for name, g in eager_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name


def test_the_loop_reads_losses_every_log_interval_yet_logs_every_step_and_checkpoints_the_steps_loss(
        process_group, monkeypatch, tmp_path):
    """train.log_interval=3 reads the losses off the device every 3 steps (and before a checkpoint or an
    evaluation), yet logs each step's own loss and grad norm, the same as reading every step; a
    checkpoint records the loss of its own step."""
    from pipeline.core.model.checkpoints import TrainerState
    from train import loop
    from train.diagnostics import Diagnostics
    from train.faults import Injector

    class Recipe(loop.Recipe):
        def batches(self, sequences, rank, world, micro):
            return batches(self.cfg, sequences)[micro]

        def evaluate(self, engine, step, last):
            return {"val/loss": 1.0} if step == 4 else {}

    class Metrics:
        def __init__(self):
            self.lines = []

        def log(self, metrics, step):
            self.lines.append((step, metrics))

    def trained(interval: int):
        cfg = tiny("train.max_steps=7", "checkpoint.interval=5", f"train.log_interval={interval}",
                   "batch.tokens_per_step=256")
        recipe = Recipe("train", cfg.train, engines.Batch.of(cfg), "", "", 5, "", "")
        recipe.cfg = cfg
        saved = []
        monkeypatch.setattr(loop.checkpoint, "save", lambda engine, module, d, state, *a, **k: saved.append(
            (state.step, state.loss)) or f"ckpt-{state.step}")
        state, metrics = TrainerState(world_size=1, zero_stage=1, manifest_sha256=""), Metrics()
        diagnostics = Diagnostics(cfg, recipe, 0, torch.device("cpu"), None, Injector(0, str(tmp_path), ""))
        with diagnostics.guard():
            urls = list(loop._train(cfg, recipe, engines.initialize(cfg, 1), state, metrics, 0, 1,
                                    torch.device("cpu"), diagnostics))
        return urls, saved, metrics.lines

    urls, saved, lines = trained(1)
    urls3, saved3, lines3 = trained(3)
    assert urls == urls3 == ["ckpt-5", "ckpt-7"]
    steps = [(s, "val/loss" in m) for s, m in lines3]
    assert steps == [(1, False), (2, False), (3, False), (4, False), (4, True), (5, False), (6, False), (7, False)]
    losses = {s: (m["train/loss"], m["train/grad_norm"]) for s, m in lines if "train/loss" in m}
    assert losses == {s: (m["train/loss"], m["train/grad_norm"]) for s, m in lines3 if "train/loss" in m}
    assert all(isinstance(v, float) for pair in losses.values() for v in pair)
    assert saved == saved3 == [(5, losses[5][0]), (7, losses[7][0])]
