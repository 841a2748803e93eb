"""Readers of energy and activity sources (RAPL, NVML, procfs, cgroups, Slurm); one module each."""
