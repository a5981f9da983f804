"""Pure parts of the server: CPU quota from cgroup files, provider plans, shape checks, flags."""

import argparse
import os
from pathlib import Path

import pytest

from kiln import api
from kiln import cli as kiln_cli
from kiln.api import constants
from kiln_serving import codec, providers, serve_cli
from kiln_serving.config import ServingConfig, cpu_quota
from kiln_serving.errors import InvalidInput

CPUS = len(os.sched_getaffinity(0))


def cgroup_tree(tmp_path: Path, files: dict[str, str], own: str = "0::/\n") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own)
    return root, proc


def test_cgroup_v2_cpu_max_quota_rounds_up_to_whole_threads(tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "150000 100000\n"})
    assert cpu_quota(root, proc) == min(2, CPUS)


def test_cgroup_v2_quota_of_the_processs_own_group_counts(tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "100000 100000\n"},
                             own="0::/kubepods/pod1\n")  # fmt: skip
    assert cpu_quota(root, proc) == 1


def test_cgroup_v1_cfs_quota_is_read_and_minus_one_means_unlimited(tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
                                        "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                             own="4:cpu,cpuacct:/\n")  # fmt: skip
    assert cpu_quota(root, proc) == 1
    root, proc = cgroup_tree(
        tmp_path / "unlimited", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    assert cpu_quota(root, proc) == CPUS


def test_without_any_cgroup_files_the_affinity_mask_decides(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "nothing", tmp_path / "nothing-either") == CPUS


def test_provider_names_are_parsed_and_unknown_ones_refused() -> None:
    assert providers.parse("tensorrt,cuda,cpu") == (providers.TENSORRT, providers.CUDA, providers.CPU)
    assert providers.parse("auto") is None
    assert providers.parse("CPUExecutionProvider") == (providers.CPU,)
    with pytest.raises(ValueError, match="unknown provider 'tpu'"):
        providers.parse("tpu")


def test_provider_plan_prefers_accelerators_that_exist_and_keeps_cpu_last() -> None:
    gpu_build = [providers.TENSORRT, providers.CUDA, providers.CPU]
    auto = providers.plan(None, gpu_build, allow_cpu_fallback=False)
    assert auto.names() == gpu_build and auto.cpu_fallback_ok
    explicit = providers.plan((providers.CUDA,), [providers.CPU], allow_cpu_fallback=False)
    assert explicit.names() == [providers.CPU] and explicit.dropped == [providers.CUDA]
    assert "pass --allow-cpu-fallback" in (providers.check(explicit, [providers.CPU]) or "")
    assert providers.check(explicit, [providers.CUDA, providers.CPU]) is None
    assert providers.check(providers.plan((providers.CPU,), gpu_build, False), [providers.CPU]) is None


def test_tensorrt_gets_a_cache_folder_and_one_profile_for_every_batch_size(tmp_path: Path) -> None:
    profile = providers.tensorrt_profile([("input", (-1, 3, 32, 32))], max_batch_size=16)
    assert profile["trt_profile_min_shapes"] == "input:1x3x32x32"
    assert profile["trt_profile_max_shapes"] == "input:16x3x32x32"
    assert providers.tensorrt_profile([("input", (-1, 3, -1, -1))], 16) == {}
    plan = providers.plan((providers.TENSORRT,), [providers.TENSORRT, providers.CPU], False, tmp_path / "trt", profile)
    name, options = plan.providers[0]  # type: ignore[misc]
    assert name == providers.TENSORRT
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt") and (tmp_path / "trt").is_dir()


def test_shape_errors_say_what_was_expected_and_what_came() -> None:
    with pytest.raises(InvalidInput) as err:
        codec.check_shape("input", (-1, 3, 32, 32), (2, 3, 28, 28))
    assert str(err.value) == "input 'input': expected shape [-1,3,32,32], got [2,3,28,28]"
    codec.check_shape("input", (-1, 3, 32, 32), (7, 3, 32, 32))


def test_serve_flags_become_a_config_with_the_documented_defaults(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    defaults = serve_cli.config_from_args(parser.parse_args(["--model-dir", str(tmp_path)]))
    assert defaults.port == constants.SERVING_HTTP_PORT
    assert defaults.providers is None and defaults.intra_op_threads is None and defaults.batching
    args = parser.parse_args([
        "--model-dir", str(tmp_path), "--variant", "int8-static", "--model-name", "m", "--host", "127.0.0.1",
        "--port", "0", "--max-batch-size", "8", "--max-queue-delay-microseconds", "0", "--max-queue-size", "4",
        "--max-body-bytes", "1000", "--intra-op-threads", "3", "--providers", "cuda,cpu", "--allow-cpu-fallback",
        "--trt-cache-dir", str(tmp_path / "trt"), "--use-optimized",
    ])  # fmt: skip
    cfg = serve_cli.config_from_args(args)
    assert cfg == ServingConfig(
        model_dir=tmp_path, variant="int8-static", model_name="m", host="127.0.0.1", port=0, max_batch_size=8,
        max_queue_delay_microseconds=0, max_queue_size=4, max_body_bytes=1000, intra_op_threads=3,
        providers=(providers.CUDA, providers.CPU), allow_cpu_fallback=True, trt_cache_dir=tmp_path / "trt",
        use_optimized=True,
    )  # fmt: skip
    assert not cfg.batching and cfg.threads() == 3
    with pytest.raises(ValueError, match="max_batch_size: invalid value 0"):
        ServingConfig(model_dir=tmp_path, max_batch_size=0)


def test_kiln_serve_help_lists_the_serving_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        kiln_cli.main(["serve", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model-dir", "--variant", "--model-name", "--max-batch-size", "--max-queue-delay-microseconds",
                 "--max-queue-size", "--max-body-bytes", "--intra-op-threads", "--providers", "--allow-cpu-fallback",
                 "--trt-cache-dir", "--use-optimized"):  # fmt: skip
        assert flag in text


def test_serving_config_defaults_agree_with_the_serving_spec_and_from_spec_is_the_one_mapping(tmp_path: Path) -> None:
    spec, defaults = api.ServingSpec(), ServingConfig(model_dir=tmp_path)
    assert defaults.max_batch_size == spec.max_batch_size
    assert defaults.max_queue_delay_microseconds == spec.max_queue_delay_microseconds
    assert ServingConfig.from_spec(tmp_path, spec) == defaults  # "auto" leaves the choice to the card (None)
    chosen = ServingConfig.from_spec(tmp_path, api.ServingSpec(variant="int8-static", max_batch_size=4), port=0)
    assert (chosen.variant, chosen.max_batch_size, chosen.port) == ("int8-static", 4, 0)
