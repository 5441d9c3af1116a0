"""Training: the run from its config to its last checkpoint (`loop`), optimizers and schedules,
metrics and their writers, ghost BN's running statistics, fine-tuning's starting weights, a
finished run recognised, and Ctrl-C in the commands (`interrupt`)."""
