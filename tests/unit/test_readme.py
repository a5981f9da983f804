"""README.md stays true: its configuration and metrics references are the generated ones, and it names the
two commands."""

from pathlib import Path

from kiln import metrics_reference
from kiln.api import reference

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_configuration_reference_is_generated_from_the_api() -> None:
    start, end = README.index(reference.BEGIN), README.index(reference.END) + len(reference.END)
    assert README[start:end] + "\n" == reference.configuration_reference(), (
        "regenerate with `python -m kiln.api.reference` and paste between the markers"
    )


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    two_commands = README.index("## The two commands")
    assert two_commands < README.index("make demo") < README.index("make test")
    assert README.index("make test") < README.index("## Configuration reference")
    ci = (ROOT / ".ci/run").read_text()
    assert "\nmake test\n" in ci


def test_the_readme_metrics_reference_is_generated_from_the_components_registries() -> None:
    start = README.index(metrics_reference.BEGIN)
    end = README.index(metrics_reference.END) + len(metrics_reference.END)
    assert README[start:end] + "\n" == metrics_reference.metrics_reference(metrics_reference.live_metrics()), (
        "regenerate with `python -m kiln.metrics_reference` and paste between the markers"
    )


def test_the_metrics_reference_names_each_metric_as_scraped_with_its_type_and_labels() -> None:
    rows = {row.name: row for row in metrics_reference.live_metrics()}
    assert rows["kiln_trainer_epoch_duration_seconds"].type == "gauge"
    assert rows["kiln_operator_phase_transitions_total"].labels == ("from", "to")
    assert rows["kiln_serving_model_ready"].labels == ("model", "version")
    assert len(rows) > 20 and all(name.startswith("kiln_") for name in rows)
