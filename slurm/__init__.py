"""Slurm: nodelist parsing, Slurm env -> rank env, sbatch rendering (no torch imports here)."""
