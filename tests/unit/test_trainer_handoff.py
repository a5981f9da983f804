"""The whole trainer run, as a pod runs it: train digits, hand the best model to the compile step, find the
model card and the ONNX variants in the output folder, and the selected variant in the TrainingJob status."""

from pathlib import Path

import pytest
import trainer_support as support

from kiln import api
from kiln.api import constants
from kiln_trainer import checkpoint


@pytest.mark.slow
def test_training_digits_hands_the_best_model_to_the_compile_step_which_writes_the_model_card(
    tmp_path: Path,
) -> None:
    body = support.spec_dict(training={"epochs": 3}, export={"variants": ["fp32", "int8-dynamic"]})
    config = support.write_config(tmp_path / "job.yaml", body, name="digits-cnn")
    apiserver = support.ApiServer()
    env = support.trainer_env(
        KUBECONFIG=str(support.write_kubeconfig(tmp_path / "kubeconfig", apiserver.url)),
        KILN_TRAININGJOB_NAME="digits-cnn",
        KILN_TRAININGJOB_NAMESPACE="team-a",
    )
    try:
        result = support.run_trainer(config, tmp_path / "out", "--log-format", "json", env=env, timeout=900)
    finally:
        apiserver.server.shutdown()
    assert result.returncode == 0, result.stderr

    card = api.ModelCard.read(tmp_path / "out" / constants.MODEL_CARD_FILE)
    best = checkpoint.load_checkpoint(checkpoint.best_checkpoint_path(tmp_path / "out"))
    assert card.name == "digits-cnn" and card.class_names == [str(i) for i in range(10)]
    assert card.training == api.TrainingSummary.model_validate(best["summary"])
    assert card.metrics.accuracy == best["best_accuracy"]
    assert card.preprocessing.image_size == 32 and card.preprocessing.mean == [0.5, 0.5, 0.5]
    assert {v.name for v in card.variants} == {"fp32", "int8-dynamic"}
    for variant in card.variants:
        assert (tmp_path / "out" / variant.path).is_file()
    assert card.selected in {"fp32", "int8-dynamic"}

    # The last status patch names the selected variant by absolute path, with its checksum and figures.
    selected = card.variant(card.selected)
    model = apiserver.statuses()[-1]["model"]
    assert (
        model
        == api.ModelStatus(
            variant=selected.name,
            uri=str((tmp_path / "out" / selected.path).absolute()),
            sha256=selected.sha256,
            size_bytes=selected.size_bytes,
            accuracy=selected.accuracy,
            latency_ms=selected.latency_ms_batch32,
        ).to_dict()
    )
    assert apiserver.statuses()[-2]["metrics"] == card.metrics.to_dict()
