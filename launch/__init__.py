"""Launchers: TPU VM slices, SLURM GPU clusters, N local processes."""
