"""Run kiln's benchmarks side by side on this machine and write one Markdown report.

Each table runs in its own subprocess (this script again, with --table), so a table that fails or hangs
costs only its own section, and the memory one table took is given back before the next starts. The report
opens with what the numbers depend on: cores, CPU model, memory, versions, the commit, and how busy the
machine was before and during each table. It is written to bench/results/<YYYY-MM-DD>.md
(<YYYY-MM-DD>-<tables>.md with --only) and printed.

    python bench/run.py --quick                  # `make bench-quick`: every CPU table, short settings
    python bench/run.py                          # `make bench`: the full settings
    python bench/run.py --quick --only operator  # one table (repeatable, or comma-separated)
    python bench/run.py --quick --repeat 3       # every table three times, in rounds, to show the spread

The operator table needs the control-plane binaries (KILN_TEST_BIN, as `make bench` sets it); the GPU table
runs only where `nvidia-smi` finds a GPU.

The report is rewritten after every table, so a run cut short still leaves what it measured. `--budget S`
caps the whole run: each table gets at most what is left of it, and tables that no longer fit are skipped.
SIGTERM or SIGINT (`timeout`, a job's deadline) stops the running table's whole process group, marks it
interrupted, and writes the report before exiting.
"""

import argparse
import datetime
import importlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import machine

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LOG_TAIL = 40
# Seconds of a --budget kept back for stopping the last table and writing the report.
BUDGET_RESERVE = 20.0
# The least a table is started with; with less budget left it is skipped.
MIN_TABLE_SECONDS = 30.0


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the runner: stop the running table, write the report, exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _ignore_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


@dataclass(frozen=True)
class Table:
    """One section of the report: the module that measures it and how long it may take."""

    name: str
    title: str
    module: str
    timeout_quick: float
    timeout_full: float
    gpu_only: bool = False


TABLES = (
    Table("train", "Training loop: kiln vs a plain PyTorch loop", "train_overhead", 600, 1800),
    Table("compile", "Compiled inference latency", "compile_latency", 900, 2400),
    Table("serving", "Serving under closed-loop load", "serving_load", 900, 2400),
    Table("operator", "Operator: TrainingJobs applied at once", "operator_apply", 600, 1800),
    Table("gpu", "GPU: training with AMP, compiled inference and serving on CUDA", "gpu", 600, 1200, gpu_only=True),
)
BY_NAME = {t.name: t for t in TABLES}


# -- running one table ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    table: Table
    status: str  # ok, failed, timed out, interrupted, skipped
    seconds: float
    markdown: str
    load_before: str
    load_after: str
    others: float | None = None  # cores other processes kept busy on average while the table ran
    signal: int | None = None  # the signal that interrupted it


