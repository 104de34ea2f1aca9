"""Shared test settings.

Tests on tiny models run thousands of small tensor ops, for which intra-op threads cost more
than they give (a tiny forward took 0.4 s with two threads and 3 ms with one on a busy 2-core
machine), so every test runs with one thread, except those marked ``slow`` (the real demo
model, whose large matrix products do gain from threads). Those get the machine's cores shared
among pytest-xdist's workers: two workers on two cores, each with two threads, ran the demo tests
about three times slower than one thread each (threads waiting on each other's cores).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    else:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, before // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
