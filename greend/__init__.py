"""greend: per-job energy, carbon and water for research compute, and frugal routing of jobs."""

__version__ = "0.1.0"
