"""Multi-turn edit sessions: each instruction applied to the previous turn's output.

A session is a list of turns; a turn is an instruction, or an object with the instruction and
optional per-turn settings (TURN_SETTINGS), as in a JSON script:

    ["make it winter", {"instruction": "add a snowman", "seed": 7, "text_scale": 9}]

Seeds: with `seed` an int s, turn t (from 0) of session j gets s + j * turns + t (one image:
s, s + 1, s + 2, ...); with one int per session s_j, s_j + t; a turn's own "seed" o gives
session j the seed o + j. EditPipeline.edit_sequence runs sessions; `ip2p edit --then` and
`--script` read them here.
"""
from __future__ import annotations

import json
import os
import secrets
from typing import Any

import numpy as np

from ip2p_jax.errors import Ip2pError

SEED_LIMIT = 2 ** 32
MAX_TURNS = 64
# per-turn settings a turn object may carry (edit() keyword arguments)
TURN_SETTINGS = ("seed", "text_scale", "image_scale", "steps", "sampler", "schedule", "mask", "mask_blur",
                 "mask_composite")


class TurnError(Ip2pError):
    """A session or script that cannot run; the message names the script (or turns) and the turn."""


def normalize(turns, where: str = "turns") -> list[dict]:
    """Turns (strings or objects) -> one dict per turn with "instruction" and its own settings."""
    if isinstance(turns, (str, dict)) or not isinstance(turns, (list, tuple)):
        raise TurnError(f"{where}: expected a list of turns (instructions or objects), got {type(turns).__name__}")
    if not 1 <= len(turns) <= MAX_TURNS:
        raise TurnError(f"{where}: a session has 1 to {MAX_TURNS} turns, got {len(turns)}")
    out = []
    for n, turn in enumerate(turns, 1):
        turn = {"instruction": turn} if isinstance(turn, str) else turn
        if not isinstance(turn, dict):
            raise TurnError(f"{where}: turn {n}: expected an instruction or an object, got {type(turn).__name__}")
        unknown = sorted(set(turn) - {"instruction", *TURN_SETTINGS})
        if unknown:
            raise TurnError(f"{where}: turn {n}: unknown setting(s) {unknown}; a turn may set "
                            f"{', '.join(('instruction',) + TURN_SETTINGS)}")
        if not isinstance(turn.get("instruction"), str):
            raise TurnError(f"{where}: turn {n}: missing or non-string \"instruction\"")
        seed = turn.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
            raise TurnError(f"{where}: turn {n}: seed must be an integer in [0, 2**32), got {seed!r}")
        out.append(dict(turn))
    return out


def read_script(path: str) -> list[dict]:
    """The turns of a JSON script file (a list of turns); mask paths are relative to its folder."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise TurnError(f"{path}: cannot read the script ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TurnError(f"{path}: not a JSON script ({e})") from None
    turns = normalize(data, path)
    folder = os.path.dirname(os.path.abspath(path))
    for t in turns:
        if isinstance(t.get("mask"), str) and not os.path.isabs(t["mask"]):
            t["mask"] = os.path.join(folder, t["mask"])
    return turns


def session_seeds(seed, sessions: int, turns: list[dict]) -> list[list[int]]:
    """seeds[t][j]: turn t's seed for session j (rules in the module docstring)."""
    n_turns = len(turns)
    if seed is None or np.ndim(seed) == 0:
        base = secrets.randbelow(2 ** 31) if seed is None else int(seed)
        per = [base + j * n_turns for j in range(sessions)]
    else:
        per = [int(s) for s in seed]
        if len(per) != sessions:
            raise TurnError(f"{len(per)} seeds for {sessions} sessions (give one int, or one per image)")
    seeds = [[t["seed"] + j if t.get("seed") is not None else per[j] + k for j in range(sessions)]
             for k, t in enumerate(turns)]
    flat = [s for row in seeds for s in row]
    if min(flat) < 0 or max(flat) >= SEED_LIMIT:
        raise TurnError(f"session seeds must lie in [0, 2**32); got {min(flat)}..{max(flat)}")
    return seeds


def turn_settings(turns: list[dict], seeds: list[list[int]], t: int, j: int) -> dict[str, Any]:
    """What turn t's output of session j records about its session: its turn (1-based), the count,
    the previous turn's seed and the earlier turns (instruction, seed and own settings)."""
    def recorded(turn: dict, seed: int) -> dict:   # masks are recorded by path only
        own = {k: v for k, v in turn.items() if k != "mask" or isinstance(v, str)}
        return {**own, "seed": seed}

    history = [recorded(turns[k], seeds[k][j]) for k in range(t)]
    return {"turn": t + 1, "turns": len(turns), "previous_seed": seeds[t - 1][j] if t else None,
            "history": history}
