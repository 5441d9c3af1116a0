"""A run's directory and the checks before a run starts: paths local or remote (`paths`, through
etils.epath), checkpoints and their checksums, the one-run-per-workdir lock, metrics.jsonl
(`jsonl`), the terminal and WORKDIR/log.txt (`console`), the one-line refusals of bad input
(`validate`), and a checkpoint read beside a run still saving (`live`)."""
