"""Settings declared once: a dataclass field carries its help, its section, its flag and its checks.

`TrainConfig` (microbert/run_config.py) declares each field as `SECTION(default, help, flag=…,
check=…)`. From that one declaration `train/args.py` builds the command line (spelling, parser,
choices, help group) and `run_config.resolve` checks the value of every layer, so a flag, its help
and its validation cannot drift apart. The standard library's `dataclasses.field(metadata=…)` holds
it all: the config stays a plain dataclass of primitives that round-trips to JSON.

Why not pydantic-settings: its sources are the environment, dotenv and secrets files, while the four
layers here are a profile, a DeepSpeed config (translated key by key), a run file and argparse flags;
its messages and coercions ("5" becomes 5) differ from the ones users and tests rely on, and its CLI
would replace the argparse help. serve/ uses it where it fits: settings from MICROBERT_* variables.

It lives in `microbert/` because the declarations do (`microbert configs show` resolves settings
without importing the trainer); the text parsers of the flags live here for the same reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from microbert.errors import unknown_name

_METADATA_KEY = "microbert.setting"


# --- checks: what a value must be, in words a user can act on -------------------------------------
@dataclass(frozen=True)
class Rule:
    """A check of one setting's value. `problem(name, value)` is None when the value is fine, else the
    line that `resolve` reports ("lr must be a positive number, got 0"). `choices`, when given, are
    the only valid values; a flag offers them to argparse (its usage line and 'invalid choice')."""

    requirement: str  # completes "<name> must be …"
    ok: Callable[[Any], bool]
    choices: tuple[Any, ...] = ()
    message: Callable[[str, Any], str] | None = None  # a whole message, instead of "must be …, got …"

    def problem(self, name: str, value: Any) -> str | None:
        if self.ok(value):
            return None
        if self.message is not None:
            return self.message(name, value)
        return f"{name} must be {self.requirement}, got {value!r}"


Check = Rule | Callable[[str, Any], "str | None"]  # a Rule, or any (name, value) -> problem or None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(minimum: int = 1, *, also: tuple[Any, ...] = (), words: str = "") -> Rule:
    """An integer ≥ minimum (or one of `also`, e.g. "auto")."""
    return Rule(words or f"an integer ≥ {minimum}", lambda v: v in also or (_is_int(v) and v >= minimum))


def positive(words: str = "a positive number") -> Rule:
    return Rule(words, lambda v: _is_number(v) and v > 0)


def at_least_zero(words: str) -> Rule:
    return Rule(words, lambda v: _is_number(v) and v >= 0)


def within(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    """A number in an interval, written as a mathematician would: [0, 1), (0, 1], [0.0, 1.0]."""

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Rule(f"in {interval}", ok)


def one_of(choices: Sequence[Any], note: str = "") -> Rule:
    """One of a few values, listed in the message: "precision must be auto, bf16 or fp32"."""
    words = [str(c) for c in choices]
    listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    return Rule(listed + note, lambda v: v in choices, choices=tuple(choices))


def known(kind: str, names: Iterable[str]) -> Rule:
    """A name from a registry; the message lists the valid ones ("unknown schedule 'step'; valid …")."""
    valid = tuple(names)
    return Rule(
        f"a known {kind}",
        lambda v: v in valid,
        choices=valid,
        message=lambda _name, v: unknown_name(kind, str(v), valid),
    )


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
STRING_LIST = Rule(
    "a list of strings",
    lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    message=lambda name, _v: f"{name} must be a list of strings",
)


# --- flag text parsers (argparse `type=`): counts, durations, booleans, "auto" ---------------------
def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_flag_count(text: str) -> int:
    from microbert.data.sources import parse_count  # here: importing microbert.data loads tokenizers

    try:
        count = parse_count(text)
    except ValueError:
        count = None
    if count is None:  # "all" would read as a flag left out, so it is refused here as before
        raise argparse.ArgumentTypeError(f"expected a count such as 1000, 500k or 5M, got {text!r}")
    return count


def parse_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def parse_duration(text: str) -> float:
    """Seconds, as people write them: 600, 90s, 10m, 1.5h."""
    cleaned = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(cleaned[-1:], 1)
    try:
        value = float(cleaned[:-1] if cleaned[-1:] in "smh" else cleaned) * scale
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 10m or 1.5h, got {text!r}")
    return value


# --- declarations -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """How a setting is spelled on the command line. Left out, each part follows from the field:
    `--field-name`, the parser from its type (int, float, str; a bool takes true|false or nothing),
    argparse choices from its check. The flag's default is always None, so a flag left out keeps the
    lower layers' value."""

    names: tuple[str, ...] = ()  # e.g. ("--batch-size",); default ("--<field-name>",)
    parse: Callable[[str], Any] | None = None
    choices: bool = True  # False: a bad value reaches resolve's message instead of argparse's
    group: str | None = None  # a help group other than the setting's section ("several nodes")


