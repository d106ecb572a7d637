"""GPU acceptance kit: our GPT-2 on one GPU, with only PyTorch, DeepSpeed and liger-kernel (no Ray, no
MLflow; tests/test_gpu_kit.py runs it with nothing else importable).

    python bench/gpu.py [--out results.json] [--measured mfu.json]   # on a GPU machine: GPT-2 124M, < 10 min
    python bench/gpu.py --quick ...                 # the same questions in under 4 minutes
    python bench/gpu.py --smoke                     # a 2-layer model on the CPU, seconds: the kit itself runs

In this order, so that the first minutes answer the main question:
1. Correctness: the same weights give the same logits on the GPU as on the CPU (fp32 with TF32 off:
   tight; bf16 weights as training runs them: within bf16's precision).
2. Throughput, eager: GPT-2 124M, sequence 1024, bf16, ZeRO-1, one process (this one is the whole
   world), through the trainer's own engine (train/engine.initialize) and step (train/engine.train_step),
   micro-batches 16, 32, 64. Printed: tokens/s, MFU (989 TFLOP/s bf16 peak, H100 SXM), peak allocated
   memory, and the plan's estimate (train/plan.py) beside it.
3. The loss heads (model.loss_impl): ours (chunked) and Liger-Kernel's fused linear cross-entropy alone,
   time, memory and agreement; then the step on Liger's head.
4. Compiled (deepspeed.compile): the steps, the heads, the step on Liger's head.
Each configuration runs in a fresh subprocess (its peak memory is its own) with its own time cap, inside
the whole budget; the JSON is rewritten after each one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.model.gpt2 import (
    GPT,  # noqa: E402
    LMHead,  # noqa: E402
)
from train import engine as engines  # noqa: E402
from train import plan as plans  # noqa: E402

H100_PEAK = 989e12  # bf16 dense FLOP/s, H100 SXM (the issue's reference; train/engine.py's table too)


def job(kind: str, micro_batch: int, compiled: bool, cap_s: float, loss_impl: str = "chunked") -> dict:
    """One configuration, run in its own subprocess and stopped at cap_s (or the budget's end, if sooner).
    kind "step": the trainer's step; kind "heads": the loss heads alone (both, compared)."""
    return {"kind": kind, "micro_batch": micro_batch, "compiled": compiled, "cap_s": cap_s, "loss_impl": loss_impl}


# The order answers the main question first: eager steps (MFU, memory), then the loss heads and the
# step on Liger's head, then compilation (inductor: most of a compiled configuration is its setup).
FULL = {"name": "full", "preset": "gpt2-124m", "seq_len": 1024, "warmup": 5, "steps": 20, "budget": 540,
        "overrides": [], "jobs": [
            job("step", 16, False, 75), job("step", 32, False, 75), job("step", 64, False, 90),
            job("heads", 64, False, 60), job("step", 64, False, 90, "liger"),
            job("step", 16, True, 150), job("step", 32, True, 150), job("step", 64, True, 150),
            job("heads", 64, True, 120), job("step", 64, True, 150, "liger")]}
# --quick: the same questions in under 4 minutes (fewer steps and configurations)
QUICK = {**FULL, "name": "quick", "warmup": 3, "steps": 10, "budget": 220, "jobs": [
    job("step", 32, False, 45), job("step", 64, False, 60), job("heads", 64, False, 45),
    job("step", 64, False, 60, "liger"), job("step", 64, True, 150)]}
# --smoke: a 2-layer model on the CPU, seconds; Liger's jobs are reported as skipped (it needs CUDA)
SMOKE = {"name": "smoke", "preset": "smoke", "seq_len": 64, "warmup": 1, "steps": 2, "budget": 300,
         "overrides": ["model.block_size=64", "deepspeed.precision=bf16"], "jobs": [
             job("step", 2, False, 120), job("step", 4, False, 120), job("heads", 4, False, 120),
             job("step", 4, False, 120, "liger"), job("step", 4, True, 240), job("heads", 4, True, 240)]}
MEASURED = Path(__file__).with_name("gpu_measured.json")  # what train/plan.py reads (see --measured)


def config(kit: dict, micro_batch: int, compiled: bool, loss_impl: str = "chunked"):
    """The trainer's config for one measurement: one worker, no gradient accumulation."""
    return load_config(kit["preset"], [*kit["overrides"], "cluster.num_workers=1", f"batch.seq_len={kit['seq_len']}",
                                       f"batch.micro_batch_size={micro_batch}",
                                       f"batch.tokens_per_step={micro_batch * kit['seq_len']}",
                                       "deepspeed.zero_stage=1", "train.warmup_steps=0",
                                       f"deepspeed.compile={str(compiled).lower()}", f"model.loss_impl={loss_impl}"])


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


def liger_missing(device: torch.device) -> str | None:
    """Why Liger-Kernel's loss cannot run here, or None."""
    if device.type != "cuda":
        return "needs CUDA (Triton kernels)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (shared/gpu-wheels has it)"
    return None


def measure(kit: dict, micro_batch: int, compiled: bool, device: torch.device, loss_impl: str = "chunked") -> dict:
    """Tokens/s, MFU and peak memory of the trainer's step for one configuration (this process)."""
    cfg = config(kit, micro_batch, compiled, loss_impl)
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
    return {"micro_batch": micro_batch, "compiled": compiled, "loss_impl": loss_impl,
            "tokens_per_s": cfg.batch.tokens_per_step / seconds,
            "mfu": engines.mfu(engine, cfg, seconds, peak, 1), "step_s": seconds, "setup_s": setup, "loss": last,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "plan_gib": plan.total / 2**30, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def measure_heads(kit: dict, micro_batch: int, compiled: bool, device: torch.device) -> list[dict]:
    """The loss heads alone, at the step's shape (micro_batch x seq_len rows, the padded vocabulary, the
    run's dtype): forward + backward time, the memory they add at their peak, and Liger's loss and
    gradients against ours on the same inputs."""
    cfg = config(kit, micro_batch, compiled)
    dtype = torch.bfloat16 if engines.precision(cfg) == "bf16" else torch.float32
    gpt = engines.gpt_config(cfg)
    n, rows = micro_batch * kit["seq_len"], []
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, gpt.n_embd, generator=g).to(device, dtype)
    w0 = (torch.randn(gpt.padded_vocab_size, gpt.n_embd, generator=g) * 0.02).to(device, dtype)
    targets = torch.randint(0, gpt.vocab_size, (n,), generator=g).to(device)
    reference = None
    for impl in ("chunked", "liger"):
        why = liger_missing(device) if impl == "liger" else None
        if why:
            rows.append({"impl": impl, "compiled": compiled, "micro_batch": micro_batch, "skipped": why})
            continue
        try:
            head = LMHead(dataclasses.replace(gpt, loss_impl=impl)).to(device)
            head.weight = torch.nn.Parameter(w0.clone())
            x = x0.clone().requires_grad_(True)
            run = torch.compile(head) if compiled else head

            def step():
                x.grad, head.weight.grad = None, None
                loss = run(x, targets)
                loss.backward()
                return loss

            started = time.perf_counter()
            for _ in range(kit["warmup"]):
                loss = step()
            float(loss)
            setup = time.perf_counter() - started
            x.grad, head.weight.grad = None, None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            for _ in range(kit["steps"]):
                loss = step()
            value = float(loss)
            seconds = (time.perf_counter() - t0) / kit["steps"]
            row = {"impl": impl, "compiled": compiled, "micro_batch": micro_batch, "ms": 1000 * seconds,
                   "setup_s": setup, "loss": value,
                   "peak_gib": (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None}
            grads = x.grad.float(), head.weight.grad.float()
            if reference is None:
                reference = value, grads
            else:  # against ours: |loss difference|, largest gradient difference / largest gradient
                row["loss_diff"] = abs(value - reference[0])
                row["grad_x_rel_diff"], row["grad_w_rel_diff"] = (
                    float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, reference[1]))
            rows.append(row)
        except Exception as err:  # noqa: BLE001 - reported, and the other head still measured
            rows.append({"impl": impl, "compiled": compiled, "micro_batch": micro_batch,
                         "error": f"{type(err).__name__}: {err}"[-2000:]})
        finally:
            x = head = run = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU (checks the kit runs)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and configurations: under 4 minutes")
    parser.add_argument("--compile", choices=["both", "off", "on"], default=None,
                        help="eager, compiled or both (default: both on a GPU, off with --smoke)")
    parser.add_argument("--out", help="write every figure to this JSON file (rewritten after each configuration)")
    parser.add_argument("--measured", help="write the measured MFU of the preset's own configuration to this "
                                           f"JSON file, the form train/plan.py reads from {MEASURED.name}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole sweep (default: 540 full, 220 --quick: inside a 10-minute "
                             "command); each configuration also has its own cap, and one that runs past either is "
                             "stopped and reported")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "MICRO_BATCH", "COMPILED"), help=argparse.SUPPRESS)
    parser.add_argument("--loss-impl", default="chunked", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kit = SMOKE if args.smoke else QUICK if args.quick else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.one:  # the child: one configuration, one JSON line
        kind, mb, compiled = args.one[0], int(args.one[1]), args.one[2] == "1"
        result = (measure(kit, mb, compiled, device, args.loss_impl) if kind == "step"
                  else measure_heads(kit, mb, compiled, device))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if device.type == "cpu" and not args.smoke:
        print("no GPU here: run with --smoke, or on a GPU machine", file=sys.stderr)
        return 2
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile or ("off" if args.smoke else "both")]
    budget = args.budget or kit["budget"]
    started = time.monotonic()
    logits = check_logits(kit, device)
    print(f"logits vs CPU: fp32 max diff {logits['fp32_max_diff']:.2e}, bf16 max diff {logits['bf16_max_diff']:.3f} "
          f"(|logits| up to {logits['logits_abs_max']:.1f}), bf16 argmax agreement "
          f"{logits['bf16_argmax_agreement']:.3f}: {'OK' if logits['ok'] else 'FAILED'}", flush=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "kit": kit["name"], "device": str(device), "torch": torch.__version__,
               "logits": logits, "runs": [], "loss_heads": []}
    _write(args.out, summary)
    print(f"{'micro':>5} {'compile':>7} {'head':>7} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'plan GiB':>8} "
          f"{'setup s':>7}", flush=True)
    failed = False
    for j in (j for j in kit["jobs"] if j["compiled"] in modes):
        mb, compiled, impl = j["micro_batch"], j["compiled"], j["loss_impl"]
        label = f"{mb:>5} {str(compiled):>7} {impl if j['kind'] == 'step' else 'heads':>7}"
        rows = summary["runs"] if j["kind"] == "step" else summary["loss_heads"]
        why = liger_missing(device) if impl == "liger" else None
        if why:
            print(f"{label} skipped: Liger-Kernel {why}", flush=True)
            rows.append({"micro_batch": mb, "compiled": compiled, "loss_impl": impl, "skipped": why})
            _write(args.out, summary)
            continue
        left = budget - (time.monotonic() - started)
        cap = min(j["cap_s"], left)
        if cap < 5:
            print(f"{label} not run: the {budget:.0f} s budget is spent", flush=True)
            rows.append({"micro_batch": mb, "compiled": compiled, "loss_impl": impl, "error": "budget spent"})
            _write(args.out, summary)
            failed = True
            continue
        cmd = [sys.executable, __file__, "--one", j["kind"], str(mb), "1" if compiled else "0", "--loss-impl", impl,
               *(["--smoke"] if args.smoke else ["--quick"] if args.quick else [])]
        result, error = _child(cmd, cap)
        if error:
            why = f"stopped after {cap:.0f} s (its cap or the budget's end)" if error == "timeout" else error
            print(f"{label} FAILED: {why[-2000:]}", flush=True)
            rows.append({"micro_batch": mb, "compiled": compiled, "loss_impl": impl, "error": why[-4000:]})
            failed = True
        elif j["kind"] == "step":
            rows.append(result)
            summary["device"] = result["device"]
            mfu = "-" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
            peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"
            print(f"{label} {result['tokens_per_s']:>10,.0f} {mfu:>6} {peak:>8} {result['plan_gib']:>8.2f} "
                  f"{result['setup_s']:>7.1f}", flush=True)
            _record(args.measured, summary, kit)
        else:
            rows.extend(result)
            for r in result:
                failed |= "error" in r
                print(f"{label}  {r['impl']:>7}: " + _head_line(r), flush=True)
        _write(args.out, summary)
    _write(args.out, summary)
    return 0 if logits["ok"] and not failed else 1


