"""All-reduce bus bandwidth between the nodes of a cluster: the check that NCCL really runs on the fast network
(EFA on AWS, RDMA through gIB on GCP) before a multi-node training run spends hours on TCP sockets.

One process per GPU on every node, started by torchrun (infra/README.md, "Check the interconnect"):

    NCCL_DEBUG=INFO torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint NODE0_IP:29500 \\
        bench/allreduce_bandwidth.py

On CPUs (no CUDA) it runs on gloo, which only shows that the script works. Bus bandwidth is nccl-tests' figure:
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
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if rank == 0:
        print(f"{world} ranks on {len(set(hosts))} node(s), backend {dist.get_backend()}, "
              f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}")
        print(f"{'size MiB':>10} {'time ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")

    for size_mb in args.sizes_mb:
        numel = max(1, int(size_mb * 2**20) // 4)
        x = torch.empty(numel, dtype=torch.float32, device=device)
        for _ in range(args.warmup):
            x.fill_(1.0)
            dist.all_reduce(x)
        _sync(cuda)
        start = time.perf_counter()
        for _ in range(args.iters):
            dist.all_reduce(x)
        _sync(cuda)
        seconds = (time.perf_counter() - start) / args.iters
        # correctness on a fresh tensor (the timed one was summed again and again): rank r gives r + 1, so every
        # element must come back as world(world + 1)/2
        y = torch.full((numel,), rank + 1.0, device=device)
        dist.all_reduce(y)
        expected = world * (world + 1) / 2
        if not torch.all(y == expected):
            raise SystemExit(f"all-reduce of {size_mb} MiB is wrong on rank {rank}: {y[:4].tolist()} != {expected}")
        # the slowest rank's time is the collective's time
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        algbw = numel * 4 / t.item() / 1e9
        if rank == 0:
            print(f"{size_mb:>10g} {t.item() * 1e3:>10.4g} {algbw:>11.4g} {algbw * 2 * (world - 1) / world:>11.4g}")
    dist.destroy_process_group()


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
