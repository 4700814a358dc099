"""Prometheus: scraping a metrics listener, reading one sample of its text, and
what the processes export (every series and label name a rule or a dashboard
may use) against what an expression names."""

from __future__ import annotations

import re
import urllib.request

import prometheus_client

# Labels Prometheus adds or PromQL makes, besides the metrics' own.
SCRAPE_LABELS = {"job", "instance", "le", "quantile"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "summary": ("_sum", "_count", "")}


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))  # the exposition sorts them
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    return float(match.group(1)) if match else None


def exported() -> tuple[set[str], set[str]]:
    """(series names, label names) that refund-edge and refund-service export."""
    names, labels = set(), set(SCRAPE_LABELS)
    for collector in list(prometheus_client.REGISTRY._collector_to_names):  # every registered collector
        for family in collector.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
            for sample in family.samples:
                names.add(sample.name)
                labels.update(sample.labels)
        labelnames = getattr(collector, "_labelnames", ())
        labels.update(labelnames)
    return names, labels


def names_and_labels(expression: str) -> tuple[set[str], set[str]]:
    names = set(re.findall(r"\b((?:refund|process)_[a-z_]+)\b", expression))
    labels = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expression))
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expression):
        labels.update(word.strip() for word in grouping.split(",") if word.strip())
    return names, labels
