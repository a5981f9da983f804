"""The fine-tuning recipe in one real run on digits (EMA, mixup/CutMix, gradient accumulation, backbone
freezing, the learning rate as used, a test split, PGD), and what the run leaves: history.csv, PNG plots,
and a model card with test metrics, history and plots."""

import csv
import math

import pytest
import torch
import trainer_support as support
from PIL import Image

from kiln import api, local
from kiln.api import constants
from kiln_trainer import checkpoint, ema, loop, mixup, models

SPEC = {
    "model": {"architecture": "small-cnn"},
    "data": {"maxSamples": 300, "imageSize": 16, "testSplit": 0.1},
    "training": {
        "epochs": 2,
        "batchSize": 32,
        "optimizer": {"name": "adamw", "learningRate": 0.004},
        "scheduler": {"name": "step", "stepSize": 1, "gamma": 0.5},
        "gradientAccumulationSteps": 2,
        "freezeBackboneEpochs": 1,
        "ema": {"decay": 0.9},
        "mixup": {"mixupAlpha": 0.2, "cutmixAlpha": 1.0},
        "keepCheckpoints": 2,
    },
    "evaluation": {"adversarial": {"attack": "pgd", "steps": 2}},
    "export": {"variants": ["fp32"]},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> loop.TrainResult:
    with support.threads(2):
        return loop.train(support.spec(**SPEC), tmp_path_factory.mktemp("recipe"), log_format="json")


def test_the_learning_rate_in_the_history_is_the_one_each_epoch_used(run: loop.TrainResult) -> None:
    assert [h.learning_rate for h in run.history] == pytest.approx([0.004, 0.002])


def test_gradient_accumulation_takes_one_optimizer_step_per_two_batches(run: loop.TrainResult) -> None:
    last = checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(run.output_dir, 2))
    batches = (300 - 60 - 30) // 32  # training images after validation and test splits, last short batch dropped
    assert last["step"] == 2 * math.ceil(batches / 2)


def test_the_backbone_stays_frozen_for_the_first_epoch_while_the_head_trains(run: loop.TrainResult) -> None:
    spec = support.spec(**SPEC)
    loop._seed(spec.training.seed)
    initial = models.build_model(spec, 10).state_dict()
    first = checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(run.output_dir, 1))["model"]
    second = checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(run.output_dir, 2))["model"]
    assert torch.equal(first["features.0.weight"], initial["features.0.weight"])
    assert not torch.equal(first["classifier.2.weight"], initial["classifier.2.weight"])
    assert not torch.equal(second["features.0.weight"], initial["features.0.weight"])


def test_the_best_model_is_the_weights_average_when_ema_is_on(run: loop.TrainResult) -> None:
    best = checkpoint.load_checkpoint(run.best_checkpoint)
    at_best = checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(run.output_dir, best["epoch"]))
    for key, value in best["model"].items():
        assert torch.equal(value, at_best["ema"]["module"][key]), key
    assert not torch.equal(at_best["model"]["features.0.weight"], best["model"]["features.0.weight"])


def test_the_test_split_is_scored_once_on_the_final_model_and_on_each_variant(run: loop.TrainResult) -> None:
    assert run.final is not None and run.final.test is not None and run.final.test.samples == 30
    assert run.metrics.test_accuracy == run.final.test.accuracy
    card = run.model_card
    assert card is not None and card.test_metrics is not None and card.test_metrics.samples == 30
    assert len(card.test_metrics.per_class) == 10
    assert card.variant("fp32").test_accuracy == pytest.approx(card.test_metrics.accuracy, abs=1 / 30)
    assert card.training.test_accuracy == card.test_metrics.accuracy
    assert card.training.clean_train_accuracy is not None


def test_the_card_records_the_attack_its_epsilon_and_space(run: loop.TrainResult) -> None:
    card = run.model_card
    assert card is not None and card.adversarial is not None
    report = card.adversarial
    assert (report.attack, report.space, report.split, report.steps) == ("pgd", "pixel", "test", 2)
    assert report.epsilon == pytest.approx(8 / 255) and report.step_size == pytest.approx(2.5 * 8 / 255 / 2)
    assert run.metrics.adversarial_accuracy == report.accuracy


def test_the_history_is_written_as_csv_and_into_the_card(run: loop.TrainResult) -> None:
    with open(run.output_dir / constants.HISTORY_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["val_accuracy"]) for r in rows] == pytest.approx([h.val_accuracy for h in run.history])
    assert run.model_card is not None
    assert [h.learning_rate for h in run.model_card.history] == pytest.approx([0.004, 0.002])


def test_the_plots_are_real_pngs_referenced_by_the_card_and_printed_by_kiln_run(run: loop.TrainResult) -> None:
    card = run.model_card
    assert card is not None
    assert card.plots == [
        f"{constants.PLOTS_DIR}/{n}.png" for n in ("loss", "accuracy", "learning-rate", "confusion-matrix")
    ]
    for plot in card.plots:
        with Image.open(run.output_dir / plot) as image:
            assert image.format == "PNG" and image.width >= 100 and image.height >= 100
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 2  # more than a blank page
    table = local.summary_table(card)
    assert f"test accuracy {100 * card.test_metrics.accuracy:.2f}%" in table  # type: ignore[union-attr]
    assert "plots/confusion-matrix.png" in table


def test_mixup_blends_images_and_targets_by_the_same_share() -> None:
    torch.manual_seed(0)
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    mixer = mixup.Mixer(api.MixupSpec(mixup_alpha=0.4, cutmix_alpha=0.0), num_classes=3)
    mixed, targets = mixer(images, torch.tensor([0, 2]))
    share = float(mixed[0].mean())  # image 0 is zeros: what shows is its partner's share
    assert 0 < share < 1 and targets[0].tolist() == pytest.approx([1 - share, 0, share])
    assert targets.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_cutmix_pastes_a_box_and_weighs_targets_by_its_area() -> None:
    torch.manual_seed(3)
    images = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    mixer = mixup.Mixer(api.MixupSpec(mixup_alpha=0.0, cutmix_alpha=1.0), num_classes=2)
    mixed, targets = mixer(images, torch.tensor([0, 1]))
    pasted = float(mixed[0].mean())  # the share of image 0 covered by image 1's box
    assert set(mixed[0].unique().tolist()) <= {0.0, 1.0}
    assert targets[0].tolist() == pytest.approx([1 - pasted, pasted])


def test_ema_averages_parameters_with_the_decay_after_its_warmup() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    average = ema.Ema(model, api.EmaSpec(decay=0.5, warmup_steps=0))
    torch.nn.init.constant_(model.weight, 4.0)
    average.update(model)
    average.update(model)
    assert float(average.module.weight) == pytest.approx(3.0)  # 0 -> 2 -> 3
