"""leukoflow: live four-part white-blood-cell differential for flow QPI instruments.

Layers (each imports only the ones below it):

* :mod:`leukoflow.core` — vocabulary, wire, transport, config, physics, stats, rtdc,
  metrics, service scaffolding; imports nothing else of ours.
* stages — :mod:`leukoflow.acquisition`, :mod:`leukoflow.inference`,
  :mod:`leukoflow.explain` (live explainer), :mod:`leukoflow.models`.
* application — :mod:`leukoflow.run` (collector, recorder, orchestration, replay, live
  view), :mod:`leukoflow.reports`, :mod:`leukoflow.research` (offline explanation
  research), :mod:`leukoflow.benchmarks` and :mod:`leukoflow.cli`.
"""

__version__ = "0.1.0"
