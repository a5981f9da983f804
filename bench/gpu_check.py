"""The checks of bench/gpu-check.sh, one per subcommand, each printing what it found as Markdown.

Exit status: 0 passed, 1 failed, 3 not run here (no CUDA device). `--device cpu` runs the same code paths on
the CPU (gloo for NCCL, onnxruntime's CPU provider for CUDA) to smoke-test the script on a machine without a GPU;
KILN_GPU_CHECK_SMOKE=1 (gpu-check.sh --cpu sets it) trains on 300 images instead of all of digits.

    python bench/gpu_check.py env
    python bench/gpu_check.py train --work /tmp/w      # then resume-gpu, resume-cpu, variants, serve, with --work
    python bench/gpu_check.py nccl --device cpu
"""

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for root in (REPO, REPO / "trainer", REPO / "serving", REPO / "bench"):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

PASSED, FAILED, NOT_HERE = 0, 1, 3
CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
# A small real run: digits, small-cnn, fp16 with clipping, every variant (TensorRT's int8 graph included).
SPEC: dict[str, Any] = {
    "model": {"architecture": "small-cnn"},
    "data": {"dataset": "digits", "imageSize": 32, "numWorkers": 2},
    "training": {"epochs": 2, "batchSize": 64, "mixedPrecision": "fp16", "gradientClipNorm": 1.0,
                 "optimizer": {"name": "adamw", "learningRate": 0.001}, "scheduler": {"name": "none"}},
    "export": {"variants": ["fp32", "fp16", "int8-dynamic", "int8-static"], "calibration": {"samples": 128}},
    "serving": {"gpu": True},
}  # fmt: skip


