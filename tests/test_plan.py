"""The memory and cost planner (train/plan.py) against what autograd saves and what a training step
really holds at its peak, and its command line."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_cli

from pipeline.core.config import load_config
from pipeline.core.model.gpt2 import GPT
from train import plan
from train.engine import gpt_config

SMALL = ["model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=256", "batch.seq_len=256",
         "batch.micro_batch_size=8", "batch.tokens_per_step=2048"]


def saved_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of every tensor autograd saves for backward in one forward pass with the loss (parameters
    excluded), counted by storage so views are not counted twice."""
    torch.manual_seed(0)
    model = GPT(gpt_config(cfg)).to(dtype)
    model.activation_checkpointing = cfg.deepspeed.activation_checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    b = cfg.batch
    idx = torch.randint(0, cfg.model.vocab_size, (b.micro_batch_size, b.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_and_head_counts_equal_what_autograd_saves(precision, checkpointing):
    # a 4,000-word vocabulary (padded to 4,032): with GPT-2's 50,257 the head's weight gradient is 3/4 of the
    # total and hides an error of one (n, C) tensor in the rest (and bf16 takes a minute on a CPU)
    cfg = load_config("smoke", [*SMALL, "model.n_layer=2", "batch.micro_batch_size=2", "model.vocab_size=4000",
                                f"deepspeed.precision={precision}",
                                f"deepspeed.activation_checkpointing={str(checkpointing).lower()}"])
    measured = saved_bytes(cfg, torch.bfloat16 if precision == "bf16" else torch.float32)
    head_kept = plan.head_saved_bytes(cfg)  # the head's saved part (the rest of head_bytes is transient)
    layers = plan.activation_bytes(cfg, checkpointing)
    if checkpointing:  # the forward keeps each block's input; the block recomputed in backward comes later
        layers_of = lambda k: cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_layer": k})})  # noqa: E731
        layers -= plan.activation_bytes(layers_of(1), False) - plan.activation_bytes(layers_of(0), False)
    assert (layers + head_kept) == pytest.approx(measured, rel=0.005)  # 0.01-0.09% measured


PEAK = textwrap.dedent('''
    import sys, torch
    from pipeline.core.config import load_config
    from train import engine as engines
    from train.plan import plan

    def status(field):  # bytes, from the kernel's accounting of this process
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

    cfg = load_config("smoke", sys.argv[1:])
    engines.local_process_group(use_gpu=False)
    g = torch.Generator().manual_seed(0)
    def batches():
        b = cfg.batch
        s = torch.randint(0, 50257, (b.micro_batch_size, b.seq_len + 1), generator=g)
        return [(s[:, :-1], s[:, 1:])]
    before = status("VmRSS")
    engine = engines.initialize(cfg, 1)
    engines.train_step(engine, batches(), torch.device("cpu"))  # optimizer states now exist
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
    engines.train_step(engine, batches(), torch.device("cpu"))
    print("RESULT", status("VmHWM") - before, plan(cfg).total)
''')


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_is_within_15_percent_of_the_measured_peak_of_a_training_step(checkpointing, tmp_path):
    # The process's peak resident memory over one training step, less what it held before the engine
    # existed. glibc is told to mmap every allocation above 64 KiB, so freed tensors go back to the
    # kernel and the peak is what was alive at once, not what the allocator kept.
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    proc = run_cli(str(script), *SMALL, f"deepspeed.activation_checkpointing={str(checkpointing).lower()}",
                   env={"MALLOC_MMAP_THRESHOLD_": "65536", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"})
    measured, planned = map(float, next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()[1:])
    assert planned == pytest.approx(measured, rel=0.15), (measured / 2**20, planned / 2**20)


def test_plan_cli_prints_the_plan_without_ray_and_fails_a_run_that_does_not_fit():
    out = run_cli("train/run.py", "--config", "gpt2-124m", "--plan").stdout
    assert "fits" in out and "ESTIMATE" in out and "124.5M parameters" in out and "19,073 steps" in out
    bad = run_cli("pipeline/run.py", "--config", "gpt2-1558m", "deepspeed.activation_checkpointing=false",
                  "batch.micro_batch_size=64", "batch.tokens_per_step=4194304", "--plan", check=False)
    assert bad.returncode == 2 and "more than the 79 GiB" in bad.stderr and "ray" not in bad.stdout.lower()


def test_plan_adds_up_for_the_presets():
    p = plan.plan(load_config("gpt2-124m"))
    n = 124_475_904  # padded vocabulary (50,304 rows), tied head counted once
    assert p.n_params == n
    assert p.rows["weights"] == 2 * n and p.rows["gradients"] == 6 * n  # bf16 + BF16_Optimizer's fp32
    assert p.rows["optimizer states (master + Adam)"] == 12 * n / 8
    mfu = plan.mfu_in_force()[0]  # assumed 45% until bench/gpu_measured.json records a measured one
    assert p.hours == pytest.approx(2**19 * 19073 / (mfu * 989e12 / p.flops_per_token * 8) / 3600)
    z3 = plan.plan(load_config("gpt2-1558m"))
    assert z3.rows["weights"] == 2 * z3.n_params / 8 and "activations (checkpointed)" in z3.rows
    assert z3.activations_checkpointed < z3.activations_plain / 5


@pytest.mark.parametrize("name", ["smoke", "gpt2-124m", "gpt2-1558m"])
def test_the_parameter_count_is_the_models_own(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
    assert plan.n_params(cfg) == model.num_params()
    assert plan.n_params(cfg, embeddings=False) == model.num_params(embeddings=False)


def test_a_plan_for_any_depth_answers_without_building_the_model():
    cfg = load_config("gpt2-124m", ["model.n_layer=100000"])
    p = plan.plan(cfg)  # the 12-layer count plus 99,988 blocks of 7,087,872 parameters each
    assert p.n_params == 124_475_904 + 99_988 * 7_087_872
    proc = run_cli("train/run.py", "--config", "gpt2-124m", "model.n_layer=100000", "--plan", check=False, timeout=60)
    assert proc.returncode == 2 and "more than the 79 GiB" in proc.stderr  # it does not fit, and says so at once
def test_the_plan_uses_a_measured_mfu_once_the_kit_records_one(tmp_path):
    assert plan.mfu_in_force(tmp_path / "none.json") == (0.45, "assumed MFU 45%, not measured")
    (tmp_path / "m.json").write_text('{"mfu": 0.3, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07"}')
    mfu, source = plan.mfu_in_force(tmp_path / "m.json")
    assert mfu == 0.3 and "measured MFU 30.0% (NVIDIA H100 80GB HBM3, 2026-12-07" in source
    p = plan.plan(load_config("gpt2-124m"), mfu=0.3)
    assert p.tokens_per_s_per_gpu == pytest.approx(0.3 * 989e12 / p.flops_per_token)
    assert "ESTIMATE (MFU 30.0% as given)" in p.report("x")
    # 100% MFU of an H100 is about 1.16M tokens/s of GPT-2 124M at sequence 1024 (BENCHMARKS.md)
    assert 989e12 / p.flops_per_token == pytest.approx(1.157e6, rel=0.01)
