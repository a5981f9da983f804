"""Overhead of kiln's training loop against a plain loop in the style of PyTorch's CIFAR-10 tutorial.

Same model (the built-in small CNN), same data (scikit-learn's digits at 32x32, through the same datasets and
transforms), same batch size, optimizer, thread count and epochs. Throughput is measured over the training
phase of each epoch (forward, loss, backward, update and kiln's bookkeeping: step counters, metrics, signal
checks), so both loops do the same work; kiln's per-epoch validation and checkpoint are reported
separately as wall time per epoch. Runs alternate between the loops to spread machine noise over both, and
each run's first epoch is left out as warm-up. The overhead compares the best epochs (as timeit does: other
load on the machine only ever slows an epoch down); medians are shown too. Goal: kiln at most 5% slower.

    python bench/train_overhead.py --quick     # 4 runs of 2 epochs per loop instead of 4 runs of 3
"""

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Sized
from pathlib import Path
from typing import cast

import machine
import torch
from torch.utils.data import DataLoader

from kiln import api
from kiln_trainer import data, loop, models

BATCH = 64
LEARNING_RATE = 1e-3
GOAL = 0.05


def _spec(epochs: int) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(
        {
            "data": {"dataset": "digits", "numWorkers": 0},
            "training": {
                "epochs": epochs,
                "batchSize": BATCH,
                "optimizer": {"name": "adamw", "learningRate": LEARNING_RATE},
                "scheduler": {"name": "none"},
            },
        }
    )


def plain_loop(spec: api.TrainingJobSpec, epochs: int) -> list[float]:
    """The tutorial's loop: images per second of each epoch."""
    bundle = data.load_data(spec)
    torch.manual_seed(spec.training.seed)
    net = models.build_model(spec, bundle.num_classes)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)
    trainloader = DataLoader(bundle.train, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    throughput = []
    for _ in range(epochs):
        net.train()
        start, seen, running_loss = time.perf_counter(), 0, 0.0
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            seen += len(labels)
        throughput.append(seen / (time.perf_counter() - start))
    return throughput


def kiln_loop(spec: api.TrainingJobSpec) -> tuple[list[float], list[float]]:
    """kiln's train() (no compile): training images per second and wall seconds of each epoch."""
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        result = loop.train(spec, Path(out), compile=False, log_format="json")
    return [h.samples_per_second for h in result.history], [h.duration_seconds for h in result.history]


def main(quick: bool) -> str:
    """Run both loops alternately; return a Markdown table of throughput and kiln's overhead."""
    (runs, epochs), threads = (4, 2) if quick else (4, 3), machine.nproc()
    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)
    spec = _spec(epochs)
    plain, kiln, kiln_wall = [], [], []
    for _ in range(runs):
        plain += plain_loop(spec, epochs)[1:]
        ips, wall = kiln_loop(spec)
        kiln += ips[1:]
        kiln_wall += wall[1:]
    plain_ips, kiln_ips = max(plain), max(kiln)
    overhead = plain_ips / kiln_ips - 1
    train_images = len(cast(Sized, data.load_data(spec).train)) // BATCH * BATCH
    verdict = "meets" if overhead <= GOAL else "misses"
    return "\n".join(
        [
            f"Training-loop overhead: small-cnn on digits 32x32, batch {BATCH}, AdamW, {threads} threads, "
            f"{runs} run(s) x {epochs} epochs per loop (first epoch of each run left out), "
            f"{train_images} training images per epoch.",
            "",
            "| loop | training images/s (best) | (median) | wall s/epoch incl. validation + checkpoint | overhead |",
            "|---|---:|---:|---:|---:|",
            f"| plain (tutorial style) | {plain_ips:.0f} | {statistics.median(plain):.0f} | "
            f"{train_images / statistics.median(plain):.2f} (no validation) | - |",
            f"| kiln train() | {kiln_ips:.0f} | {statistics.median(kiln):.0f} | {statistics.median(kiln_wall):.2f} | "
            f"{overhead:+.1%} |",
            "",
            f"kiln's loop {verdict} the goal of at most {GOAL:.0%} overhead ({overhead:+.1%}).",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 runs of 2 epochs per loop instead of 4 runs of 3")
    print(main(parser.parse_args().quick))