def _env(device: str) -> dict[str, str]:
    paths = [str(REPO), str(REPO / "trainer"), str(REPO / "serving"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _cuda(device: str) -> bool:
    """Whether this check can run: a CUDA device for --device cuda; always on --device cpu."""
    if device == "cpu":
        return True
    import torch

    if torch.cuda.is_available():
        return True
    print("no CUDA device: not run")
    return False


# -- environment ------------------------------------------------------------------------------------------------


def _missing_libraries(library: Path) -> list[str]:
    """What the loader cannot find for ``library`` (ldd's "not found" lines)."""
    try:
        out = subprocess.run(["ldd", str(library)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return [f"ldd failed: {err}"]
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def check_env(device: str) -> int:
    """Driver, torch and its CUDA, native bf16, onnxruntime's providers and what their libraries lack."""
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                          "--format=csv,noheader"], capture_output=True, text=True, check=False) if _which(
        "nvidia-smi") else None  # fmt: skip
    print(f"- nvidia-smi: {smi.stdout.strip() if smi and smi.returncode == 0 else 'not found / no GPU'}")
    import torch

    print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"- device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
        print(f"- bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}, "
              f"with emulation: {torch.cuda.is_bf16_supported()}")  # fmt: skip
        nccl = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
        print(f"- NCCL {nccl}, cuDNN {torch.backends.cudnn.version()}")  # type: ignore[no-untyped-call]
    import onnxruntime as ort

    print(f"- onnxruntime {ort.__version__}, providers: {', '.join(ort.get_available_providers())}")
    capi = Path(ort.__file__).parent / "capi"
    for name in ("cuda", "tensorrt"):
        library = capi / f"libonnxruntime_providers_{name}.so"
        if not library.exists():
            print(f"- {library.name}: not in this onnxruntime build")
            continue
        missing = _missing_libraries(library)
        print(f"- {library.name}: {'missing ' + ', '.join(missing) if missing else 'all libraries found'}")
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return NOT_HERE
    return PASSED


def _which(name: str) -> bool:
    return any((Path(p) / name).exists() for p in os.environ.get("PATH", "").split(os.pathsep) if p)


# -- training and resume ----------------------------------------------------------------------------------------


def _train(work: Path, output: Path, device: str, *, compile: bool) -> subprocess.CompletedProcess[str]:
    import yaml

    config = work / "job.yaml"
    spec: dict[str, Any] = copy.deepcopy(SPEC)
    if os.environ.get("KILN_GPU_CHECK_SMOKE") == "1":
        spec["data"]["maxSamples"], spec["export"]["calibration"]["samples"] = 300, 32
    config.write_text(yaml.safe_dump({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
                                      "metadata": {"name": "gpu-check"}, "spec": spec}))  # fmt: skip
    print(f"- `kiln train` into {output} on {device} ...", flush=True)
    argv = [sys.executable, "-m", "kiln.cli", "train", "--config", str(config), "--output", str(output),
            "--metrics-port", "0", "--log-format", "json", *([] if compile else ["--no-compile"])]  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(device), check=False)
    print(f"- `kiln train` ({'with' if compile else 'without'} compile) on {device}: exit {done.returncode} "
          f"in {time.monotonic() - began:.0f} s")  # fmt: skip
    epochs = [json.loads(line) for line in done.stdout.splitlines() if '"event": "epoch"' in line]
    for epoch in epochs:
        print(f"  - epoch {epoch.get('epoch')}: val accuracy {epoch.get('val_accuracy')}, "
              f"{epoch.get('samples_per_second', 0):.0f} samples/s")  # fmt: skip
    if done.returncode != 0:
        print("```\n" + "\n".join(done.stderr.strip().splitlines()[-25:]) + "\n```")
    return done


def _summary(output: Path) -> str:
    from kiln_trainer import checkpoint

    best = checkpoint.load_checkpoint(checkpoint.best_checkpoint_path(output))
    summary = best.get("summary", {})
    return f"device {summary.get('device')}, best accuracy {best.get('best_accuracy')}"


def check_train(work: Path, device: str) -> int:
    """fp16 + gradient clipping on the GPU, then the compile step (measured on CUDA, TensorRT's int8 too)."""
    if not _cuda(device):
        return NOT_HERE
    done = _train(work, work / "gpu-run", device, compile=True)
    if done.returncode != 0:
        return FAILED
    print(f"- {_summary(work / 'gpu-run')}")
    card = json.loads((work / "gpu-run" / "model-card.json").read_text())
    for v in card["variants"]:
        print(
            f"  - {v['name']}: accuracy {v.get('accuracy')}, {v.get('latencyMsBatch32')} ms at batch 32 on "
            f"{v.get('provider')}{', TensorRT graph ' + v['tensorrtPath'] if v.get('tensorrtPath') else ''}"
        )
    print(f"- selected {card['selected']}: {card['selectionReason']}")
    return PASSED


def _resume(output: Path, work: Path, device: str) -> int:
    """Drop the last epoch checkpoint so the run resumes from the one before, then train again."""
    from kiln_trainer import checkpoint

    found = checkpoint.epoch_checkpoints(output)
    if len(found) < 2:
        print(f"- {output} has {len(found)} epoch checkpoint(s); need 2")
        return FAILED
    found[-1][1].unlink()
    done = _train(work, output, device, compile=False)
    resumed = "resuming from" in done.stderr
    print(f"- resumed from epoch {found[-2][0]}: {resumed}")
    return PASSED if done.returncode == 0 and resumed else FAILED


def check_resume_gpu(work: Path, device: str) -> int:
    """The GPU run's checkpoint (fp16 scaler, CUDA RNG) resumed on the GPU."""
    if not _cuda(device):
        return NOT_HERE
    return _resume(work / "gpu-run", work, device)


def check_resume_cpu(work: Path, device: str) -> int:
    """A checkpoint written on the CPU (no scaler state, no CUDA RNG) resumed with fp16 on the GPU."""
    if not _cuda(device):
        return NOT_HERE
    output = work / "cpu-run"
    if _train(work, output, "cpu", compile=False).returncode != 0:
        return FAILED
    return _resume(output, work, device)


# -- compiled variants ------------------------------------------------------------------------------------------


def check_variants(work: Path, device: str) -> int:
    """Every variant (and the TensorRT graph) opened on the CPU and on CUDA, fallback off; outputs compared."""
    if not _cuda(device):
        return NOT_HERE
    import onnxruntime as ort

    from kiln.api import ModelCard

    run = work / "gpu-run"
    card = ModelCard.read(run / "model-card.json")
    batch = np.random.default_rng(0).standard_normal((32, *card.input.shape[1:])).astype(np.float32)
    accelerator = CUDA if device == "cuda" else CPU
    status = PASSED
    print("| file | CPU | " + accelerator + " | max abs diff |\n|---|---|---|---:|")
    for variant in card.variants:
        for path in filter(None, (variant.path, variant.tensorrt_path)):
            outputs, cells = [], []
            for provider in (CPU, accelerator):
                try:
                    chain = [provider] if provider == CPU else [provider, CPU]
                    session = ort.InferenceSession(str(run / path), providers=chain)
                    session.disable_fallback()
                    outputs.append(session.run(None, {card.input.name: batch})[0])
                    cells.append(session.get_providers()[0])
                except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types; report them all
                    cells.append(f"FAILED: {str(err).splitlines()[0][:160]}")
                    status = FAILED
            if provider != CPU and cells[-1] != provider:
                status = FAILED
            diff = f"{np.abs(outputs[0] - outputs[1]).max():.3g}" if len(outputs) == 2 else "n/a"
            print(f"| {path} | {cells[0]} | {cells[-1]} | {diff} |")
    return status


def check_nccl(device: str) -> int:
    """World size 1: NCCL all-reduce on the GPU and the gloo groups kiln uses beside it."""
    if not _cuda(device):
        return NOT_HERE
    import datetime

    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device == "cuda" else "gloo"
    target = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        value = torch.ones(4, device=target)
        dist.all_reduce(value)
        dist.barrier(device_ids=[0] if device == "cuda" else None)
        control = dist.new_group(backend="gloo")
        assert isinstance(control, dist.ProcessGroup)
        flag = torch.ones(1, dtype=torch.int32)
        dist.all_reduce(flag, group=control)
        print(f"- {backend} all-reduce on {target}: {value.tolist()}; gloo control group: {flag.tolist()}")
    finally:
        dist.destroy_process_group()
    return PASSED


# -- serving ----------------------------------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check_serve(work: Path, device: str) -> int:
    """`kiln serve --providers cuda,cpu` (cpu on --device cpu) on fp16 and int8-static: the provider the
    server reports, resident memory, one inference."""
    if not _cuda(device):
        return NOT_HERE
    import urllib.request

    import gpu_serving

    providers = "cuda,cpu" if device == "cuda" else "cpu"
    status = PASSED
    for variant in ("fp16", "int8-static"):
        argv = [sys.executable, "-m", "kiln_serving", "--model-dir", str(work / "gpu-run"), "--variant", variant,
                "--model-name", "m", "--host", "127.0.0.1", "--providers", providers, "--log-level", "warning",
                "--port"]  # fmt: skip
        try:
            started: list[subprocess.Popen[bytes]] = []
            with gpu_serving.server(argv, work / f"serve-{variant}.log", started) as port:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/m", timeout=30) as reply:
                    meta = json.loads(reply.read())
                x = np.zeros((1, 3, 32, 32), np.float32)
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(gpu_serving.request(x))
                    answered = s.recv(64).startswith(b"HTTP/1.1 200")
                rss = _rss_mib(started[0].pid)
                params = meta.get("parameters", {})
                print(f"- {variant}: provider {params.get('provider')} ({', '.join(params.get('providers', []))}), "
                      f"file {params.get('file')}, RSS {rss:.0f} MiB, inference answered: {answered}")  # fmt: skip
                if not answered or (device == "cuda" and params.get("provider") == CPU):
                    status = FAILED
        except RuntimeError as err:
            print(f"- {variant}: FAILED: {err}")
            status = FAILED
    return status


def check_bench(device: str, budget: float, report: Path) -> int:
    """The GPU table of bench/run.py in quick mode within ``budget`` (on --device cpu: bench/gpu.py's smoke test)."""
    if device == "cpu":
        argv = [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--quick"]
    elif not _cuda(device):
        return NOT_HERE
    else:
        argv = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", "gpu", "--budget", str(budget),
                "--output", str(report)]  # fmt: skip
    return PASSED if subprocess.run(argv, env=_env(device), check=False).returncode == 0 else FAILED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("check", choices=["env", "train", "resume-gpu", "resume-cpu", "variants", "nccl", "serve",
                                          "bench-gpu"])  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiln-gpu-check"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--budget", type=float, default=240.0, help="bench-gpu: seconds for bench/run.py")
    parser.add_argument("--report", type=Path, default=Path("bench-gpu-report.md"), help="bench-gpu: its report")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checks = {
        "env": lambda: check_env(args.device),
        "train": lambda: check_train(args.work, args.device),
        "resume-gpu": lambda: check_resume_gpu(args.work, args.device),
        "resume-cpu": lambda: check_resume_cpu(args.work, args.device),
        "variants": lambda: check_variants(args.work, args.device),
        "nccl": lambda: check_nccl(args.device),
        "serve": lambda: check_serve(args.work, args.device),
        "bench-gpu": lambda: check_bench(args.device, args.budget, args.report),
    }
    code: int = checks[args.check]()
    return code


if __name__ == "__main__":
    sys.exit(main())
