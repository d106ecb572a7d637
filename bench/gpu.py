"""GPU acceptance kit: our GPT-2 on one GPU, with only PyTorch and DeepSpeed (no Ray, no MLflow).

    python bench/gpu.py [--out results.json]        # on a GPU machine: GPT-2 124M, the checks below
    python bench/gpu.py --smoke                     # a 2-layer model on the CPU, seconds: the kit itself runs

1. Correctness: the same weights give the same logits on the GPU as on the CPU (fp32 with TF32 off:
   tight; bf16 weights as training runs them: within bf16's precision).
2. Throughput: GPT-2 124M, sequence 1024, bf16, ZeRO-1, one process (this one is the whole world),
   through the trainer's own engine (train/engine.initialize) and step (train/engine.train_step), for
   micro-batches 16, 32, 64, eager and compiled (deepspeed.compile). Each configuration runs in a fresh
   subprocess so its peak memory is its own. Printed: tokens/s, MFU (989 TFLOP/s bf16 peak, H100 SXM),
   peak allocated memory, and the plan's estimate (train/plan.py) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.model.gpt2 import GPT  # noqa: E402
from train import engine as engines  # noqa: E402
from train import plan as plans  # noqa: E402

H100_PEAK = 989e12  # bf16 dense FLOP/s, H100 SXM (the issue's reference; train/engine.py's table too)
FULL = {"preset": "gpt2-124m", "micro_batches": [16, 32, 64], "seq_len": 1024, "warmup": 5, "steps": 20,
        "overrides": []}
SMOKE = {"preset": "smoke", "micro_batches": [2, 4], "seq_len": 64, "warmup": 1, "steps": 2,
         "overrides": ["model.block_size=64", "deepspeed.precision=bf16"]}


def config(kit: dict, micro_batch: int, compiled: bool):
    """The trainer's config for one measurement: one worker, no gradient accumulation."""
    return load_config(kit["preset"], [*kit["overrides"], "cluster.num_workers=1", f"batch.seq_len={kit['seq_len']}",
                                       f"batch.micro_batch_size={micro_batch}",
                                       f"batch.tokens_per_step={micro_batch * kit['seq_len']}",
                                       "deepspeed.zero_stage=1", "train.warmup_steps=0",
                                       f"deepspeed.compile={str(compiled).lower()}"])


def check_logits(kit: dict, device: torch.device) -> dict:
    """Max |difference| of the logits of one model on `device` against the CPU, fp32 and bf16."""
    cfg = config(kit, 2, False)
    torch.manual_seed(0)
    model = GPT(engines.gpt_config(cfg)).eval()
    idx = torch.randint(0, 50257, (2, kit["seq_len"]))
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        reference = model(idx)[0][..., :50257]
        fp32 = model.to(device)(idx.to(device))[0][..., :50257].float().cpu()
        bf16 = model.to(torch.bfloat16)(idx.to(device))[0][..., :50257].float().cpu()
    scale = float(reference.abs().max())
    out = {"logits_abs_max": scale, "fp32_max_diff": float((fp32 - reference).abs().max()),
           "bf16_max_diff": float((bf16 - reference).abs().max()),
           "bf16_argmax_agreement": float((bf16.argmax(-1) == reference.argmax(-1)).float().mean())}
    out["ok"] = out["fp32_max_diff"] <= 1e-3 * scale and out["bf16_max_diff"] <= 0.05 * scale
    return out


