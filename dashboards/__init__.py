"""Grafana dashboards and provisioning as code (issue 8).

What they read is the measurement contract, :mod:`meshwatch.contract.measurements`.

- :mod:`dashboards.model`: builders of Grafana's dashboard JSON model;
- :mod:`dashboards.influxql`: Grafana's query substitutions (``$timeFilter``, variables);
- :mod:`dashboards.boards`: the six dashboards;
- :mod:`dashboards.provisioning`: JSON files and provisioning YAML (``export``);
- :mod:`dashboards.push`: the Grafana HTTP API through grafana-client (``push``);
- :mod:`dashboards.command`: ``meshwatch dashboards``.
"""
