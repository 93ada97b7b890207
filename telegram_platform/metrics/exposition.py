"""One scrape's exposition: every process's recorded values (summed from the multiprocess files, or
this process's registry) with the families read at scrape time.

Every recorded value is this host's (the multiprocess directory lives in the host's var/), so each
recorded sample gets a `host` label, TP_HOST_ID: with several hosts scraped, `sum by (host)` splits
the platform per host and `sum` adds it up, under the same id as `tp hosts` and `accounts.owner_host`
(docs/observability.md)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
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


def _files_metric(directory: Path, host: str) -> Metric:
    count = GaugeMetricFamily("tp_metrics_files", "prometheus_client multiprocess files: those of live "
                              "processes, one archive per type, and dead processes' files not yet compacted "
                              "(metrics/files.py).", labels=["host"])
    count.add_metric([host], float(len(glob.glob(os.path.join(directory, "*.db")))))
    return count


def with_host(families: Iterable[Metric], host: str) -> list[Metric]:
    """The recorded families with `host` added to every sample (they are all this host's)."""
    out = []
    for family in families:
        family.samples = [sample._replace(labels={**sample.labels, "host": host}) for sample in family.samples]
        out.append(family)
    return out


def render(metrics: Metrics, families: list[Metric], accept: str, *, host: str) -> tuple[bytes, str]:
    """The exposition for one scrape (blocking file reads: call it in a thread); `host` is TP_HOST_ID.

    Multiprocess mode: a fresh registry + MultiProcessCollector over the directory, every process's
    values summed; otherwise this process's own registry."""
    encoder, content_type = choose_encoder(accept)
    registry = CollectorRegistry(auto_describe=False)
    if metrics.directory is None:
        if metrics.registry is not None:
            registry.register(_Families(with_host(metrics.registry.collect(), host)))
        registry.register(_Families(families))
        return encoder(registry), content_type
    files.maintain(metrics.directory)
    # The files are read under the lock, so no compaction swaps them meanwhile.
    with files.locked(metrics.directory, exclusive=False):
        # prometheus_client's multiprocess module has no type hints.
        collector = MultiProcessCollector(None, path=str(metrics.directory))  # type: ignore[no-untyped-call]
        recorded = with_host(collector.collect(), host)  # type: ignore[no-untyped-call]
    registry.register(_Families([*recorded, *families, _files_metric(metrics.directory, host)]))
    return encoder(registry), content_type
