"""Grafana dashboards and provisioning as code (issue 8)."""