@dataclass(frozen=True)
class Setting:
    """What the metadata of a declared field holds."""

    section: str
    help: str
    flag: Flag | None
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Section:
    """A group of settings (data, model, …): declares fields in it, and titles their flags' help group."""

    title: str

    def __call__(
        self,
        default: Any = dataclasses.MISSING,
        help: str = "",
        *,
        factory: Callable[[], Any] | None = None,
        flag: Flag | bool = False,
        check: Check | Sequence[Check] = (),
    ) -> Any:
        """A dataclass field. `help` may name `{default}` and `{choices}` (the latter marks the default),
        so a default is written once, in the field. `flag=True`: the flag with every part implied."""
        checks = tuple(check) if isinstance(check, Sequence) else (check,)
        meta = Setting(self.title, help, Flag() if flag is True else flag or None, checks)
        if factory is not None:
            return dataclasses.field(default_factory=factory, metadata={_METADATA_KEY: meta})
        return dataclasses.field(default=default, metadata={_METADATA_KEY: meta})


@dataclass(frozen=True)
class Declared:
    """One field of a settings dataclass, with its declaration: what the generators iterate over."""

    name: str
    type: Any  # the evaluated annotation
    default: Any
    setting: Setting

    @property
    def flag_names(self) -> tuple[str, ...]:
        assert self.setting.flag is not None
        return self.setting.flag.names or ("--" + self.name.replace("_", "-"),)

    @property
    def choices(self) -> tuple[Any, ...]:
        return next((c.choices for c in self.setting.checks if isinstance(c, Rule) and c.choices), ())

    def help_text(self) -> str:
        """The help with `{default}` and `{choices}` filled in from the field itself."""
        shown = f"{self.default:g}" if isinstance(self.default, float) else str(self.default)
        marked = ", ".join(f"{c} (default)" if c == self.default else str(c) for c in self.choices)
        return self.setting.help.replace("{default}", shown).replace("{choices}", marked)

    def parser(self) -> Callable[[str], Any] | None:
        """The flag's text parser: declared, or implied by the field's type."""
        flag = self.setting.flag
        if flag is not None and flag.parse is not None:
            return flag.parse
        kinds = [a for a in typing.get_args(self.type) or (self.type,) if a is not type(None)]
        implied: dict[Any, Callable[[str], Any] | None] = {bool: parse_bool, int: int, float: float}
        implied[str] = None  # argparse keeps the text
        if len(kinds) != 1 or kinds[0] not in implied:
            raise TypeError(f"setting {self.name} ({self.type}): declare Flag(parse=…) for its flag")
        return implied[kinds[0]]

    def problem(self, value: Any) -> str | None:
        """The first thing wrong with this value, or None. None is fine where the type allows it
        (`int | None`: None means "the default of something else"), so checks never see it there."""
        if value is None and _allows_none(self.type):
            return None
        for check in self.setting.checks:
            found = check.problem(self.name, value) if isinstance(check, Rule) else check(self.name, value)
            if found is not None:
                return found
        return None


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The fields of a settings dataclass in declaration order (computed once: declarations do not
    change); a field declared without a Section (so without help) is an error here."""
    hints = typing.get_type_hints(cls)
    out: list[Declared] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_METADATA_KEY)
        if not isinstance(meta, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} is declared without a section and help")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(Declared(f.name, hints[f.name], default, meta))
    return tuple(out)


def _allows_none(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
