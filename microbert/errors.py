"""User-facing errors.

Anything raised as a `MicroBertError` is a problem the user can fix (a bad flag, a missing file, a
corrupted artifact). Command-line entry points print its message and exit non-zero without a
traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class MicroBertError(Exception):
    """A problem with the user's input, described in words they can act on."""

    exit_code = 2


class ConfigError(MicroBertError, ValueError):
    """One or more invalid settings; all of them are listed at once."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ArtifactError(MicroBertError):
    """An artifact folder that is missing, incomplete or altered."""


class InputError(MicroBertError, ValueError):
    """A request that cannot be answered as asked (no [MASK], bad targets, too long)."""


class InputTooLongError(InputError):
    """An input with more tokens than the model has positions; the service answers it with 422, not 400."""

    def __init__(self, message: str, *, num_tokens: int, max_tokens: int):
        super().__init__(message)
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """The standard message for an unknown preset, profile or dataset name."""
    return f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}"
