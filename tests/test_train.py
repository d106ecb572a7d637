"""The trainer: DeepSpeed ZeRO 1-3 on two Ray Train workers against a plain PyTorch loop, exact resume
after a real SIGKILL, resume on fewer workers, crash-safe checkpoints (these on a weighted mixture of two
sources, each rank's share of each checked), and the loader's coverage."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, killing_a_worker_after, run_cli, tiny_config, train_on_two_raylets, write_jsonl
from safetensors.torch import load_file

from eval import val_loss
from pipeline.core.command import UserError
from pipeline.core.config import load_config
from pipeline.core.model import checkpoints
from pipeline.core.model.gpt2 import GPT, GPTConfig
from pipeline.core.tracking import read_jsonl
from tokenization import shards
from train import faults, launch
from train.data import ORDER, SequenceOrder, ShardLoader, WindowPermutation
from train.engine import deepspeed_config, flops_per_token, lr_at, peak_flops
from train.mixture import Mixture


def losses(run_dir) -> dict[int, list[float]]:
    """Every logged training loss by step (a step redone after a restart replaces its first record)."""
    out: dict[int, list[float]] = {}
    for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "train/loss" in record:
            out.setdefault(record["step"], []).append(record["train/loss"])
    return out


def final_weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoints.latest(cfg.checkpoint_dir), "model.safetensors"))


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
    loader = ShardLoader(cfg.data_dir, b.seq_len, cfg.run.seed,
                         weights=Mixture(cfg, shards.load_manifest(cfg.data_dir), cfg.data_dir).weights)
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


# web, 40 times the size of books, drawn 4:1: books is up-sampled (2 epochs in 16 steps), web down-sampled
SOURCES = {"web": [41_000, 23_000], "books": [1_600]}
MIXTURE = "data.sources=[{name: web, input: web.jsonl, weight: 4}, {name: books, input: books.jsonl, weight: 1}]"


@pytest.fixture(scope="module")
def mixture_dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("mixture") / "data", SOURCES, seed=4, val={"web": 6_000, "books": 2_000})


def mixed_config(root: Path, data: Path, *overrides: str):
    """The uninterrupted run's config: 16 steps of two ZeRO-2 workers on the mixture, checkpoints every 4."""
    return tiny_config(root, data, "train.max_steps=16", "deepspeed.zero_stage=2", MIXTURE, *overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mixture_dataset):
    """The run the others must reproduce (after a kill, a hang, on one worker, from a damaged checkpoint)."""
    cfg = mixed_config(tmp_path_factory.mktemp("uninterrupted"), mixture_dataset)
    launch.run(cfg)
    return cfg


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_repeats_identical_losses(uninterrupted, tmp_path, mixture_dataset):
    cfg = mixed_config(tmp_path, mixture_dataset, "cluster.max_failures=2")
    with killing_a_worker_after(cfg.metrics_file, 9):
        launch.run(cfg)

    expected, got = losses(uninterrupted.run_dir), losses(cfg.run_dir)
    assert sorted(got) == list(range(1, 17))
    # the steps redone after the restart replaced their first record: one per step, equal bitwise (fp32 on CPU)
    assert all(values == expected[step] for step, values in got.items()), (got, expected)
    a, b = final_weights(uninterrupted), final_weights(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.cluster
def test_a_hung_rank_on_two_nodes_leaves_every_ranks_stacks_and_the_restarted_group_ends_like_an_uninterrupted_run(
        uninterrupted, tmp_path, mixture_dataset):
    overrides = ["train.max_steps=16", "deepspeed.zero_stage=2", MIXTURE, "cluster.max_failures=1",
                 "train.step_timeout_s=20"]
    # one worker on each raylet; rank 1 never starts step 15, rank 0 waits in its collective
    proc = train_on_two_raylets(tmp_path, mixture_dataset, *overrides, env={faults.ENV: "hang@15:rank=1"})
    assert proc.stdout.rstrip().endswith("NODES 2"), proc.stdout[-2000:]
    cfg = tiny_config(tmp_path, mixture_dataset, *overrides)
    folder = os.path.join(cfg.run_dir, "diagnostics")
    assert f"train: diagnostics in {folder}/: hang-step00000015-rank0.txt, hang-step00000015-rank1.txt" in (
        proc.stdout), proc.stdout[-3000:]
    stacks = {rank: open(os.path.join(folder, f"hang-step00000015-rank{rank}.txt")).read() for rank in (0, 1)}
    for rank, text in stacks.items():
        assert f"rank {rank} " in text and "at step 15 (last completed: 14)" in text and "in _train" in text
        assert "collective timeout: 2100 s" in text  # train.phase_timeout_s + 300, not Ray's default of 1800
    assert "in hang" in stacks[1] and "in train_step" in stacks[0]  # rank 0 got as far as the step's collectives

    # two nodes and a restart: bitwise the losses and weights of the uninterrupted run's two workers on one node
    expected, got = losses(uninterrupted.run_dir), losses(cfg.run_dir)
    assert sorted(got) == list(range(1, 17)) and all(values == expected[step] for step, values in got.items())
    a, b = final_weights(uninterrupted), final_weights(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_on_one_worker_after_two_continues_at_the_same_sequence(uninterrupted, tmp_path, mixture_dataset):
    cfg = mixed_config(tmp_path, mixture_dataset)
    with killing_a_worker_after(cfg.metrics_file, 6), pytest.raises(launch.TrainingFailed, match="--resume"):
        launch.run(cfg)  # max_failures=0: the kill ends the run
    with pytest.raises(checkpoints.CheckpointError, match="--resume"):
        launch.run(cfg)
    resumed_from = checkpoints.TrainerState.read(checkpoints.latest(cfg.checkpoint_dir))
    assert resumed_from.world_size == 2 and 4 <= resumed_from.step < 16
    one = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"num_workers": 1})})
    launch.run(one, resume=True)

    expected, got = losses(uninterrupted.run_dir), losses(cfg.run_dir)
    assert sorted(got) == list(range(1, 17)) and all(len(v) == 1 for v in got.values()), got  # one record a step
    for step in range(1, 17):  # summation order differs with one worker: equal to float precision
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-5)
    final = checkpoints.TrainerState.read(checkpoints.latest(cfg.checkpoint_dir))
    assert final.world_size == 1 and final.sequences == checkpoints.TrainerState.read(
        checkpoints.latest(uninterrupted.checkpoint_dir)).sequences
    a, b = final_weights(uninterrupted), final_weights(cfg)
    # The key projection's bias has no gradient in exact arithmetic (softmax ignores a constant added to every
    # score of a query), so its gradient is rounding noise, which Adam scales up to full-size steps: it differs
    # with any summation order (1.7e-4 seen on AMD EPYC, where every other weight agreed within 1e-6).
    n_embd = cfg.model.n_embd
    for k in a:
        if k.endswith("attn.c_attn.bias"):
            a[k], b[k] = torch.cat([a[k][:n_embd], a[k][2 * n_embd:]]), torch.cat([b[k][:n_embd], b[k][2 * n_embd:]])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.mark.slow
