"""WORKDIR/metrics.jsonl: one JSON row of named scalars per logged step, for scripts. Read
without clu or TensorFlow, so that quick commands (a finished run's) need neither."""

import json

from absl import logging
from etils import epath

JSONL = "metrics.jsonl"


def parse(lines: list[str], path: epath.Path) -> list[dict[str, float]]:
    rows = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise ValueError(f"{path}: line {number + 1} is not JSON") from None
            # The last line cut short by a write that did not finish (a full disk).
            logging.warning("%s: dropped its last line, which is incomplete: %r", path, line[:80])
    return rows


def read_rows(workdir) -> list[dict[str, float]]:
    """The rows of WORKDIR/metrics.jsonl, local or in a bucket."""
    path = epath.Path(workdir) / JSONL
    return parse(path.read_text().splitlines(), path)
