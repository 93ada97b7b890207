"""One scrape's exposition: every process's recorded values (summed from the multiprocess files, or
this process's registry) with the families read at scrape time."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from . import files
from .definitions import Metrics


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _files_metric(directory: Path) -> Metric:
    count = GaugeMetricFamily("tp_metrics_files", "prometheus_client multiprocess files: those of live "
                              "processes, one archive per type, and dead processes' files not yet compacted "
                              "(metrics/files.py).")
    count.add_metric([], float(len(glob.glob(os.path.join(directory, "*.db")))))
    return count


def render(metrics: Metrics, families: list[Metric], accept: str) -> tuple[bytes, str]:
    """The exposition for one scrape (blocking file reads: call it in a thread).

    Multiprocess mode: a fresh registry + MultiProcessCollector over the directory, every process's
    values summed; otherwise this process's own registry."""
    encoder, content_type = choose_encoder(accept)
    registry = CollectorRegistry(auto_describe=False)
    if metrics.directory is None:
        if metrics.registry is not None:
            registry.register(_Families(list(metrics.registry.collect())))
        registry.register(_Families(families))
        return encoder(registry), content_type
    files.maintain(metrics.directory)
    MultiProcessCollector(registry, path=str(metrics.directory))  # type: ignore[no-untyped-call]
    registry.register(_Families([*families, _files_metric(metrics.directory)]))
    # The files are read while encoding: under the lock, so no compaction swaps them meanwhile.
    with files.locked(metrics.directory, exclusive=False):
        return encoder(registry), content_type
