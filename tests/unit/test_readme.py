"""README.md stays true: its configuration reference is the generated one, and it names the two commands."""

import re
from pathlib import Path

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


def test_every_metric_in_the_readme_is_one_a_component_defines() -> None:
    sources = "".join(p.read_text() for d in ("operator", "trainer", "serving") for p in (ROOT / d).rglob("*.py"))
    reference = README[README.index("## Metrics reference") :]
    named = set(re.findall(r"`(kiln_(?:operator|trainer|serving)_[a-z_]+)`", reference))
    assert len(named) > 20
    for metric in named:
        base = re.sub(r"_total$", "", metric)
        assert f'"{base}"' in sources or f'"{metric}"' in sources, f"{metric} is not defined by any component"