def _child(cmd: list[str], cap: float) -> tuple[dict | list | None, str | None]:
    """Run one configuration's subprocess for at most cap seconds: (its result, None) or (None, why not).
    On a timeout the whole process group is killed, so a hung compile leaves nothing behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, "timeout"
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return None, f"exit {proc.returncode}: {stderr.strip()}"
    return json.loads(line[len("RESULT "):]), None


def _head_line(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return r.get("skipped") or f"FAILED: {r['error']}"
    peak = "" if r["peak_gib"] is None else f", {r['peak_gib']:.2f} GiB over its inputs"
    diff = (f", vs chunked: loss {r['loss_diff']:.1e}, grad x {r['grad_x_rel_diff']:.1e}, grad W "
            f"{r['grad_w_rel_diff']:.1e} (relative)") if "loss_diff" in r else ""
    return f"{r['ms']:.1f} ms forward+backward{peak}, loss {r['loss']:.4f}{diff}"


def _record(path: str | None, summary: dict, kit: dict) -> None:
    """The MFU of the preset's own configuration (its micro-batch, compile and loss head), the figure
    train/plan.py uses instead of its assumed one once it is copied to bench/gpu_measured.json."""
    if not path or summary["device"] == "cpu":
        return
    cfg = load_config(kit["preset"])
    own = [r for r in summary["runs"] if r.get("mfu") and r["micro_batch"] == cfg.batch.micro_batch_size
           and r["compiled"] == cfg.deepspeed.compile and r["loss_impl"] == cfg.model.loss_impl]
    if own:
        r = own[0]
        Path(path).write_text(json.dumps({
            "mfu": r["mfu"], "device": r["device"], "date": summary["date"], "torch": summary["torch"],
            "preset": kit["preset"], "micro_batch": r["micro_batch"], "compiled": r["compiled"],
            "loss_impl": r["loss_impl"], "tokens_per_s": r["tokens_per_s"], "source": "bench/gpu.py"}, indent=2) + "\n")


def _write(path: str | None, summary: dict) -> None:
    """Rewritten after every configuration, so a command cut short still leaves what it measured."""
    if path:
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
