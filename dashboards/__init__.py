"""Grafana dashboards and provisioning as code (issue 8).

- :mod:`dashboards.measurements`: every InfluxDB measurement the dashboards read, written
  today or defined here for the components that will write it;
- :mod:`dashboards.model`: builders of Grafana's dashboard JSON model;
- :mod:`dashboards.influxql`: Grafana's query substitutions (``$timeFilter``, variables);
- :mod:`dashboards.boards`: the six dashboards;
- :mod:`dashboards.provisioning`: JSON files and provisioning YAML (``export``);
- :mod:`dashboards.push`: the Grafana HTTP API through grafana-client (``push``);
- :mod:`dashboards.command`: ``meshwatch dashboards``.
"""
