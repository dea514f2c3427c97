"""`load(source)`: a diffusers folder (ours included), a single-file checkpoint, or a hub id."""
from __future__ import annotations

import os

import numpy as np

from ip2p_jax.weights.components import Components
from ip2p_jax.weights.diffusers_folder import load_diffusers_folder
from ip2p_jax.weights.hub import download_pipeline, is_hub_id
from ip2p_jax.weights.naming import WeightsError
from ip2p_jax.weights.single_file import load_single_file


def load(source: str, *, dtype=np.float32, variant: str | None = None, config=None, prefer_ema: bool = True,
         tokenizer=None, revision: str | None = None, trust_pickle: bool = False,
         progress: bool = False) -> Components:
    """Load a model from what `source` names:
    - a folder: diffusers pipeline layout (what we write too); `variant` e.g. "fp16";
    - a file: a single-file checkpoint in the original layout (`config`, `prefer_ema`, `tokenizer`
      apply; see load_single_file);
    - `owner/name`: a hub repo in diffusers layout, downloading only the parts needed.
    """
    source = os.fspath(source)
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return load_diffusers_folder(expanded, dtype=dtype, variant=variant, trust_pickle=trust_pickle,
                                     progress=progress)
    if os.path.isfile(expanded):
        return load_single_file(expanded, config=config, prefer_ema=prefer_ema, dtype=dtype, tokenizer=tokenizer,
                                trust_pickle=trust_pickle, progress=progress)
    if is_hub_id(source):
        folder = download_pipeline(source, variant=variant, revision=revision)
        components = load_diffusers_folder(folder, dtype=dtype, variant=variant, trust_pickle=trust_pickle,
                                           progress=progress)
        components.source = source
        return components
    raise WeightsError(f"{source}: no such file or folder (nor a Hugging Face hub id owner/name)")