def measure(kit: dict, micro_batch: int, compiled: bool, device: torch.device) -> dict:
    """Tokens/s, MFU and peak memory of the trainer's step for one configuration (this process)."""
    cfg = config(kit, micro_batch, compiled)
    engines.local_process_group(use_gpu=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    engine = engines.initialize(cfg, world_size=1)
    g = torch.Generator().manual_seed(0)

    def batches():
        seq = torch.randint(0, 50257, (micro_batch, kit["seq_len"] + 1), generator=g)
        return [(seq[:, :-1], seq[:, 1:])]

    for step in range(kit["warmup"]):  # includes compilation
        loss, _ = engines.train_step(engine, batches(), device)
    float(loss)
    setup = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(kit["steps"]):
        loss, _ = engines.train_step(engine, batches(), device)
    last = float(loss)  # waits for the GPU
    seconds = (time.perf_counter() - t0) / kit["steps"]
    peak = engines.peak_flops(device) or (H100_PEAK if device.type == "cuda" else None)
    plan = plans.plan(cfg)
    return {"micro_batch": micro_batch, "compiled": compiled, "tokens_per_s": cfg.batch.tokens_per_step / seconds,
            "mfu": engines.mfu(engine, cfg, seconds, peak, 1), "step_s": seconds, "setup_s": setup, "loss": last,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "plan_gib": plan.total / 2**30, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU (checks the kit runs)")
    parser.add_argument("--compile", choices=["both", "off", "on"], default=None,
                        help="eager, compiled or both (default: both on a GPU, off with --smoke)")
    parser.add_argument("--out", help="write every figure to this JSON file (rewritten after each configuration)")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for the whole sweep; a configuration that would run past it is stopped "
                             "and reported (default 540: inside a 10-minute command)")
    parser.add_argument("--one", nargs=2, metavar=("MICRO_BATCH", "COMPILED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kit = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.one:  # the child: one configuration, one JSON line
        print("RESULT " + json.dumps(measure(kit, int(args.one[0]), args.one[1] == "1", device)), flush=True)
        return 0
    if device.type == "cpu" and not args.smoke:
        print("no GPU here: run with --smoke, or on a GPU machine", file=sys.stderr)
        return 2
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile or ("off" if args.smoke else "both")]
    logits = check_logits(kit, device)
    print(f"logits vs CPU: fp32 max diff {logits['fp32_max_diff']:.2e}, bf16 max diff {logits['bf16_max_diff']:.3f} "
          f"(|logits| up to {logits['logits_abs_max']:.1f}), bf16 argmax agreement "
          f"{logits['bf16_argmax_agreement']:.3f}: {'OK' if logits['ok'] else 'FAILED'}", flush=True)
    started = time.monotonic()
    summary = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "torch": torch.__version__,
               "logits": logits, "runs": []}
    rows = summary["runs"]
    print(f"{'micro':>5} {'compile':>7} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'plan GiB':>8} {'setup s':>7}")
    for compiled in modes:
        for mb in kit["micro_batches"]:
            cmd = [sys.executable, __file__, "--one", str(mb), "1" if compiled else "0"] + (["--smoke"] if args.smoke else [])
            left = args.budget - (time.monotonic() - started)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1),
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except subprocess.TimeoutExpired:
                print(f"{mb:>5} {str(compiled):>7} stopped: past the {args.budget:.0f} s budget", flush=True)
                rows.append({"micro_batch": mb, "compiled": compiled, "error": "past the time budget"})
                _write(args.out, summary)
                continue
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{mb:>5} {str(compiled):>7} FAILED (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}", flush=True)
                rows.append({"micro_batch": mb, "compiled": compiled, "error": proc.stderr[-4000:]})
                _write(args.out, summary)
                continue
            r = json.loads(line[len("RESULT "):])
            rows.append(r)
            summary["device"] = r["device"]
            _write(args.out, summary)
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"{mb:>5} {str(compiled):>7} {r['tokens_per_s']:>10,.0f} {mfu:>6} {peak:>8} {r['plan_gib']:>8.2f} "
                  f"{r['setup_s']:>7.1f}", flush=True)
    _write(args.out, summary)
    return 0 if logits["ok"] and all("error" not in r for r in rows) else 1


def _write(path: str | None, summary: dict) -> None:
    """Rewritten after every configuration, so a command cut short still leaves what it measured."""
    if path:
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