def test_a_mixture_run_trains_every_rank_on_its_share_of_each_source_as_a_plain_loop_reads_them(uninterrupted):
    cfg, steps, batch, world = uninterrupted, 16, 16, 2
    # the two workers trained on the loader's global batches, in order: a plain loop over them has their losses
    ours = [v[0] for _, v in sorted(losses(cfg.run_dir).items())]
    assert ours == pytest.approx(reference_run(cfg, steps), rel=2e-5, abs=0)

    # what each rank read: every sequence from one source (its tokens' range), the one the order names, and each
    # source's count within 5 binomial standard deviations of its weight (a hypergeometric's are smaller)
    loader = ShardLoader(cfg.data_dir, 64, cfg.run.seed, weights=[4, 1])
    q, per_rank = np.array([0.8, 0.2]), batch // world
    for rank in range(world):
        rows = torch.cat([loader.micro_batch(step * batch, batch, rank, world, micro, 4)[0]
                          for step in range(steps) for micro in range(per_rank // 4)])
        source = (rows // (50257 // 2)).numpy()
        assert (source == source[:, :1]).all()
        positions = (np.arange(steps)[:, None] * batch + rank * per_rank + np.arange(per_rank)).ravel()
        assert np.array_equal(source[:, 0], loader.order.mixture.sources(positions)[0])
        counts, n = np.bincount(source[:, 0], minlength=2), len(rows)
        assert (np.abs(counts - n * q) <= 5 * np.sqrt(n * q * (1 - q))).all(), (rank, counts)

    # the draw is counted: per step, the epochs of each source so far; at the start, the plan of the whole run
    logged = {r["step"]: r for r in read_jsonl(cfg.metrics_file) if "train/epochs/books" in r}
    assert sorted(logged) == list(range(1, steps + 1))
    for step, record in logged.items():
        assert {name: record[f"train/epochs/{name}"] for name in SOURCES} == loader.order.epochs(step * batch)
    plan = {row.name: row for row in Mixture(cfg, shards.load_manifest(cfg.data_dir), cfg.data_dir).plan()}
    assert plan["books"].epochs == logged[steps]["train/epochs/books"] > 1.5 and plan["books"].sampling > 4
    assert plan["web"].epochs == logged[steps]["train/epochs/web"] < 0.5 and plan["web"].sampling < 1
    assert plan["books"].sequences + plan["web"].sequences == steps * batch and plan["books"].share == 0.2
    assert plan["books"].line().startswith("source books: 0.2 of each step, 1,600 train tokens")
    final = checkpoints.TrainerState.read(checkpoints.latest(cfg.checkpoint_dir))
    assert final.data_order == "mixture-feistel-v1:web=0.8,books=0.2"


def test_a_mixture_is_refused_past_a_sources_max_epochs_with_other_sources_or_to_resume_at_other_weights(
        tmp_path, mixture_dataset):
    def refusal(name: str, *overrides: str, state: dict | None = None) -> str:
        cfg = mixed_config(tmp_path / name, mixture_dataset, *overrides)
        if state:  # a checkpoint of the run to resume (its state alone is enough to be refused)
            os.makedirs(os.path.join(cfg.checkpoint_dir, checkpoints.step_name(4)))
            with open(os.path.join(cfg.checkpoint_dir, checkpoints.step_name(4), checkpoints.STATE), "w") as f:
                json.dump({"step": 4, "sequences": 64, "tokens": 4096, "world_size": 2, "zero_stage": 2, **state}, f)
        with pytest.raises(UserError) as refused:
            launch.run(cfg, resume=True)  # each before any worker starts
        return str(refused.value)

    capped = "data.sources=[{name: web, input: w, weight: 4}, {name: books, input: b, weight: 1, max_epochs: 1.5}]"
    assert re.fullmatch(r"data.sources\[1\].max_epochs: source 'books' would be drawn 2.\d+ epochs over "
                        r"train.max_steps=16 \(\d\d of 256 sequences at 0.2 of each step\), above its max_epochs=1.5; "
                        r"lower its weight, shorten the run, or raise max_epochs", refusal("capped", capped))
    other = "data.sources=[{name: web, input: w, weight: 4}, {name: news, input: n, weight: 1}]"
    assert "holds the sources web, books, the config names web, news;" in refusal("other", other)
    assert "the config names (none: data.input)" in refusal("none", "data.sources=[]", "data.input=[x]")
    assert ("trained on the data order 'mixture-feistel-v1:web=0.8,books=0.2', this run's is "
            "'mixture-feistel-v1:web=0.5,books=0.5' (data.sources" in refusal(
                "reweighted", MIXTURE.replace("weight: 4", "weight: 1"),
                state={"data_order": "mixture-feistel-v1:web=0.8,books=0.2"}))

    # the pipeline's train stage: what its output depends on includes the weights (the dataset does not hold them),
    # as their shares; a single input's inputs are as before mixtures, so its runs' fingerprints stay
    from train.stage import TRAIN

    def inputs(*overrides: str) -> list:
        return TRAIN.inputs(mixed_config(tmp_path / "inputs", mixture_dataset, *overrides), None)

    assert inputs()[-1] == "mixture-feistel-v1:web=0.8,books=0.2" and inputs() == inputs(
        MIXTURE.replace("weight: 4", "weight: 0.8").replace("weight: 1", "weight: 0.2"))
    assert inputs(MIXTURE.replace("weight: 4", "weight: 1"))[-1] == "mixture-feistel-v1:web=0.5,books=0.5"
    assert len(TRAIN.inputs(tiny_config(tmp_path, write_dataset(tmp_path / "one", [5000], seed=1)), None)) == 3

    # what a run prints and logs (MLflow params, through the train run's constants) of each source's plan
    cfg = mixed_config(tmp_path / "plan", mixture_dataset)
    web, books = Mixture(cfg, shards.load_manifest(cfg.data_dir), cfg.data_dir).plan()
    total = web.tokens + books.tokens
    assert (web.name, books.name, web.share, books.share) == ("web", "books", 0.8, 0.2)
    assert books.sampling == pytest.approx(0.2 / (books.tokens / total)) and books.sampling > 1 > web.sampling
    assert web.sequences + books.sequences == 16 * (cfg.batch.tokens_per_step // cfg.batch.seq_len)
    assert re.fullmatch(r"source books: 0.2 of each step, [\d,]+ train tokens, \d+ sequences over the run = "
                        r"[\d.]+ epochs \(up-sampled x[\d.]+\)", books.line()), books.line()
    assert "(down-sampled x" in web.line()
    assert books.params() == {"data.sources.books.share": 0.2, "data.sources.books.tokens": books.tokens,
                              "data.sources.books.sequences": books.sequences,
                              "data.sources.books.epochs": round(books.epochs, 6),
                              "data.sources.books.sampling": round(books.sampling, 6)}


def test_a_mixtures_validation_pools_its_sources_in_proportion_to_their_val_tokens(mixture_dataset):
    x, y = val_loss.val_sequences(str(mixture_dataset), seq_len=64, max_tokens=4096)  # 64 windows of 8,000 tokens
    assert x.shape == y.shape == (64, 64) and torch.equal(x[:, 1:], y[:, :-1])
    for source, (name, first, count) in enumerate([("web", 0, 48), ("books", 48, 16)]):  # 6,000 : 2,000
        held = np.asarray(shards.read_split(str(mixture_dataset), "val", source=name)[0][:count * 64], dtype=np.int64)
        assert torch.equal(x[first:first + count].flatten(), torch.from_numpy(held))  # its first windows, in order
        assert (x[first:first + count] // (50257 // 2) == source).all()


@pytest.mark.slow
def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(uninterrupted, tmp_path, mixture_dataset):
    cfg = mixed_config(tmp_path, mixture_dataset)
    shutil.copytree(uninterrupted.checkpoint_dir, cfg.checkpoint_dir)
    shutil.copy(uninterrupted.metrics_file, cfg.metrics_file)
    # what a crash in the middle of saving step 16 leaves: files written, no commit, pointer unchanged
    torn = os.path.join(cfg.checkpoint_dir, "step_00000016")
    os.remove(os.path.join(torn, checkpoints.STATE))
    with open(os.path.join(torn, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(cfg.checkpoint_dir, checkpoints.LATEST), "w") as f:
        f.write("step_00000012")
    assert checkpoints.latest(cfg.checkpoint_dir).endswith("step_00000012")

    launch.run(cfg, resume=True)  # loads step 12 and redoes 13-16
    got, expected = losses(cfg.run_dir), losses(uninterrupted.run_dir)
    assert got == expected  # 13-16 redone: each step's record replaced, bitwise equal
    assert checkpoints.committed(cfg.checkpoint_dir) == ["step_00000008", "step_00000012", "step_00000016"]
    a, b = final_weights(uninterrupted), final_weights(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def damage_newest(cfg, uninterrupted, how: str) -> str:
    """A copy of the uninterrupted run whose newest checkpoint (step 16) is damaged after its commit; the file."""
    shutil.copytree(uninterrupted.checkpoint_dir, cfg.checkpoint_dir)
    shutil.copy(uninterrupted.metrics_file, cfg.metrics_file)
    newest = os.path.join(cfg.checkpoint_dir, "step_00000016")
    if how == "optimizer bytes overwritten":  # the size stays: only the digest can tell
        victim = sorted(glob.glob(os.path.join(newest, "deepspeed", "state", "*optim_states.pt")))[0]
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            f.write(b"\x7f" * 256)
    else:
        victim = os.path.join(newest, "model.safetensors")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    return victim


@pytest.mark.slow
@pytest.mark.parametrize("how", ["optimizer bytes overwritten", "weights truncated"])
def test_a_damaged_checkpoint_is_never_trained_from_and_eval_refuses_it_naming_the_file(
        how, uninterrupted, tmp_path, mixture_dataset, capsys):
    from eval.run import main as eval_main
    from train.checkpoint import newest_intact

    cfg = mixed_config(tmp_path, mixture_dataset)
    victim = damage_newest(cfg, uninterrupted, how)
    said: list[str] = []
    assert newest_intact(cfg.checkpoint_dir, say=said.append) == os.path.join(cfg.checkpoint_dir, "step_00000012")
    assert len(said) == 2 and victim in said[0] and "step_00000012" in said[1], said  # one line each

    capsys.readouterr()
    ckpt = os.path.dirname(victim) if how == "weights truncated" else cfg.checkpoint_dir  # one, or the directory
    assert eval_main(["--config", "smoke", "--ckpt", ckpt, "--no-val", "--hellaswag", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: damaged checkpoint") and victim in err and "\n" not in err, err

    if how == "optimizer bytes overwritten":  # training falls back to step 12, redoes 13-16: the uninterrupted run
        launch.run(cfg, resume=True)
        assert losses(cfg.run_dir) == losses(uninterrupted.run_dir)
        a, b = final_weights(uninterrupted), final_weights(cfg)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert checkpoints.damage(os.path.join(cfg.checkpoint_dir, "step_00000016")) is None  # rewritten whole


@pytest.mark.slow
def test_a_commit_records_every_files_size_and_digest(uninterrupted):
    newest = checkpoints.latest(uninterrupted.checkpoint_dir)
    record = checkpoints.recorded_files(newest)
    on_disk = {str(p.relative_to(newest)): p for p in Path(newest).rglob("*") if p.is_file()}
    assert set(record) == set(on_disk) - {checkpoints.STATE} and any("optim_states" in n for n in record)
    for name, entry in record.items():
        data = on_disk[name].read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoints.damage(newest) is None


@pytest.mark.slow
def test_the_cli_refuses_to_overwrite_a_run_and_names_missing_data(uninterrupted, tmp_path):
    proc = run_cli("train/run.py", "--config", "smoke", f"run.root={uninterrupted.run.root}",
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


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 63, 64, 65, 1000, 4097])
def test_the_window_permutation_is_a_bijection_fixed_by_seed_and_epoch(n):
    everything = WindowPermutation(n, seed=11, epoch=0)(np.arange(n))
    assert sorted(everything) == list(range(n))
    assert np.array_equal(WindowPermutation(n, seed=11, epoch=0)(np.arange(n)), everything)  # a new process agrees
    picks = np.array([n - 1, 0, n // 2])  # any position alone, as a resuming rank asks for it
    assert np.array_equal(WindowPermutation(n, seed=11, epoch=0)(picks), everything[picks])
    if n >= 63:  # other epochs and seeds give other orders, none closer to the identity than chance:
        assert not np.array_equal(WindowPermutation(n, seed=11, epoch=1)(np.arange(n)), everything)
        assert not np.array_equal(WindowPermutation(n, seed=12, epoch=0)(np.arange(n)), everything)
        # a uniform permutation has Poisson(1) fixed points and rank correlation of sd 1/sqrt(n - 1)
        assert (everything == np.arange(n)).sum() < 8
        assert abs(np.corrcoef(everything, np.arange(n))[0, 1]) < 5 / math.sqrt(n - 1)


@pytest.fixture(scope="module")
def sorted_dataset(tmp_path_factory, ray_local) -> Path:
    """Three kinds of text one after the other (English prose, Python source, tables of numbers), as a
    corpus sorted by source often arrives, tokenized into ~40 shards of 25k tokens."""
    from tokenization import builtin, job

    root = tmp_path_factory.mktemp("sorted")
    prose = [text for _, text in builtin.documents()][:600]
    stdlib = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    code = [open(f, encoding="utf-8", errors="replace").read() for f in stdlib]
    tables = ["\n".join(f"{i},{i * i},{i ** 3 % 9973}" for i in range(k * 400, k * 400 + 400)) for k in range(40)]
    for i, docs in enumerate((prose, code, tables)):
        write_jsonl(root / f"part-{i}.jsonl", [{"text": t} for t in docs])
    out = root / "data"
    inputs = [str(root / f"part-{i}.jsonl") for i in range(3)]
    job.run(load_config("smoke", ["tokenization.shard_tokens=25000"],
                        {"data.input": inputs, "tokenization.output": str(out)}), log=lambda *_: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_draws_from_every_shard_of_a_sorted_corpus_in_proportion(sorted_dataset, world):
    loader = ShardLoader(str(sorted_dataset), seq_len=64, seed=5)
    order, batch, steps = loader.order, 128, 64  # the first 64 global batches: about half an epoch
    sizes = np.diff(order.layout(0).starts)  # windows per shard this epoch
    total, per_rank = sizes.sum(), batch * steps // world
    assert len(sizes) >= 30 and total > batch * steps
    for rank in range(world):
        shard_ids = np.concatenate([order.locate_range(step * batch + rank * (batch // world), batch // world)[1]
                                    for step in range(steps)])
        counts = np.bincount(shard_ids, minlength=len(sizes))
        # A rank's slice is a uniform sample without replacement of the epoch's windows, so each shard's
        # count is hypergeometric; 5 standard deviations (a 1-in-1.7-million miss per shard) bounds it.
        p = sizes / total
        mean, sd = per_rank * p, np.sqrt(per_rank * p * (1 - p) * (total - per_rank) / (total - 1))
        assert (np.abs(counts - mean) <= 5 * sd).all(), (rank, counts, mean.round(1))
        assert (counts > 0).all()  # every shard, so every kind of text, in every rank's slice


def test_a_checkpoint_from_the_shard_by_shard_order_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, write_dataset(tmp_path / "data", [5000, 7000], seed=3))
    old = os.path.join(cfg.checkpoint_dir, checkpoints.step_name(4))
    os.makedirs(old)
    state = {"step": 4, "sequences": 64, "tokens": 4096, "world_size": 2, "zero_stage": 1}  # as written before
    with open(os.path.join(old, checkpoints.STATE), "w") as f:
        json.dump(state, f)
    with pytest.raises(checkpoints.CheckpointError, match="shard-by-shard.*" + ORDER + ".*change the order"):
        launch.run(cfg, resume=True)


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


def write_dataset(local: Path, shard_tokens: list[int] | dict[str, list[int]], seed: int,
                  val: dict[str, int] | None = None) -> Path:
    """Train shards of random tokens in our format, with their manifest (no Ray, no tokenizer). Given a list of
    shards per source name, a mixture of data.sources (with a val shard of val[name] tokens each): source i's
    tokens are drawn from its own range of the vocabulary, [i * V, (i + 1) * V) for V = 50257 // sources, so a
    window's tokens tell its source."""
    rng = np.random.default_rng(seed)
    local.mkdir(parents=True)
    mixture = isinstance(shard_tokens, dict)
    entries, sources = [], []
    for i, (name, sizes) in enumerate(shard_tokens.items() if mixture else [(None, shard_tokens)]):
        span = 50257 // len(shard_tokens) if mixture else 50257
        splits = [("train", k, n) for k, n in enumerate(sizes)] + ([("val", 0, val[name])] if val else [])
        for split, k, n in splits:
            file = f"{name}-{split}_{k:06d}.bin" if mixture else f"train_{k:06d}.bin"
            digest = shards.write_shard(str(local / file), [rng.integers(i * span, (i + 1) * span, n, dtype=np.uint16)],
                                        n)
            entries.append({"file": file, "split": split, "tokens": n, "documents": 1, "sha256": digest,
                            **({"source": name} if mixture else {})})
        held = val[name] if val else 0
        sources.append({"name": name, "input": {"kind": "files"}, "documents": {"train": len(sizes), "val": int(held > 0)},
                        "tokens": {"train": sum(sizes), "val": held}, "shards": {"train": len(sizes), "val": int(held > 0)}})
    (local / shards.MANIFEST).write_text(json.dumps({"format_version": shards.MANIFEST_VERSION, "shards": entries,
                                                     **({"sources": sources} if mixture else {})}))
    return local


# --- the loader on object storage: one verified copy per node, memory-mapped -------------------------------

@pytest.fixture(scope="module")
def counting_s3():
    """moto's S3 server on 127.0.0.1, counting the bytes of every object it sends, by object path."""
    moto_server = pytest.importorskip("moto.server")
    import boto3
    from werkzeug.serving import make_server

    app, sent = moto_server.DomainDispatcherApplication(moto_server.create_backend_app), Counter()

    def counting(environ, start_response):
        for chunk in app(environ, start_response):
            if environ["REQUEST_METHOD"] == "GET":
                sent[environ["PATH_INFO"].lstrip("/")] += len(chunk)
            yield chunk

    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=moto_server.MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="data")
    yield s3, sent, env
    server.shutdown()
    thread.join()


def upload_dataset(s3, local: Path, prefix: str, shard_tokens: list[int] | dict[str, list[int]],
                   seed: int) -> dict[str, int]:
    """write_dataset, uploaded to s3://data/<prefix>; returns each train shard's object path and size."""
    write_dataset(local, shard_tokens, seed)
    for f in local.iterdir():
        s3.upload_file(str(f), "data", f"{prefix}/{f.name}")
    return {f"data/{prefix}/{f.name}": f.stat().st_size for f in sorted(local.glob("*train_*.bin"))}


# A training worker of one node: builds the loader (node cache at argv[2], a mixture's weights as JSON in argv[5]),
# reads 8 global batches of 32 sequences as rank argv[3] of argv[4], prints their sha256 and its peak RSS. (VmHWM,
# not getrusage: ru_maxrss survives exec, so a child would report this test process's peak, moto's objects included.)
WORKER = """
import hashlib, json, re, sys
from train.data import ShardLoader
url, cache, rank, world, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
loader = ShardLoader(url, seq_len=64, seed=9, cache=cache, weights=weights)
digest = hashlib.sha256()
for step in range(8):
    x, y = loader.micro_batch(step * 32, 32, rank, world, 0, 32 // world)
    digest.update(x.numpy().tobytes() + y.numpy().tobytes())
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"batches": digest.hexdigest(), "peak_rss": peak_kb * 1024}))
"""


def node_workers(url: str, cache: Path, env: dict, world: int, weights: list[float] | None = None) -> list[dict]:
    """The `world` ranks of one node, started together, sharing its cache directory."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(cache), str(rank), str(world),
                               json.dumps(weights)], cwd=REPO,
                              env={**os.environ, **env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [json.loads(out.splitlines()[-1]) for out, _ in outs]


def expected_batches(local: Path, rank: int, world: int, weights: list[float] | None = None) -> str:
    loader, digest = ShardLoader(str(local), seq_len=64, seed=9, weights=weights), hashlib.sha256()
    for step in range(8):
        x, y = loader.micro_batch(step * 32, 32, rank, world, 0, 32 // world)
        digest.update(x.numpy().tobytes() + y.numpy().tobytes())
    return digest.hexdigest()


def test_the_ranks_of_a_node_fetch_one_verified_copy_of_remote_shards_and_reuse_it(counting_s3, tmp_path):
    s3, sent, env = counting_s3
    sizes = upload_dataset(s3, tmp_path / "local", "small", [20_000, 7_000, 13_000, 30_000], seed=1)
    cache, url = tmp_path / "node-cache", "s3://data/small"
    before = Counter(sent)
    ranks = node_workers(url, cache, env, world=2)
    assert [r["batches"] for r in ranks] == [expected_batches(tmp_path / "local", rank, 2) for rank in range(2)]
    fetched = {key: sent[key] - before[key] for key in sizes}
    assert fetched == sizes  # each shard exactly once for the node, though two ranks read it

    before = Counter(sent)  # a restart reuses the node's copies
    assert node_workers(url, cache, env, world=1)[0]["batches"] == expected_batches(tmp_path / "local", 0, 1)
    assert all(sent[key] == before[key] for key in sizes)

    victim = cache / f"{shards.sha256_of(str(tmp_path / 'local' / 'train_000003.bin'))}.bin"
    data = bytearray(victim.read_bytes())
    data[4096] ^= 0xFF  # a corrupt copy: detected, fetched again, never read
    victim.write_bytes(bytes(data))
    before = Counter(sent)
    assert node_workers(url, cache, env, world=1)[0]["batches"] == expected_batches(tmp_path / "local", 0, 1)
    refetched = "data/small/train_000003.bin"
    assert {key: sent[key] - before[key] for key in sizes} == {**dict.fromkeys(sizes, 0), refetched: sizes[refetched]}

    # a mixture: every source's shards, fetched once, read in the mixture's order
    sizes = upload_dataset(s3, tmp_path / "mixed", "mixed", {"web": [20_000, 9_000], "books": [3_000]}, seed=2)
    before = Counter(sent)
    assert node_workers("s3://data/mixed", cache, env, world=1, weights=[3, 1])[0]["batches"] == expected_batches(
        tmp_path / "mixed", 0, 1, weights=[3, 1])
    assert {key: sent[key] - before[key] for key in sizes} == sizes and len(sizes) == 3


@pytest.mark.slow
def test_a_workers_memory_does_not_grow_with_a_remote_dataset(counting_s3, tmp_path):
    s3, _, env = counting_s3
    peaks = {}
    for copies in (1, 8):  # 8 MB of tokens, then 64 MB
        upload_dataset(s3, tmp_path / f"x{copies}", f"x{copies}", [1_000_000] * 4 * copies, seed=copies)
        peaks[copies] = node_workers(f"s3://data/x{copies}", tmp_path / "cache", env, world=1)[0]["peak_rss"]
    grown = peaks[8] - peaks[1]
    assert grown < 8_000_000 / 2, peaks  # reading the split into RAM would add 56 MB
