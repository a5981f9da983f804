"""The server as a process: `python -m kiln_serving` serves tritonclient and exits cleanly on SIGTERM."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as triton
from serving_support import environment, images_batch, kiln_serve, reference, trained_folder

from kiln.api import constants


def test_python_m_kiln_serving_serves_tritonclient_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    with kiln_serve(folder) as served:
        assert any("model tiny ready" in line for line in served.log), "".join(served.log)
        client = triton.InferenceServerClient(f"127.0.0.1:{served.port}")
        assert client.is_server_ready()
        x = images_batch(2)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("tiny", [tensor]).as_numpy("logits")
        assert np.abs(got - reference(folder / "models" / "model.onnx", {"input": x})["logits"]).max() <= 1e-5
        client.close()
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0


def test_kiln_serve_exits_with_the_config_error_code_for_a_missing_model_dir(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "--model-dir", str(tmp_path / "absent")],
                          env=environment(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == constants.EXIT_CONFIG_ERROR
    assert f"--model-dir {tmp_path / 'absent'} does not exist" in done.stderr


def test_serve_local_serves_a_trained_folder_with_the_jobs_serving_settings(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    probe = (
        "import sys; from pathlib import Path; from kiln import api; from kiln_serving import serve_cli; "
        "spec = api.ServingSpec(variant='int8-static', max_batch_size=4); "
        "sys.exit(serve_cli.serve_local(Path(sys.argv[1]), 'digits', host='127.0.0.1', port=int(sys.argv[2]), "
        "serving=spec, grpc_port=0))"
    )
    with socket.socket() as s:  # a free port for the child; nothing else binds in between on a test machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", probe, str(folder), str(port)], env=environment(),
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "model digits ready" in line or "not ready" in line:
                break
        assert "model digits ready" in line, line
        meta = triton.InferenceServerClient(f"127.0.0.1:{port}").get_model_metadata("digits")
        assert meta["parameters"]["variant"] == "int8-static"
        assert meta["parameters"]["max_batch_size"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
