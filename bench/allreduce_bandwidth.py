"""All-reduce bus bandwidth between the nodes of a cluster: the check that NCCL really runs on the fast network
(EFA on AWS, RDMA through gIB on GCP) before a multi-node training run spends hours on TCP sockets.

As Ray Train workers, in the environment training gets (submit it like a pipeline run; infra/README.md, 2b):

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"NCCL_DEBUG": "INFO"}}' -- \\
        python bench/allreduce_bandwidth.py --ray-workers 16 --gpu

or one process per GPU on every node, started by torchrun:

    NCCL_DEBUG=INFO torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint NODE0_IP:29500 \\
        bench/allreduce_bandwidth.py

Without GPUs it runs on gloo, which only shows that the script works. Bus bandwidth is nccl-tests' figure:
bytes x 2(n-1)/n / time, the traffic each rank's busiest link carries in a ring all-reduce, so it compares across
cluster sizes and against the network's line rate.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[8, 64, 512, 2048],
                        help="message sizes in MiB (float32 tensors); ZeRO-3 at 1.5B moves hundreds of MiB at a time")
    parser.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size (connection setup)")
    parser.add_argument("--ray-workers", type=int, default=0,
                        help="run as this many Ray Train workers on the cluster of RAY_ADDRESS (else: under torchrun)")
    parser.add_argument("--gpu", action="store_true", help="with --ray-workers: one GPU per worker, NCCL")
    args = parser.parse_args()
    settings = {"sizes_mb": args.sizes_mb, "iters": args.iters, "warmup": args.warmup}
    if args.ray_workers:
        report(_on_ray(args.ray_workers, args.gpu, settings))
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    result = measure(settings)
    if dist.get_rank() == 0:
        report(result)
    dist.destroy_process_group()


def measure(settings: dict) -> dict:
    """All-reduces of each size on the initialized process group; every rank takes part, all get the result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, socket.gethostname())
    rows = []
    for size_mb in settings["sizes_mb"]:
        numel = max(1, int(size_mb * 2**20) // 4)
        x = torch.ones(numel, dtype=torch.float32, device=device)
        for _ in range(settings["warmup"]):
            dist.all_reduce(x)
        _sync(cuda)
        start = time.perf_counter()
        for _ in range(settings["iters"]):
            dist.all_reduce(x)
        _sync(cuda)
        # the slowest rank's time is the collective's time
        t = torch.tensor([(time.perf_counter() - start) / settings["iters"]], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        # correctness on a fresh tensor (the timed one was summed again and again): rank r gives r + 1, so every
        # element must come back as world(world + 1)/2
        y = torch.full((numel,), rank + 1.0, device=device)
        dist.all_reduce(y)
        if not torch.all(y == world * (world + 1) / 2):
            raise RuntimeError(f"all-reduce of {size_mb} MiB is wrong on rank {rank}: {y[:4].tolist()}")
        algbw = numel * 4 / t.item() / 1e9
        rows.append((size_mb, t.item() * 1e3, algbw, algbw * 2 * (world - 1) / world))
    return {"world": world, "nodes": len(set(hosts)), "backend": dist.get_backend(),
            "device": torch.cuda.get_device_name(device) if cuda else "CPU", "rows": rows}


def report(result: dict) -> None:
    print(f"{result['world']} ranks on {result['nodes']} node(s), backend {result['backend']}, {result['device']}")
    print(f"{'size MiB':>10} {'time ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for size_mb, ms, algbw, busbw in result["rows"]:
        print(f"{size_mb:>10g} {ms:>10.4g} {algbw:>11.4g} {busbw:>11.4g}")


def _on_ray(workers: int, gpu: bool, settings: dict) -> dict:
    """The same measurement as Ray Train workers: their raylets' environment (the launcher's NCCL settings), their
    placement and Ray Train's process group, as a training run gets them."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.core import cluster

    cluster.connect()
    trainer = TorchTrainer(_ray_worker, train_loop_config=settings,
                           torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                           scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu))
    return trainer.fit().return_value


def _ray_worker(settings: dict) -> dict:
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return measure(settings)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
