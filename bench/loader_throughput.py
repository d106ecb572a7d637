"""Training-loader tokens/s: the global order against the old shard-by-shard one on local disk, and
object storage (moto's S3 server on 127.0.0.1) against local disk with the bytes each node fetched.

    python bench/loader_throughput.py [--shards 32] [--shard-tokens 2000000] [--batches 200]

Dataset: random tokens in our shard format (--shards x --shard-tokens). Each worker is a process that
builds the loader and reads --batches global batches of 64 x 1024-token sequences (its rank's slice),
as a training worker does; tokens/s counts the worker's own tokens after its first batch per second of
the worker's CPU time (the machine is shared, so wall time would measure the neighbours), and the
wall seconds to the first batch are given apart (building the loader: for S3, the node's download). "old" is train/data.py as of OLD_COMMIT (loaded from git), which reads
a remote split into every process's memory; it runs on local disk only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from tokenization import shards

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "306d9b1"  # the last commit with the shard-by-shard order

WORKER = """
import json, subprocess, sys, time, types
url, cache, rank, world, batches, which = sys.argv[1:7]
rank, world, batches = int(rank), int(world), int(batches)
if which == "old":
    source = subprocess.run(["git", "show", "%s:train/data.py"], check=True, capture_output=True, text=True).stdout
    module = sys.modules["old_data"] = types.ModuleType("old_data")
    exec(compile(source, "old_data", "exec"), module.__dict__)
    ShardLoader = module.ShardLoader
else:
    from train.data import ShardLoader
t0 = time.perf_counter()
loader = ShardLoader(url, 1024, 7) if which == "old" else ShardLoader(url, 1024, 7, cache=cache)
x, _ = loader.micro_batch(0, 64, rank, world, 0, 64 // world)
t1, c1 = time.perf_counter(), time.process_time()
for step in range(1, batches + 1):
    x, _ = loader.micro_batch(step * 64, 64, rank, world, 0, 64 // world)
print(json.dumps({"tokens": batches * x.numel(), "seconds": time.process_time() - c1, "setup": t1 - t0}))
""" % OLD_COMMIT


def dataset(root: Path, count: int, tokens: int) -> int:
    rng, entries = np.random.default_rng(0), []
    root.mkdir(parents=True)
    for i in range(count):
        name = f"train_{i:06d}.bin"
        digest = shards.write_shard(str(root / name), [rng.integers(0, 50257, tokens, dtype=np.uint16)], tokens)
        entries.append({"file": name, "split": "train", "tokens": tokens, "documents": 1, "sha256": digest})
    (root / shards.MANIFEST).write_text(json.dumps({"format_version": shards.MANIFEST_VERSION, "shards": entries}))
    return sum((root / e["file"]).stat().st_size for e in entries)


def s3_server():
    """moto's S3 on 127.0.0.1, counting the bytes of every object it sends."""
    import moto.server as moto_server
    from werkzeug.serving import make_server

    app, sent = moto_server.DomainDispatcherApplication(moto_server.create_backend_app), Counter()

    def counting(environ, start_response):
        for chunk in app(environ, start_response):
            if environ["REQUEST_METHOD"] == "GET":
                sent[environ["PATH_INFO"]] += len(chunk)
            yield chunk

    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=moto_server.MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    return server, sent, env


def node(url: str, cache: str, world: int, batches: int, which: str, env: dict) -> tuple[float, float]:
    """Mean over the `world` workers of one node, started together: tokens per CPU-second after the
    first batch, and wall seconds to the first batch (building the loader: for S3, the node's download)."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, cache, str(r), str(world), str(batches), which],
                              cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True) for r in range(world)]
    outs = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    return (sum(o["tokens"] / o["seconds"] for o in outs) / world, sum(o["setup"] for o in outs) / world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=2_000_000)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    import boto3

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "data"
        split_bytes = dataset(local, args.shards, args.shard_tokens)
        server, sent, env = s3_server()
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="data")
        for f in local.iterdir():
            s3.upload_file(str(f), "data", f"data/{f.name}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; dataset "
              f"{args.shards} shards x {args.shard_tokens:,} tokens ({split_bytes / 2**20:.0f} MiB); "
              f"{args.batches} global batches of 64 x 1024 tokens")
        print("| workers | old order, local | new order, local | new / old | new, S3 (moto) | S3 / local | "
              "s to first batch: old local / new local / S3 | bytes fetched by the node / split |")
        print("|---|---|---|---|---|---|---|---|")
        for world in (1, 2):
            old = node(str(local), "", world, args.batches, "old", {})
            new = node(str(local), "", world, args.batches, "new", {})
            before = sum(sent.values())
            remote = node("s3://data/data", f"{tmp}/cache{world}", world, args.batches, "new", env)
            fetched = sum(sent.values()) - before
            print(f"| {world} | {old[0] / 1e6:.2f}M | {new[0] / 1e6:.2f}M | {new[0] / old[0]:.2f} | "
                  f"{remote[0] / 1e6:.2f}M | {remote[0] / new[0]:.2f} | "
                  f"{old[1]:.1f} / {new[1]:.1f} / {remote[1]:.1f} | {fetched / split_bytes:.2f} |", flush=True)
        server.shutdown()


if __name__ == "__main__":
    main()
