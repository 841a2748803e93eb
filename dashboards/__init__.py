"""greend's Grafana dashboards, built from code with grafana-foundation-sdk (`python -m dashboards.build`)."""
