"""Launchers: Cloud TPU pod slices (tpu_pod.py), SLURM GPU clusters (slurm.sbatch), sweeps (sweep.py)."""
