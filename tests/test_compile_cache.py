"""The CLI's persistent compile cache: on by default, location from IP2P_COMPILE_CACHE, off with 0 or a flag."""
from __future__ import annotations

import argparse
import types

import pytest

from ip2p_jax import cli, sharding


@pytest.fixture
def enabled(monkeypatch):
    calls = []
    monkeypatch.setattr(sharding, "enable_compilation_cache", lambda d=None: calls.append(d) or (d or "default"))
    return calls


@pytest.mark.parametrize("setting,want", [(None, [None]), ("", [None]), ("/tmp/xla-here", ["/tmp/xla-here"]),
                                          ("0", []), ("off", []), ("false", [])])
def test_default_compilation_cache(monkeypatch, enabled, setting, want):
    if setting is None:
        monkeypatch.delenv(sharding.DEFAULT_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(sharding.DEFAULT_CACHE_ENV, setting)
    sharding.default_compilation_cache()
    assert enabled == want


def test_cli_turns_it_on_unless_told_not_to(monkeypatch, enabled):
    monkeypatch.delenv(sharding.DEFAULT_CACHE_ENV, raising=False)
    assert "--no-compile-cache" in cli.build_parser()._option_string_actions
    ran = []
    monkeypatch.setattr(cli.convert, "run", lambda args: ran.append(1) or 0)
    for no_cache in (False, True):
        args = argparse.Namespace(log_level=20, no_compile_cache=no_cache, command="convert", _command=cli.convert)
        monkeypatch.setattr(cli, "build_parser", lambda: types.SimpleNamespace(parse_args=lambda argv: args))
        assert cli.main([]) == 0
    assert enabled == [None] and len(ran) == 2   # on by default, off with the flag
