"""Model configs as frozen dataclasses read from / written to the references' config.json dicts."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from ip2p_jax.errors import Ip2pError

T = TypeVar("T")

# Bookkeeping keys diffusers / transformers write into config.json; never meaningful for the math.
META_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values",
    "architectures", "transformers_version", "model_type", "torch_dtype", "dtype", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "id2label", "label2id",
})


class ConfigError(Ip2pError):
    """A config asks for something this implementation does not support, or is malformed."""


def from_dict(cls: type[T], d: Mapping[str, Any], *, source: str = "config",
              accepted_defaults: Mapping[str, Any] | None = None, renames: Mapping[str, str] | None = None) -> T:
    """Build dataclass `cls` from a reference config dict.

    Keys naming dataclass fields are used (after `renames`); META_KEYS are skipped; any other
    key is accepted only if its value equals `accepted_defaults[key]` (a feature we do not
    implement, left at its off value) or is None; else one ConfigError lists them all.
    """
    renames = renames or {}
    accepted = dict(accepted_defaults or {})
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, bad = {}, []
    for key, value in d.items():
        name = renames.get(key, key)
        if name in names:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        elif key in META_KEYS or value is None:
            continue
        elif key in accepted and _same(accepted[key], value):
            continue
        else:
            bad.append(f"{key}={value!r}")
    if bad:
        raise ConfigError(f"{source}: unsupported settings for {cls.__name__}: {', '.join(bad)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
