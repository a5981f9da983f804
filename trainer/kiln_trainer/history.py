"""The per-epoch history as a file a reader can open (history.csv beside the checkpoints) and as the model
card's ``history``; both come from the loop's EpochRecords, rewritten whole after every epoch."""

import csv
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

from kiln import api
from kiln.api import constants
from kiln_trainer import evaluate

COLUMNS = [f.name for f in dataclasses.fields(evaluate.EpochRecord)]


def write_csv(output_dir: Path, history: Sequence[evaluate.EpochRecord]) -> Path:
    """Write ``output_dir/history.csv`` atomically (a reader never sees half a file)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(record).items()})
    path = output_dir / constants.HISTORY_FILE
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(path)
    return path


def read_csv(path: Path) -> list[evaluate.EpochRecord]:
    """The records back from a history.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        evaluate.EpochRecord(
            epoch=int(row["epoch"]),
            **{k: float(row[k]) for k in COLUMNS if k not in ("epoch", "learning_rate")},
            learning_rate=float(row["learning_rate"]) if row.get("learning_rate") else None,
        )
        for row in rows
    ]


def to_card(history: Sequence[evaluate.EpochRecord]) -> list[api.EpochHistory]:
    return [api.EpochHistory.model_validate(dataclasses.asdict(h)) for h in history]
