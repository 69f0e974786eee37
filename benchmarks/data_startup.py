"""Data set-up and batch cost at a cluster recipe's vocabulary (issue 16, item 1).

Builds the synthetic Markov dataset of data.vocab_size=50,304 / data.seq_len=4,096 (the
olmoe_1b7b, deepseek_v3_small and zaya1_like recipes) and reports, in this process:
start-up seconds and extra RSS; seconds per micro-batch of 4 samples read directly; and the
same micro-batches read through the trainer's Prefetcher while a stand-in training step
(a matmul loop of about the read's length) runs, i.e. how much of the read the training
thread still waits for.

    python benchmarks/data_startup.py [--vocab 50304] [--seq-len 4096] [--micro 4] [--batches 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psutil
import torch

from tierzero.recipes.config import DataConfig
from tierzero.recipes.data import Prefetcher, build_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    process = psutil.Process()
    rss0 = process.memory_info().rss
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(vocab_size=args.vocab, seq_len=args.seq_len))
    startup_s = time.perf_counter() - t0
    extra_rss = process.memory_info().rss - rss0
    print(f"start-up at vocab {args.vocab}: {startup_s:.2f} s, +{extra_rss / 2**20:.0f} MiB RSS")

    batches = [np.arange(i * args.micro, (i + 1) * args.micro) for i in range(args.batches)]
    t0 = time.perf_counter()
    for idx in batches:
        ds.samples(idx)
    direct_s = (time.perf_counter() - t0) / len(batches)
    print(f"direct read: {direct_s * 1e3:.1f} ms per micro-batch of {args.micro} x {args.seq_len + 1}")

    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < direct_s:  # a stand-in step as long as one read
        a = torch.tanh(a @ a)
        reps += 1
    feed = Prefetcher(ds)
    waited = 0.0
    try:
        for i, idx in enumerate(batches):
            t = time.perf_counter()
            feed.get(idx)
            waited += time.perf_counter() - t
            if i + 1 < len(batches):
                feed.ahead(batches[i + 1])
            for _ in range(reps):
                a = torch.tanh(a @ a)
    finally:
        feed.close()
    print(f"through the prefetcher, beside a step as long as the read: the training thread waits "
          f"{waited / len(batches) * 1e3:.1f} ms per micro-batch (the first one is never ahead)")


if __name__ == "__main__":
    main()
