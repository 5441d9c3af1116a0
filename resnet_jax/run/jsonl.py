"""WORKDIR/metrics.jsonl: one JSON row of named scalars per logged step, for scripts. Read
without clu or TensorFlow, so that quick commands (a finished run's) need neither."""

import json
import numbers

from etils import epath

JSONL = "metrics.jsonl"


def parse(lines: list[str], path: epath.Path) -> list[dict[str, float]]:
    """The rows of `lines`, each a JSON object with a step. The file is always written whole
    (`paths.write_text`), so any other line, the last one too, is corruption: ValueError
    naming the path and the line."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), numbers.Integral)):
            raise ValueError(f"{path}: line {number} is not a row of metrics (a JSON object with a "
                             f"step), so the file is corrupt: {line[:60]!r}")
        rows.append(row)
    return rows


def read_rows(workdir) -> list[dict[str, float]]:
    """The rows of WORKDIR/metrics.jsonl, local or in a bucket."""
    path = epath.Path(workdir) / JSONL
    return parse(path.read_text().splitlines(), path)
