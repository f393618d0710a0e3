"""The trainer's command line is generated from TrainConfig's declarations: no flag without a setting
(besides the few named non-settings), each flag parses its setting's own default back to the field,
says its setting's help, and is listed under its section in --help."""

from __future__ import annotations

import argparse

from microbert.run_config import SECTIONS, TrainConfig
from microbert.setting import declared
from train.args import NON_SETTINGS, build_parser, flag_settings, parse, setting_flags


def _actions() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]


def test_every_flag_is_a_declared_setting_or_a_named_non_setting():
    fields = {s.name for s in declared(TrainConfig)}
    with_flag = {s.name for s in setting_flags()}
    dests = [a.dest for a in _actions()]
    assert len(dests) == len(set(dests)), "two flags write one setting"
    strays = set(dests) - with_flag - set(NON_SETTINGS)
    assert not strays, f"flags without a TrainConfig field (declare them there): {sorted(strays)}"
    assert set(dests) >= with_flag and not fields & set(NON_SETTINGS)


def test_each_flag_says_its_help_and_reads_its_default_back():
    actions = {a.dest: a for a in _actions()}
    for s in setting_flags():
        action = actions[s.name]
        assert action.default is None, f"{s.name}: a flag left out must keep the lower layers' value"
        assert action.help == s.help_text().replace("%", "%%")
        if s.default is not None:
            given = flag_settings(parse([s.flag_names[0], str(s.default)]))
            assert given == {s.name: s.default}, s.name


def test_help_lists_the_flags_by_section_and_keeps_the_several_nodes_group():
    text = build_parser().format_help().split("\noptions:\n", 1)[1]  # past the usage line
    with_flags = {s.setting.section for s in setting_flags()}
    positions = [text.index(f"\n{section.title}:\n") for section in SECTIONS if section.title in with_flags]
    assert positions == sorted(positions)
    nodes = text.index("\nseveral nodes:\n")
    assert nodes > positions[-1] and text.index("--num-nodes") > nodes
    assert text.index("--batch-size") > text.index("\nbatch:\n") > text.index("--lr")
