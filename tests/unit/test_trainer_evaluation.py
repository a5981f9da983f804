"""Numbers a reader can trust: pixel-space FGSM/PGD against a closed form, per-class figures where a class
is missing, the overfitting verdict from a clean pass, weight decay and learning rates per parameter group."""

import numpy as np
import pytest
import torch
from torch import nn

from kiln import api
from kiln_trainer import evaluate, models, optimizers

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]


def _linear_model() -> nn.Module:
    """Two classes, logits linear in the normalised 1x1 RGB pixel: the loss gradient's sign is known."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 1.5]]))
        model[1].bias.zero_()
    return model.eval()


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_the_default_epsilon_is_eight_over_255_in_pixels() -> None:
    assert api.AdversarialSpec().epsilon == pytest.approx(8 / 255)


@pytest.mark.parametrize("attack", [{"attack": "fgsm"}, {"attack": "pgd", "steps": 5}])
def test_the_attack_moves_pixels_by_epsilon_along_the_gradient_sign_and_clamps_to_the_valid_range(
    attack: dict[str, object],
) -> None:
    spec = api.AdversarialSpec.model_validate({"epsilon": 0.1, **attack})
    # Pixels near both ends of [0, 1], so clamping matters for some channels.
    pixels = torch.tensor([[0.95, 0.02, 0.5], [0.3, 0.97, 0.04]]).view(2, 3, 1, 1)
    targets = torch.tensor([0, 0])
    adversarial = evaluate.attack(_linear_model(), _normalise(pixels), targets, spec, MEAN, STD)
    # Closed form: for class 0 the loss rises along sign(w1 - w0) / std = sign([-2, 3, 1]) in pixel space.
    direction = torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    expected = (pixels + 0.1 * direction).clamp(0, 1)
    torch.testing.assert_close(adversarial, _normalise(expected), atol=1e-5, rtol=0)


def test_the_attack_never_leaves_the_epsilon_ball_in_pixel_space_on_a_trained_cnn() -> None:
    torch.manual_seed(0)
    model = models.SmallCNN(10).eval()
    pixels = torch.rand(8, 3, 16, 16)
    spec = api.AdversarialSpec(attack="pgd", epsilon=8 / 255, steps=3)
    adversarial = evaluate.attack(model, _normalise(pixels), torch.arange(8) % 10, spec, MEAN, STD)
    back = adversarial * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert float((back - pixels).abs().max()) <= 8 / 255 + 1e-5
    assert float(back.min()) >= -1e-6 and float(back.max()) <= 1 + 1e-6
    assert float((back - pixels).abs().max()) > 4 / 255  # it did move


def test_a_class_missing_from_the_labels_has_no_recall_and_stays_out_of_the_macro_average() -> None:
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 1, 1, 1])
    score = evaluate.score(labels, predictions, ["a", "b", "c"], loss=0.1)
    absent = score.per_class[2]
    assert absent.support == 0 and absent.recall is None and absent.f1 is None and absent.precision is None
    assert score.recall == pytest.approx((0.5 + 1.0) / 2)
    held_out = score.held_out()
    assert held_out.samples == 4 and held_out.weighted_recall == pytest.approx(0.75)


def _record(epoch: int, train_loss: float, val: float) -> evaluate.EpochRecord:
    return evaluate.EpochRecord(epoch, train_loss, 0.5, 0.1, val, 100.0, 1.0)


def test_overfitting_is_judged_from_the_clean_training_pass_not_the_augmented_batches() -> None:
    history = [_record(1, 1.0, 0.70), _record(2, 0.8, 0.72)]  # augmented batch accuracy 0.5: looks fine
    assert evaluate.overfitting_warnings(history, 0.15, clean_train_accuracy=0.80) == []
    warnings = evaluate.overfitting_warnings(history, 0.15, clean_train_accuracy=0.99)
    assert len(warnings) == 1 and "0.9900 on training images but 0.7200" in warnings[0]


def test_overfitting_is_flagged_when_validation_falls_after_its_best_epoch_while_training_loss_falls() -> None:
    history = [_record(1, 1.0, 0.6), _record(2, 0.8, 0.8), _record(3, 0.6, 0.79), _record(4, 0.4, 0.75)]
    warnings = evaluate.overfitting_warnings(history, 0.5)
    assert len(warnings) == 1 and "fell from 0.8000 at epoch 2 to 0.7500 at epoch 4" in warnings[0]
    assert evaluate.overfitting_warnings(history[:3], 0.5) == []  # one epoch after the best is noise


def test_norm_and_bias_parameters_get_no_weight_decay_and_the_head_its_own_learning_rate() -> None:
    model = models.SmallCNN(10)
    training = api.TrainingSpec.model_validate(
        {"optimizer": {"name": "sgd", "learningRate": 0.1, "weightDecay": 0.05, "headLearningRateMultiplier": 10}}
    )
    optimizer = optimizers.build_optimizer(model, training)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            assert group["weight_decay"] == (0.05 if param.ndim > 1 else 0.0), name
            assert group["lr"] == pytest.approx(1.0 if name.startswith("classifier.") else 0.1), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


def test_freezing_holds_the_backbone_learning_rate_at_zero_for_the_first_epochs_only() -> None:
    training = api.TrainingSpec.model_validate({"epochs": 3, "freezeBackboneEpochs": 1, "scheduler": {"name": "none"}})
    optimizer = optimizers.build_optimizer(models.SmallCNN(10), training)
    scheduler, _ = optimizers.build_scheduler(optimizer, training, steps_per_epoch=1)  # the loop's order
    optimizers.hold_frozen(optimizer, training, epoch=1)
    assert [g["lr"] for g in optimizer.param_groups if not g["head"]] == [0.0, 0.0]
    assert optimizers.learning_rate(optimizer) == pytest.approx(1e-3)  # the head's, the rate in use
    optimizer.step()
    scheduler.step()
    optimizers.hold_frozen(optimizer, training, epoch=2)
    assert all(g["lr"] == pytest.approx(1e-3) for g in optimizer.param_groups)
