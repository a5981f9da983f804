"""What the final model is measured on once training ends (rank 0), beside what selected it: the held-out
test set, robustness under the requested attack, a clean pass over training images for the overfitting
check, and the pictures of the run. Nothing here feeds back into selection."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln import api
from kiln_trainer import data, evaluate, plots

log = logging.getLogger(__name__)


@dataclass
class FinalReport:
    """The final model's figures beyond validation."""

    clean_train_accuracy: float
    test: evaluate.Evaluation | None = None
    adversarial: api.AdversarialReport | None = None
    plots: list[Path] = field(default_factory=list)

    def metrics(self, validation: api.Metrics) -> api.Metrics:
        """The status's metrics: validation's, plus test and adversarial accuracy."""
        return validation.model_copy(
            update={
                "test_accuracy": self.test.accuracy if self.test is not None else None,
                "adversarial_accuracy": self.adversarial.accuracy if self.adversarial is not None else None,
            }
        )


def measure_final(
    spec: api.TrainingJobSpec,
    bundle: data.DataBundle,
    model: nn.Module,
    history: list[evaluate.EpochRecord],
    confusion_matrix: list[list[int]],
    *,
    device: torch.device,
    output_dir: Path,
) -> FinalReport:
    """Score ``model`` (the selected best, eval mode) on the test set, attack it, check it on clean training
    images, and draw the run's plots into ``output_dir/plots``."""
    loader = data.build_loader  # evaluation loaders: no augmentation, every image
    names = bundle.class_names
    clean = evaluate.evaluate(model, loader(data.clean_train_subset(bundle), spec, train=False), names, device=device)
    report = FinalReport(clean_train_accuracy=clean.accuracy)
    if bundle.test is not None:
        report.test = evaluate.evaluate(model, loader(bundle.test, spec, train=False), names, device=device)
        log.info("test set: accuracy %.4f on %d images", report.test.accuracy, report.test.samples)
    attack = spec.evaluation.adversarial
    if attack is not None:
        split = "test" if bundle.test is not None else "validation"
        images = bundle.test if bundle.test is not None else bundle.val
        accuracy = evaluate.adversarial_accuracy(
            model, loader(images, spec, train=False), attack, device=device, mean=bundle.mean, std=bundle.std
        )
        report.adversarial = api.AdversarialReport(
            attack=attack.attack,
            epsilon=attack.epsilon,
            steps=evaluate.attack_steps(attack)[0],
            step_size=evaluate.attack_steps(attack)[1],
            split=split,
            accuracy=accuracy,
        )
        log.info(
            "%s accuracy at epsilon %.4f pixels on the %s set: %.4f", attack.attack, attack.epsilon, split, accuracy
        )
    report.plots = plots.write_plots(output_dir, history, confusion_matrix, bundle.class_names)
    return report