def _nest(markdown: str, top: int) -> str:
    """Shift a module's own headings so its top level is `top` (below the runner's own headings)."""
    lines = markdown.strip().splitlines()
    levels = [len(line) - len(line.lstrip("#")) for line in lines if line.startswith("#")]
    shift = top - min(levels) if levels else 0
    return "\n".join("#" * shift + line if line.startswith("#") and shift > 0 else line for line in lines)


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_table(table: Table, quick: bool, work: Path, limit: float | None = None) -> Outcome:
    """Run one table in a child process in its own process group, killed whole on timeout (the table's, or
    ``limit`` when that is shorter) and when the runner is interrupted (the Outcome then says so)."""
    result, log = work / f"{table.name}.md", work / f"{table.name}.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--table", table.name, "--module", table.module]
    argv += ["--result", str(result), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if table.name == "train":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU table: kiln's loop would otherwise pick the GPU, the plain one not
    timeout = table.timeout_quick if quick else table.timeout_full
    timeout = timeout if limit is None else min(timeout, limit)
    before, began = machine.load_average(), time.monotonic()
    interrupted: Interrupted | None = None
    with log.open("wb") as out, machine.OthersLoad() as others:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            code: int | None = child.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        except Interrupted as err:
            code, interrupted = None, err
            _ignore_signals()  # a second signal must not cut the clean-up or the report short
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
    seconds = time.monotonic() - began
    if code == 0 and result.exists():
        return Outcome(table, "ok", seconds, result.read_text(), before, machine.load_average(), others.cores)
    if interrupted is not None:
        body = f"**Not measured: the run was stopped by {interrupted} after {seconds:.0f} s of this table.**"
        return Outcome(table, "interrupted", seconds, body, before, machine.load_average(), others.cores,
                       interrupted.signum)  # fmt: skip
    if code is None:
        status, why = "timed out", f"timed out after {timeout:.0f} s"
    else:
        status, why = f"failed (exit {code})", f"exited with {code}"
    body = f"**Not measured: the table {why}.** Last lines of its output:\n\n```\n{_tail(log)}\n```"
    return Outcome(table, status, seconds, body, before, machine.load_average(), others.cores)


def section(number: int, runs: list[Outcome], quick: bool) -> str:
    """The runner's heading for one table, then each run's command line, timing, load and the table itself."""
    table = runs[0].table
    command = shlex.join(["python", "bench/run.py", *(["--quick"] if quick else []), "--only", table.name])
    lines = [f"## {number}. {table.title}", ""]
    for index, outcome in enumerate(runs, start=1):
        if len(runs) > 1:
            lines += [f"### Run {index} of {len(runs)}", ""]
        others = (
            f" · other processes kept {outcome.others:.1f} cores busy meanwhile" if outcome.others is not None else ""
        )
        lines += [
            f"Command: `{command}` · {outcome.seconds:.0f} s · load average before / after: {outcome.load_before} → "
            f"{outcome.load_after}{others}",
            "",
            _nest(outcome.markdown, 3 if len(runs) == 1 else 4) if outcome.status == "ok" else outcome.markdown,
            "",
        ]
    return "\n".join(lines)


def summary(outcomes: list[Outcome]) -> str:
    def others(o: Outcome) -> str:
        return f"{o.others:.1f}" if o.others is not None else "n/a"

    lines = [
        "## Summary",
        "",
        "| table | run | status | seconds | cores other work kept busy |",
        "|---|---:|---|---:|---:|",
    ]
    runs: dict[str, int] = {}
    for o in outcomes:
        runs[o.table.name] = runs.get(o.table.name, 0) + 1
        lines.append(f"| {o.table.name} | {runs[o.table.name]} | {o.status} | {o.seconds:.0f} | {others(o)} |")
    return "\n".join(lines) + "\n"


# -- the child side ---------------------------------------------------------------------------------------------


def measure(name: str, module_name: str, quick: bool) -> str:
    """Import the table's module in this (child) process (bench/run.py, so bench/ is on the path) and return
    its Markdown."""
    if name == "operator":
        import cluster

        table: str = cluster.operator_table(quick)
        return table
    module = importlib.import_module(module_name)
    markdown: str = module.main(quick)
    return markdown


# -- main -------------------------------------------------------------------------------------------------------


def selected(only: list[str] | None) -> list[Table]:
    if not only:
        return list(TABLES)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"bench/run.py: unknown table(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    return [t for t in TABLES if t.name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="each table's short settings (minutes, not tens)")
    parser.add_argument("--only", action="append", metavar="NAME", help=f"run only these: {', '.join(BY_NAME)}")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every table N times, in rounds (all tables, then all again), to show the spread",
    )
    parser.add_argument("--output", type=Path, help="report path (default: bench/results/<date>[-<tables>].md)")
    parser.add_argument(
        "--budget", type=float, metavar="S", help="seconds for the whole run; tables that no longer fit are skipped"
    )
    parser.add_argument("--table", help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.table:  # child: measure one table and write its Markdown where the parent reads it
        markdown = measure(args.table, args.module or BY_NAME[args.table].module, args.quick)
        args.result.write_text(markdown)
        print(markdown)
        return 0

    tables = selected(args.only)
    today = datetime.date.today().isoformat()
    default = RESULTS / (f"{today}.md" if not args.only else f"{today}-{'-'.join(t.name for t in tables)}.md")
    out: Path = args.output or default
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_interrupted)
    outcomes: list[Outcome] = []
    interrupted: Interrupted | None = None
    header = "# kiln benchmarks (interrupted before the first table)\n"
    try:
        header = machine.describe(args.quick, sys.argv[1:], machine.busy_cores(3.0))
        gpu = machine.gpu() is not None
        with tempfile.TemporaryDirectory(prefix="kiln-bench-run-") as tmp:
            for round_ in range(1, max(1, args.repeat) + 1):
                for table in tables:
                    left = None if args.budget is None else args.budget - BUDGET_RESERVE - (time.monotonic() - began)
                    why_not = _why_not(table, gpu, left)
                    if why_not is not None:
                        if round_ == 1 or left is not None:
                            outcomes.append(_skipped(table, why_not))
                        continue
                    print(f"bench: {table.name} (round {round_}) ...", file=sys.stderr, flush=True)
                    outcome = run_table(table, args.quick, Path(tmp), left)
                    print(
                        f"bench: {table.name} {outcome.status} in {outcome.seconds:.0f} s", file=sys.stderr, flush=True
                    )
                    outcomes.append(outcome)
                    write_report(out, header, tables, outcomes, args.quick)
                    if outcome.signal is not None:
                        raise Interrupted(outcome.signal)
    except Interrupted as err:
        interrupted = err
        _ignore_signals()
    text = write_report(out, header, tables, outcomes, args.quick)
    print(text)
    print(f"bench: report written to {out}", file=sys.stderr)
    if interrupted is not None:
        return 128 + interrupted.signum
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


def _why_not(table: Table, gpu: bool, left: float | None) -> str | None:
    """Why ``table`` is not run now, or None to run it."""
    if table.gpu_only and not gpu:
        return "Not run: no GPU on this machine (`nvidia-smi` found none); see bench/gpu.sh."
    if left is not None and left < MIN_TABLE_SECONDS:
        return f"Not run: the run's --budget had {max(left, 0):.0f} s left, less than {MIN_TABLE_SECONDS:.0f} s."
    return None


def _skipped(table: Table, why: str) -> Outcome:
    return Outcome(table, "skipped", 0.0, why, machine.load_average(), machine.load_average())


def write_report(out: Path, header: str, tables: list[Table], outcomes: list[Outcome], quick: bool) -> str:
    """The report of what has run so far, written atomically (a reader never sees half of it)."""
    report = [header, summary(outcomes)]
    for number, table in enumerate(tables, start=1):
        runs = [o for o in outcomes if o.table is table]
        if runs:
            report.append(section(number, runs, quick))
    text = "\n".join(report)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return text


if __name__ == "__main__":
    sys.exit(main())
