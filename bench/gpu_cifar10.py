"""The seed's case for real: ResNet50 with the CIFAR stem on CIFAR-10 (50,000 training images, the official
10,000-image test batch), kiln's train() against a plain loop in the style of torchvision's classification
reference on the same recipe, side by side: test accuracy after N epochs and training images/s.

Recipe (both sides): SGD momentum 0.9, lr 0.1 × batch/256, weight decay 5e-4 (kiln: not on norm and bias,
the reference decays every parameter, as its default does), cosine schedule, label smoothing 0.1, random crop
with 4-pixel padding and horizontal flip, bf16 autocast on a GPU that supports it. The first epoch's
throughput is warm-up and left out.

    python bench/gpu_cifar10.py --data /data/cifar10 --epochs 5   # called by bench/gpu.sh
    python bench/gpu_cifar10.py --quick --device cpu              # smoke test on a generated tiny folder

Nothing is downloaded: without the CIFAR-10 folder (cifar-10-batches-py/) the table says so and exits 0.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for root in (REPO, REPO / "trainer", REPO / "tests" / "unit"):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from kiln import api  # noqa: E402
from kiln_trainer import loop, models  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def kiln_spec(folder: Path, epochs: int, batch: int, workers: int) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(
        {
            "model": {"architecture": "resnet50", "stem": "cifar"},
            "data": {
                "dataset": "cifar10",
                "path": str(folder),
                "numWorkers": workers,
                "validationSplit": 0.02,
                "augment": {"randomCrop": True, "horizontalFlip": True},
            },
            "training": {
                "epochs": epochs,
                "batchSize": batch,
                "optimizer": {"name": "sgd", "learningRate": 0.1 * batch / 256, "weightDecay": 5e-4},
                "scheduler": {"name": "cosine"},
                "labelSmoothing": 0.1,
            },
        }
    )


def run_kiln(spec: api.TrainingJobSpec) -> tuple[float, float]:
    """(test accuracy, images/s after the first epoch) of kiln's train()."""
    with tempfile.TemporaryDirectory() as out:
        result = loop.train(spec, Path(out), compile=False, log_format="json")
    speeds = [h.samples_per_second for h in result.history[1:]] or [result.history[0].samples_per_second]
    assert result.final is not None and result.final.test is not None
    return result.final.test.accuracy, sum(speeds) / len(speeds)


def run_reference(spec: api.TrainingJobSpec, device: torch.device) -> tuple[float, float]:
    """The same recipe as a plain loop over torchvision's CIFAR10 dataset, the way the reference scripts write it."""
    cfg, folder = spec.training, Path(spec.data.path or "")
    augment = v2.Compose(
        [v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    )
    plain = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    root = folder if (folder / "cifar-10-batches-py").is_dir() else folder.parent
    train_set = torchvision.datasets.CIFAR10(
        str(root), train=True, transform=v2.Compose([augment, v2.Normalize(MEAN, STD)])
    )
    test_set = torchvision.datasets.CIFAR10(
        str(root), train=False, transform=v2.Compose([plain, v2.Normalize(MEAN, STD)])
    )
    workers = spec.data.num_workers
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True, pin_memory=True
    )
    model = models.build_model(spec, 10).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.learning_rate, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    speeds = []
    for _ in range(cfg.epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for images, targets in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        speeds.append(seen / (time.perf_counter() - start))
        scheduler.step()
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for images, targets in torch.utils.data.DataLoader(test_set, batch_size=512, num_workers=workers):
            correct += int((model(images.to(device)).argmax(1).cpu() == targets).sum())
    kept = speeds[1:] or speeds
    return correct / len(test_set), sum(kept) / len(kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("KILN_CIFAR10", "/data/cifar10")))
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("KILN_CIFAR10_EPOCHS", "5")))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a generated 40-image folder, 1 epoch: code paths only")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    lines = ["## ResNet50 (CIFAR stem) on CIFAR-10: kiln train() vs a plain reference loop", ""]
    with tempfile.TemporaryDirectory() as scratch:
        folder, epochs, batch = args.data, args.epochs, args.batch_size
        if args.quick:
            import trainer_support  # tests/unit: the generated CIFAR-10-format folder

            folder, epochs, batch = trainer_support.write_cifar10(Path(scratch) / "cifar", per_batch=8), 1, 8
        if not ((folder / "cifar-10-batches-py").is_dir() or (folder / "data_batch_1").is_file()):
            lines.append(f"CIFAR-10 not found at {folder} (set --data or KILN_CIFAR10); nothing measured.")
        else:
            spec = kiln_spec(folder, epochs, batch, workers=0 if args.quick else 8)
            torch.manual_seed(0)
            kiln_accuracy, kiln_speed = run_kiln(spec)
            torch.manual_seed(0)
            ref_accuracy, ref_speed = run_reference(spec, torch.device(args.device))
            lines += [
                f"{epochs} epochs, batch {batch}, device {args.device}",
                "",
                "| loop | test accuracy | train images/s |",
                "|---|---|---|",
                f"| kiln train() | {100 * kiln_accuracy:.2f}% | {kiln_speed:.0f} |",
                f"| reference loop | {100 * ref_accuracy:.2f}% | {ref_speed:.0f} |",
                f"| ratio kiln/reference | | {kiln_speed / max(ref_speed, 1e-9):.2f} |",
            ]
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
