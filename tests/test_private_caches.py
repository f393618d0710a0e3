"""The suite keeps out of the user's caches (issue 15): the data cache resolves inside pytest's tmp."""

from __future__ import annotations

from pathlib import Path

from microbert.data.cache import cache_root


def test_the_data_cache_is_not_the_users(tmp_path_factory):
    root = cache_root()
    assert root != Path.home() / ".cache" / "microbert"
    assert root.is_relative_to(tmp_path_factory.getbasetemp())
