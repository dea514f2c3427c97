"""ml_collections config files with presets, and `--config.key=value` command-line overrides.

    config = load_config("configs/train.py:tiny")          # file:arg -> get_config(arg)
    apply_overrides(config, ["--config.train.batch_size=64", "--config.model.remat", "true"])

Overrides follow ml_collections' config_flags: the value is parsed as the type the key already
has (bool: true/false/1/0/yes/no; int, float; tuple/list/dict: a Python literal; str: as
written); a key that does not exist is an error naming the nearest keys.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Iterable, Sequence

from ip2p_jax.errors import Ip2pError

PREFIX = "--config."


class ConfigOverrideError(Ip2pError):
    """A --config file or override that cannot be applied."""


def load_config(spec: str):
    """"path/to/file.py[:arg]" -> the file's get_config(arg) (arg omitted: get_config())."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigOverrideError(f"--config {spec}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_ip2p_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigOverrideError(f"--config {spec}: cannot import {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigOverrideError(f"--config {spec}: {path} has no get_config(arg)")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ConfigOverrideError(f"--config {spec}: {e}") from None


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(override tokens, the other args): `--config.k=v` or `--config.k v` (a bare flag means true)."""
    overrides, rest, i = [], [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a.startswith(PREFIX):
            if "=" in a:
                overrides.append(a)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                overrides.append(f"{a}={args[i + 1]}")
                i += 1
            else:
                overrides.append(f"{a}=true")
        else:
            rest.append(a)
        i += 1
    return overrides, rest


def _keys(config, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _keys(v, prefix + k + ".")
    return out


def parse_value(text: str, current, key: str):
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigOverrideError(f"--config.{key}={text}: expected a boolean (true/false)")
    if isinstance(current, str):
        return text
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return type(current)(text) if isinstance(current, float) else int(text)
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            raise ConfigOverrideError(f"--config.{key}={text}: expected a number") from None
        if isinstance(current, int) and value != int(value):
            raise ConfigOverrideError(f"--config.{key}={text}: expected an integer")
        return int(value) if isinstance(current, int) else value
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigOverrideError(f"--config.{key}={text}: expected a Python literal like {current!r}") from None


def apply_overrides(config, overrides: Iterable[str]):
    """Apply `--config.a.b=value` tokens in order; returns config (changed in place)."""
    for token in overrides:
        if not token.startswith(PREFIX) or "=" not in token:
            raise ConfigOverrideError(f"{token}: overrides look like --config.key=value")
        key, _, text = token[len(PREFIX):].partition("=")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not hasattr(node, "items") or part not in node:
                raise _unknown(config, key)
            node = node[part]
        if not hasattr(node, "items") or leaf not in node:
            raise _unknown(config, key)
        current = node[leaf]
        value = parse_value(text, current, key)
        if hasattr(current, "items") and isinstance(value, dict):
            value = type(current)(value) if not isinstance(current, dict) else value
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigOverrideError(f"--config.{key}={text}: {e}") from None
    return config


def _unknown(config, key: str) -> ConfigOverrideError:
    close = difflib.get_close_matches(key, _keys(config), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigOverrideError(f"--config.{key}: no such setting{hint}")
