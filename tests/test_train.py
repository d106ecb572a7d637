"""The trainer: DeepSpeed ZeRO 1-3 on two Ray Train workers against a plain PyTorch loop, exact resume
after a real SIGKILL, resume on fewer workers, crash-safe checkpoints, and the loader's coverage."""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch
from conftest import run_cli, tiny_config
from safetensors.torch import load_file

from pipeline.core.config import load_config
from pipeline.core.tracking import read_jsonl
from train import checkpoint, launch
from train.data import SequenceOrder, ShardLoader
from train.engine import deepspeed_config, flops_per_token, lr_at, peak_flops
from train.model import GPT, GPTConfig


def losses(run_dir) -> dict[int, list[float]]:
    """Every logged training loss by step (a step run again after a restart appears twice)."""
    out: dict[int, list[float]] = {}
    for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "train/loss" in record:
            out.setdefault(record["step"], []).append(record["train/loss"])
    return out


def final_weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoint.latest(cfg.checkpoint_dir), "model.safetensors"))


def reference_run(cfg, steps: int) -> list[float]:
    """A plain PyTorch loop in one process: the same model init and data, AdamW with decay on 2-D
    weights only, accumulation over the whole global batch, clipping, warm-up then cosine."""
    t, m, b = cfg.train, cfg.model, cfg.batch
    torch.manual_seed(cfg.run.seed)
    model = GPT(GPTConfig(**m.model_dump()))
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    loader = ShardLoader(cfg.data_dir, b.seq_len, cfg.run.seed)
    per_step = b.tokens_per_step // b.seq_len
    out = []
    for step in range(steps):
        if step < t.warmup_steps:
            lr = t.lr * (step + 1) / t.warmup_steps
        else:
            progress = (step - t.warmup_steps) / (t.max_steps - t.warmup_steps)
            lr = t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = loader.sequences(step * per_step, per_step)
        total = 0.0
        for i in range(0, per_step, b.micro_batch_size):
            _, loss = model(x[i:i + b.micro_batch_size], y[i:i + b.micro_batch_size])
            (loss * b.micro_batch_size / per_step).backward()
            total += loss.item() * b.micro_batch_size / per_step
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad()
        out.append(total)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_workers_with_zero_stage_match_a_plain_pytorch_loop_and_the_loss_falls(stage, tmp_path, builtin_dataset):
    cfg = tiny_config(tmp_path, builtin_dataset, f"deepspeed.zero_stage={stage}", "train.max_steps=10")
    result = launch.run(cfg)
    ours = [v[0] for _, v in sorted(losses(cfg.run_dir).items())]
    reference = reference_run(cfg.with_absolute_paths(), 10)
    assert len(ours) == 10 and result.step == 10
    assert ours == pytest.approx(reference, rel=2e-5, abs=0)
    assert ours[-1] < ours[0] - 1.0  # from ln(50257) = 10.8 towards the corpus' entropy


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, builtin_dataset):
    """16 steps on two ZeRO-2 workers, checkpoints every 4: the run the others must reproduce."""
    cfg = tiny_config(tmp_path_factory.mktemp("uninterrupted"), builtin_dataset,
                      "train.max_steps=16", "deepspeed.zero_stage=2")
    launch.run(cfg)
    return cfg


