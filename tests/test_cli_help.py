"""``--help`` says what a new user needs (issue 20, item 8): the top-level help is plain text,
and every option of every command says its default and, for a closed set, all its values.

The rule is :func:`help_problems`, one function applied to each command's parser:

- every option (but ``-h`` and ``--version``) has a help text;
- the help text states the default (the word ``default``), or that the option is required;
  a switch (``store_true``/``store_false``/...) needs neither: it is off unless given;
- hidden options (``help=SUPPRESS``, a renamed flag kept to refuse it) are not shown;
- an option with ``choices``, or one whose values are a closed set of the library
  (:func:`closed_sets`: methods, datasets, norms, splits), lists every value in its help text or
  in the ``{a,b}`` argparse shows;
- no help text is a bare echo of the option's name (``--device  device``).
"""

from __future__ import annotations

import argparse
import re

import pytest

from robust_amo.cli import COMMANDS, DESCRIPTION, build_parser
from robust_amo.config import Norm, SplitName, choices
from robust_amo.data import dataset_names
from robust_amo.methods import METHODS

SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
            argparse._AppendConstAction, argparse._CountAction, argparse.BooleanOptionalAction)
"""Actions that take no value: off unless given, so they need not state a default."""

EXEMPT = (argparse._HelpAction, argparse._VersionAction)


def closed_sets() -> dict[str, tuple[str, ...]]:
    """Option dest -> the closed set of its values where the parser does not hold them as
    ``choices`` (``--method`` takes any registered method, checked by the library)."""
    return {"method": tuple(METHODS), "dataset": tuple(dataset_names()),
            "norm": tuple(choices(Norm)), "split": tuple(choices(SplitName))}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_problems(parser: argparse.ArgumentParser) -> list[str]:
    """What the help of ``parser``'s options lacks, one line per problem (empty: fine)."""
    closed = closed_sets()
    formatter = parser._get_formatter()
    problems = []
    for a in parser._actions:
        if not a.option_strings or isinstance(a, EXEMPT):
            continue
        if a.help == argparse.SUPPRESS:  # hidden: a renamed flag kept only to refuse it
            continue
        flag = a.option_strings[-1]
        text = " ".join((a.help or "").split())
        if not text:
            problems.append(f"{flag}: no help text")
            continue
        if text.lower().strip(" .") in {flag.strip("-"), a.dest, a.dest.replace("_", " ")}:
            problems.append(f"{flag}: the help only repeats the name ({text!r})")
        if not isinstance(a, SWITCHES) and not a.required \
                and not re.search(r"\b(default|required)\b", text, re.I):
            problems.append(f"{flag}: does not say its default ({text!r})")
        values = a.choices if a.choices is not None else closed.get(a.dest)
        if values is not None:
            shown = text + " " + formatter._format_action_invocation(a)
            missing = [str(v) for v in values
                       if not re.search(rf"(?<![\w-]){re.escape(str(v))}(?![\w-])", shown)]
            if missing:
                problems.append(f"{flag}: does not list {', '.join(missing)} ({text!r})")
    return problems


def test_the_rule_finds_what_a_user_tripped_over():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto", help="device")
    p.add_argument("--method", metavar="METHOD", default="pgd", help="standard, pgd, ...")
    p.add_argument("--norm", choices=["linf", "l2"], metavar="NORM", help="threat model")
    p.add_argument("--fine", choices=["a", "b"], default="a", help="a or b (default a)")
    p.add_argument("--flag", action="store_true", help="a switch")
    got = help_problems(p)
    assert got[0] == "--device: the help only repeats the name ('device')"
    assert "--device: does not say its default ('device')" in got
    assert any(g.startswith("--method: does not list amo, ") for g in got)
    assert "--norm: does not say its default ('threat model')" in got
    assert "--norm: does not list linf, l2 ('threat model')" in got
    assert not [g for g in got if g.startswith(("--fine", "--flag"))]


def test_the_top_level_help_is_plain_text():
    text = build_parser().format_help()
    assert not re.search(r"``|:(func|class|data|mod|meth):", text), text
    assert DESCRIPTION in text  # whole, not the module docstring's first line cut off
    assert "examples:" in text and "robust-amo COMMAND --help" in text
    for command in COMMANDS:
        assert command.NAME in text


@pytest.mark.parametrize("name", [c.NAME for c in COMMANDS])
def test_every_option_says_its_default_and_values(name):
    parser = _subparsers(build_parser())[name]
    problems = help_problems(parser)
    assert not problems, f"robust-amo {name} --help:\n" + "\n".join(problems)


def test_flags_are_never_abbreviated(capsys):
    parser = build_parser()
    assert not parser.allow_abbrev
    assert all(not p.allow_abbrev for p in _subparsers(parser).values())
    for name in ("train", "eval", "margins", "convert-checkpoint"):
        # --un would have been --unsafe-load, which runs the code in a file
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--un", "x", "y"] if name == "convert-checkpoint"
                              else [name, "--un"])
        assert e.value.code == 2
        assert "unrecognized arguments: --un" in capsys.readouterr().err
