"""Chaos tests reuse the whole-cluster fixtures of :mod:`tests.cluster.conftest`."""

from __future__ import annotations

from tests.cluster.conftest import make_cluster, sample_video

__all__ = ["make_cluster", "sample_video"]
