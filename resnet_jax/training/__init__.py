"""Training: the run from its config to its last checkpoint (`loop`), the train state and the
jitted steps (`steps`), evaluation (`evaluation`, shared with the commands), stopping on a signal
(`preemption`), Sec. 4.2's warm-up (`warmup`), optimizers and schedules, metrics and their
writers (`metrics`, `writers`), ghost BN's running statistics, fine-tuning's starting weights, a finished run
recognised, and Ctrl-C in the commands (`interrupt`)."""
