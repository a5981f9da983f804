"""bench/run.py's time limits, partial reports and SIGTERM handling, with tiny fake tables in real
subprocesses: a table that finishes, and one that hangs (with a grandchild in its process group)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A fake table module: `ok` returns at once; `hang` writes its pid and its grandchild's, then sleeps.
FAKE_TABLES = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pathlib import Path

    def ok(quick):
        return "### fake ok table\\n\\n| x |\\n|---|\\n| 1 |\\n"

    def hang(quick):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(os.environ["FAKE_PIDS"]).write_text(f"{os.getpid()} {child.pid}")
        time.sleep(600)
    """
)

# Drives run.main() with the fake tables in place of the real ones (the child re-imports by --module).
DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import run
    tables = (
        run.Table("first", "A table that finishes", "fake_ok", 60, 60),
        run.Table("second", "A table that hangs", "fake_hang", float(sys.argv[2]), float(sys.argv[2])),
    )
    run.TABLES, run.BY_NAME = tables, {t.name: t for t in tables}
    sys.argv = ["run.py", *sys.argv[3:]]
    sys.exit(run.main())
    """
)


def _fakes(tmp_path: Path) -> Path:
    """Modules fake_ok and fake_hang, each with main(quick) -> the table above."""
    folder = tmp_path / "fakes"
    folder.mkdir()
    (folder / "fake_tables.py").write_text(FAKE_TABLES)
    (folder / "fake_ok.py").write_text("from fake_tables import ok as main\n")
    (folder / "fake_hang.py").write_text("from fake_tables import hang as main\n")
    (tmp_path / "driver.py").write_text(DRIVER)
    return folder


def _start(tmp_path: Path, hang_timeout: float, *args: str) -> subprocess.Popen[str]:
    fakes = _fakes(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fakes), os.environ.get("PYTHONPATH", "")])}
    env["FAKE_PIDS"] = str(tmp_path / "pids")
    argv = [sys.executable, str(tmp_path / "driver.py"), str(REPO / "bench"), str(hang_timeout), "--quick", *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _table_pids(tmp_path: Path) -> list[int]:
    return [int(p) for p in (tmp_path / "pids").read_text().split()]


def test_a_table_cut_by_the_budget_is_killed_with_its_process_group_and_the_report_keeps_the_others(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.md"
    # The hanging table may run 600 s by its own limit; the run's budget allows it about 35 s.
    runner = _start(tmp_path, 600, "--budget", "60", "--output", str(report))
    out, _ = runner.communicate(timeout=300)
    assert runner.returncode == 1, out
    text = report.read_text()
    assert "fake ok table" in text
    assert "| second | 1 | timed out |" in text
    assert not any(_alive(pid) for pid in _table_pids(tmp_path))


def test_sigterm_stops_the_running_table_and_leaves_a_report_of_what_finished(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    runner = _start(tmp_path, 600, "--output", str(report))
    try:
        # The report is written as each table finishes, before the run ends.
        _wait_for(lambda: report.exists() and "fake ok table" in report.read_text(), "the first table's report")
        _wait_for((tmp_path / "pids").exists, "the hanging table to start")
        pids = _table_pids(tmp_path)
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=120)
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM, out
    text = report.read_text()
    assert "fake ok table" in text
    assert "| second | 1 | interrupted |" in text
    assert "stopped by SIGTERM" in text
    _wait_for(lambda: not any(_alive(pid) for pid in pids), "the table's processes to end", 30)


def test_a_table_with_too_little_budget_left_is_skipped_and_says_why(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    runner = _start(tmp_path, 600, "--budget", "10", "--output", str(report))
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == 0, out
    text = report.read_text()
    assert "| first | 1 | skipped |" in text and "| second | 1 | skipped |" in text
    assert "--budget had" in text
    assert not (tmp_path / "pids").exists()
