"""The trainer's command line: one set of flags for `microbert-train`, `python -m train` and
`deepspeed train/main.py`.

The settings' flags are generated from `TrainConfig`'s declarations (microbert/run_config.py): spelling,
parser, choices, help and help group come from the field, so a flag cannot exist without a setting nor
say something its setting does not. Written here by hand are only the flags that are not settings: the
layers (--profile, --ds-config, --config), --verbose, the launcher's --local_rank and the multi-node
launch flags. Flags left out are None, so lower layers (profile, DeepSpeed config, run file) keep their
values; only what the user typed overrides them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from microbert.run_config import SECTIONS, TrainConfig
from microbert.setting import Declared, declared

SEVERAL_NODES = "several nodes"


def setting_flags() -> list[Declared]:
    """The settings that have a flag, in declaration order."""
    return [s for s in declared(TrainConfig) if s.setting.flag is not None]


def _help_group(s: Declared) -> str:
    """Where `--help` lists a setting's flag: under its section, unless the flag names another group."""
    assert s.setting.flag is not None
    return s.setting.flag.group or s.setting.section


def add_setting_flag(group: argparse._ActionsContainer, s: Declared) -> None:
    """One setting's flag, as its declaration says; its value lands in `args.<field name>`."""
    assert s.setting.flag is not None
    parse = s.parser()
    choices = s.choices if s.setting.flag.choices else ()
    options: dict[str, Any] = {"dest": s.name, "default": None, "help": s.help_text().replace("%", "%%")}
    if parse is not None:
        options["type"] = parse
    if choices:
        options["choices"] = choices
    else:  # as argparse would name it after the first spelling: --batch-size BATCH_SIZE
        options["metavar"] = s.flag_names[0].lstrip("-").replace("-", "_").upper()
    if s.type is bool:  # --streaming, --streaming true, --streaming false
        options.update(nargs="?", const=True, metavar="true|false")
    group.add_argument(*s.flag_names, **options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microbert-train",
        description="Pre-train a BERT masked-language model with DeepSpeed (ZeRO-1; bf16 on GPUs). "
        "Settings: profile < DeepSpeed config < run file < these flags.",
    )
    p.add_argument("--profile", help="hardware profile (see `microbert configs list`) or a profile JSON path")
    p.add_argument("--ds-config", help="DeepSpeed config: a bundled name (v1.json … v4.json) or a path")
    p.add_argument("--config", dest="run_file", help="run file: JSON of TrainConfig settings")
    p.add_argument(
        "--verbose", action="store_true", default=None, help="show the libraries' info logs and warnings"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    flags = setting_flags()
    for section in SECTIONS:
        members = [s for s in flags if _help_group(s) == section.title]
        if members:
            group = p.add_argument_group(section.title)
            for s in members:
                add_setting_flag(group, s)
    add_launch_flags(p)
    return p


# --- several nodes (train/launcher.py): DeepSpeed's flag names, with dashes or underscores ----------
LAUNCH_FLAGS = ("hostfile", "node_rank", "master_addr", "master_port")  # not settings; num_nodes is one


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        SEVERAL_NODES,
        "start every node from here over pdsh/ssh with --hostfile, or run the same command on every "
        "node with --num-nodes, --node-rank and --master-addr (README: Multi-node)",
    )
    g.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' per node): ranks over pdsh and ssh")
    for s in setting_flags():
        if _help_group(s) == SEVERAL_NODES:
            add_setting_flag(g, s)  # --num-nodes
    g.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, help="this node: 0 … N-1")
    g.add_argument("--master-addr", "--master_addr", dest="master_addr", help="address of node 0")
    g.add_argument(
        "--master-port", "--master_port", dest="master_port", type=int, help="port on node 0 (default 29500)"
    )


# the flags that are not settings (a test checks that every other flag is a declared setting)
NON_SETTINGS = ("profile", "ds_config", "run_file", "local_rank", "verbose", *LAUNCH_FLAGS)


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave as flags, by TrainConfig field name."""
    given = {s.name: getattr(args, s.name) for s in setting_flags()}
    return {name: value for name, value in given.items() if value is not None}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
