"""Status reporting through the real Kubernetes client, against a local HTTP endpoint standing in for the API
server (reached through a real KUBECONFIG): what is sent, where, how often, and that failures never fail
training. The integration tier runs the same client against a real kube-apiserver."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import trainer_support as support

from kiln import api
from kiln.api import constants
from kiln_trainer import loop, status_reporter

STATUS_PATH = "/apis/kiln.dev/v1alpha1/namespaces/team-a/trainingjobs/digits/status"


@pytest.fixture
def apiserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[support.ApiServer]:
    server = support.ApiServer()
    monkeypatch.setenv("KUBECONFIG", str(support.write_kubeconfig(tmp_path / "kubeconfig", server.url)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the KUBECONFIG fallback
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_progress_is_sent_as_a_camelcase_merge_patch_to_the_status_subresource(apiserver: support.ApiServer) -> None:
    reporter = status_reporter.StatusReporter("digits", "team-a")
    reporter.progress(api.Progress(epoch=1, total_epochs=5, val_accuracy=0.5), last_checkpoint="/a/epoch-0001.pt")
    assert reporter.sent == 1
    (request,) = apiserver.requests
    assert request["path"] == STATUS_PATH
    assert request["content_type"] == "application/merge-patch+json"
    assert request["body"] == {
        "status": {
            "progress": {"epoch": 1, "totalEpochs": 5, "valAccuracy": 0.5},
            "lastCheckpoint": "/a/epoch-0001.pt",
        }
    }


def test_progress_is_throttled_and_the_final_report_always_goes_out_with_what_was_held_back(
    apiserver: support.ApiServer,
) -> None:
    reporter = status_reporter.StatusReporter("digits", "team-a", min_interval=3600)
    for epoch in (1, 2, 3):
        reporter.progress(api.Progress(epoch=epoch), last_checkpoint=f"/a/epoch-000{epoch}.pt")
    assert len(apiserver.requests) == 1
    reporter.final(api.Progress(epoch=3), api.Metrics(accuracy=0.9), ["overfitting: ..."], "/a/epoch-0003.pt")
    first, final = apiserver.statuses()
    assert first["progress"] == {"epoch": 1}
    assert final == {
        "progress": {"epoch": 3},
        "lastCheckpoint": "/a/epoch-0003.pt",
        "metrics": {"accuracy": 0.9},
        "warnings": ["overfitting: ..."],
    }


def test_a_failing_api_server_is_logged_and_never_raises(
    apiserver: support.ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.fail_with = 403
    reporter = status_reporter.StatusReporter("digits", "team-a", min_interval=0)
    reporter.progress(api.Progress(epoch=1))
    apiserver.server.shutdown()
    apiserver.server.server_close()
    reporter.progress(api.Progress(epoch=2))  # nothing listening any more
    assert reporter.failed == 2 and reporter.sent == 0
    assert "cannot patch trainingjob team-a/digits" in caplog.text


def test_the_model_report_is_retried_until_the_api_server_takes_it(apiserver: support.ApiServer) -> None:
    apiserver.unavailable_times = 2
    reporter = status_reporter.StatusReporter("digits", "team-a", retry_delays=(0.01, 0.01, 0.01))
    reporter.progress(api.Progress(epoch=3))  # refused: the progress is not retried
    reporter.model(api.ModelStatus(variant="fp32", uri="/artifacts/m.onnx"))
    assert (reporter.failed, reporter.sent) == (2, 1)
    assert apiserver.statuses()[-1] == {"model": {"variant": "fp32", "uri": "/artifacts/m.onnx"}}


def test_a_model_report_that_never_gets_through_raises_so_the_trainer_exits_non_zero(
    apiserver: support.ApiServer,
) -> None:
    apiserver.fail_with = 403
    reporter = status_reporter.StatusReporter("digits", "team-a", retry_delays=(0.01, 0.01))
    with pytest.raises(status_reporter.ReportError, match="cannot write status.model of trainingjob team-a/digits"):
        reporter.model(api.ModelStatus(variant="fp32"))
    assert len(apiserver.requests) == 3 and reporter.sent == 0


def test_without_the_operators_environment_nothing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(constants.ENV_TRAININGJOB_NAME, raising=False)
    reporter = status_reporter.StatusReporter.from_env()
    reporter.progress(api.Progress(epoch=1))
    assert not reporter.enabled and reporter.sent == reporter.failed == 0


def test_training_in_a_cluster_reports_progress_checkpoints_and_the_final_metrics(
    apiserver: support.ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(constants.ENV_TRAININGJOB_NAME, "digits")
    monkeypatch.setenv(constants.ENV_TRAININGJOB_NAMESPACE, "team-a")
    spec = support.spec(data={"maxSamples": 200}, training={"epochs": 2, "overfitGap": 0.01})
    with support.threads(1):
        result = loop.train(spec, tmp_path / "out", compile=False, log_format="json", status_interval=0)
    statuses = apiserver.statuses()
    assert all(r["path"] == STATUS_PATH for r in apiserver.requests)
    assert statuses[0]["progress"]["epoch"] == 0 and statuses[0]["progress"]["totalEpochs"] == 2
    assert [s["progress"]["epoch"] for s in statuses[1:]] == [1, 2, 2]
    assert statuses[1]["lastCheckpoint"] == str(tmp_path / "out" / "checkpoints" / "epoch-0001.pt")
    assert {"trainLoss", "valLoss", "valAccuracy", "samplesPerSecond", "etaSeconds", "updatedAt"} <= set(
        statuses[1]["progress"]
    )
    final = statuses[-1]
    assert final["metrics"] == result.metrics.to_dict()
    assert final["warnings"] == result.summary.warnings
    assert final["lastCheckpoint"].endswith("epoch-0002.pt") and "model" not in final  # nothing compiled
