"""Observability around the server: SLOs, Prometheus rules, Grafana dashboards, traces,
structured logs, and `tokenmill watch` (incident detection)."""
