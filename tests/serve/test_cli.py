"""`serve.cli`'s own decisions that need no server: the open-files limit it raises at start."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from serve.cli import raise_open_files_limit


@pytest.fixture
def nofile() -> Iterator[tuple[int, int]]:
    """This process's open-files limits, put back after the test."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_a_low_soft_open_files_limit_is_raised_to_the_hard_one(nofile: tuple[int, int]) -> None:
    _, hard = nofile
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    line = raise_open_files_limit()
    raised, kept_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert kept_hard == hard
    assert raised > 256 and (hard == resource.RLIM_INFINITY or raised == hard)
    assert line == f"open files: at most {raised} (soft limit raised from 256)"
    assert raise_open_files_limit() == f"open files: at most {raised}"  # nothing left to raise
