"""Prometheus rules, the Grafana dashboard and the helper that lists its queries (panels.py)."""