def kill_a_worker_after(metrics_file: str, step: int, killed: list, timeout: float = 300) -> None:
    """SIGKILL one Ray Train worker process once `step` has been logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics_file) and any(r.get("step", 0) >= step for r in read_jsonl(metrics_file)):
            workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            if workers:
                victim = max(workers, key=lambda p: p.pid)
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_repeats_identical_losses(uninterrupted, tmp_path, builtin_dataset):
    cfg = tiny_config(tmp_path, builtin_dataset, "train.max_steps=16", "deepspeed.zero_stage=2",
                      "cluster.max_failures=2")
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after, args=(cfg.metrics_file, 9, killed))
    killer.start()
    launch.run(cfg)
    killer.join()
    assert killed, "no worker was killed"

    expected, got = losses(uninterrupted.run_dir), losses(cfg.run_dir)
    assert sorted(got) == list(range(1, 17))
    assert any(len(v) > 1 for v in got.values()), "no step was repeated: the run did not restart"
    for step, values in got.items():  # bitwise: fp32 on CPU, same data, same state
        assert all(v == expected[step][0] for v in values), (step, values, expected[step])
    a, b = final_weights(uninterrupted), final_weights(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_on_one_worker_after_two_continues_at_the_same_sequence(uninterrupted, tmp_path, builtin_dataset):
    cfg = tiny_config(tmp_path, builtin_dataset, "train.max_steps=16", "deepspeed.zero_stage=2")
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after, args=(cfg.metrics_file, 6, killed))
    killer.start()
    with pytest.raises(launch.TrainingFailed, match="--resume"):
        launch.run(cfg)  # max_failures=0: the kill ends the run
    killer.join()
    with pytest.raises(checkpoint.CheckpointError, match="--resume"):
        launch.run(cfg)
    resumed_from = checkpoint.TrainerState.read(checkpoint.latest(cfg.checkpoint_dir))
    assert resumed_from.world_size == 2 and 4 <= resumed_from.step < 16
    one = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"num_workers": 1})})
    launch.run(one, resume=True)

    expected, got = losses(uninterrupted.run_dir), losses(cfg.run_dir)
    for step in range(1, 17):  # summation order differs with one worker: equal to float precision
        assert got[step][-1] == pytest.approx(expected[step][0], rel=1e-5)
    final = checkpoint.TrainerState.read(checkpoint.latest(cfg.checkpoint_dir))
    assert final.world_size == 1 and final.sequences == checkpoint.TrainerState.read(
        checkpoint.latest(uninterrupted.checkpoint_dir)).sequences
    a, b = final_weights(uninterrupted), final_weights(cfg)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(uninterrupted, tmp_path, builtin_dataset):
    cfg = tiny_config(tmp_path, builtin_dataset, "train.max_steps=16", "deepspeed.zero_stage=2")
    shutil.copytree(uninterrupted.checkpoint_dir, cfg.checkpoint_dir)
    shutil.copy(uninterrupted.metrics_file, cfg.metrics_file)
    # what a crash in the middle of saving step 16 leaves: files written, no commit, pointer unchanged
    torn = os.path.join(cfg.checkpoint_dir, "step_00000016")
    os.remove(os.path.join(torn, checkpoint.STATE))
    with open(os.path.join(torn, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(cfg.checkpoint_dir, checkpoint.LATEST), "w") as f:
        f.write("step_00000012")
    assert checkpoint.latest(cfg.checkpoint_dir).endswith("step_00000012")

    launch.run(cfg, resume=True)  # loads step 12 and redoes 13-16
    got, expected = losses(cfg.run_dir), losses(uninterrupted.run_dir)
    assert [v[-1] for _, v in sorted(got.items())] == [v[0] for _, v in sorted(expected.items())]
    assert checkpoint.committed(cfg.checkpoint_dir) == ["step_00000008", "step_00000012", "step_00000016"]
    a, b = final_weights(uninterrupted), final_weights(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_cli_refuses_to_overwrite_a_run_and_names_missing_data(uninterrupted, tmp_path):
    proc = run_cli("train/run.py", f"run.root={uninterrupted.run.root}",
                   f"tokenization.output={uninterrupted.data_dir}", check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr and "--resume" in proc.stderr
    proc = run_cli("train/run.py", f"run.root={tmp_path}", "--data", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "no manifest" in proc.stderr and str(tmp_path / "nothing") in proc.stderr


# --- the loader ----------------------------------------------------------------------------------------

def epoch_windows(order: SequenceOrder, epoch: int) -> set[tuple[int, int]]:
    """Every (shard, first token) window of an epoch, enumerated from the layout's offsets."""
    layout = order.layout(epoch)
    return {(s, int(layout.offsets[s]) + w * order.seq_len)
            for s in range(len(order.shard_tokens))
            for w in range((order.shard_tokens[s] - 1 - int(layout.offsets[s])) // order.seq_len)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_never_overlap_and_an_epoch_covers_every_sequence_once(world):
    order = SequenceOrder([5000, 1234, 777, 4096], seq_len=64, seed=7)
    per_rank, size = 6, order.epoch_size(0)
    seen = []
    for consumed in range(0, size - size % (per_rank * world), per_rank * world):  # whole global batches
        for rank in range(world):
            first = consumed + rank * per_rank
            seen += [order.locate(first + i)[1:] for i in range(per_rank)]
    assert len(seen) == len(set(seen))  # no sequence twice, across ranks and steps
    tail = [order.locate(i)[1:] for i in range(len(seen), size)]
    assert set(seen) | set(tail) == epoch_windows(order, 0) and len(seen) + len(tail) == size
    second = [order.locate(size + i) for i in range(order.epoch_size(1))]
    assert {e for e, _, _ in second} == {1} and {(s, t) for _, s, t in second} == epoch_windows(order, 1)
    assert [t for _, _, t in second[:20]] != [order.locate(i)[2] for i in range(20)]  # reshuffled


@pytest.mark.slow
def test_any_world_size_reads_the_same_global_batch(builtin_dataset):
    loader = ShardLoader(str(builtin_dataset), seq_len=64, seed=3)
    whole_x, whole_y = loader.sequences(48, 24)
    for world in (1, 2, 3, 4):
        parts = [loader.micro_batch(48, 24, rank, world, micro, 24 // world // 2)
                 for rank in range(world) for micro in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)
    assert torch.equal(whole_x[:, 1:], whole_y[:, :-1])


# --- configuration derived for DeepSpeed, the schedule, FLOPs ---------------------------------------------

def test_deepspeed_config_is_derived_from_ours():
    cfg = load_config("gpt2-124m")
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 512 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    assert deepspeed_config(cfg, world_size=2)["gradient_accumulation_steps"] == 4
    big = deepspeed_config(load_config("gpt2-1558m", ["deepspeed.offload_optimizer=true",
                                                      "deepspeed.offload_params=true", "train.grad_clip=0"]), 8)
    assert big["zero_optimization"]["offload_param"]["device"] == "cpu" and big["gradient_clipping"] == 0.0
    assert big["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert not deepspeed_config(load_config("smoke"), 1)["bf16"]["enabled"]
    with pytest.raises(ValueError, match="does not divide over 3 workers"):
        deepspeed_config(cfg, world_size=3)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = load_config("gpt2-124m")
    assert lr_at(0, cfg) == pytest.approx(6e-4 / 715)
    assert lr_at(714, cfg) == pytest.approx(6e-4)
    assert lr_at(715 + (19073 - 715) // 2, cfg) == pytest.approx(6e-4 * 0.55, rel=1e-4)
    assert lr_at(19073, cfg) == pytest.approx(6e-5) and lr_at(30000, cfg) == pytest.approx(6e-5)
    after = [lr_at(s, cfg) for s in range(715, 19073, 100)]
    assert after == sorted(after, reverse=True)


def test_flops_per_token_is_palms_formula_and_cpus_report_no_mfu():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    n = model.num_params(embeddings=False)
    assert n == model.num_params() - 1024 * 768
    assert flops_per_token(model.config, 1024, n) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert peak_flops(torch.device("cpu")) is None
