"""Observability assets: the Grafana dashboard generator, Prometheus rules, the dashboard schema."""
