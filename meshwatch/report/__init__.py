"""The demo's report: what ``meshwatch demo`` measured, in the terminal and as ``report.html``.

- :mod:`meshwatch.report.timing`: wall-clock stamps the demo takes at each stage (edge
  publication, arrival in the mesh, commit to the lake, alert in the mesh), and the latencies
  and throughput computed from them;
- :mod:`meshwatch.report.detection`: the dataflow's alerts scored against the simulator's
  ground truth by :mod:`models.evaluate`, and the floors the quick demo must stay above;
- :mod:`meshwatch.report.html`: ``report.json``, ``report.html`` and its PNG plots
  (matplotlib is imported only there, only when a report is written).

Like :mod:`meshwatch.demo`, these belong to the command-line layer and import other packages
only inside the functions that need them, so ``import meshwatch`` stays light.
"""
