"""The core every stage builds on; it imports nothing else of leukoflow.

Modules: :mod:`~leukoflow.core.vocabulary` (names), :mod:`~leukoflow.core.physics`
(optics and units), :mod:`~leukoflow.core.wire` (message format),
:mod:`~leukoflow.core.transport` (sockets and endpoints), :mod:`~leukoflow.core.config`
(parameters), :mod:`~leukoflow.core.registry` (plugins), :mod:`~leukoflow.core.stats`
(probabilities and intervals), :mod:`~leukoflow.core.rtdc` (recordings),
:mod:`~leukoflow.core.metrics` (Prometheus families), :mod:`~leukoflow.core.jsonutil`
and :mod:`~leukoflow.core.service` (signals, health server).
"""
