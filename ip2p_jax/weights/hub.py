"""Hugging Face hub ids -> local folders, downloading only what a pipeline needs."""
from __future__ import annotations

import os
import re

from huggingface_hub import snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from ip2p_jax.weights.components import ALL_SPECS, SDXL_SPECS
from ip2p_jax.weights.io import find_weights
from ip2p_jax.weights.naming import WeightsError

# Stable Diffusion 1.x single files carry no tokenizer; theirs is CLIP ViT-L/14's.
SD_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_WEIGHTS = tuple((s.folder, s.weights_stem, s.pickle_stem) for s in ALL_SPECS.values())
_META = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
         "text_encoder_2/config.json", "tokenizer_2/*",
         "tokenizer/*", "scheduler/*"]


def is_hub_id(s: str) -> bool:
    """`owner/name` (what the hub calls a repo id) that is not an existing local path."""
    s = os.fspath(s)
    return (not os.path.exists(s) and not s.startswith((".", "/", "~"))
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", s) is not None)


def weight_patterns(ext: str, variant: str | None) -> list[str]:
    tag = f".{variant}" if variant else ""
    out = []
    for comp, st_stem, pickle_stem in _WEIGHTS:
        stem = st_stem if ext == "safetensors" else pickle_stem
        out += [f"{comp}/{stem}{tag}.{ext}", f"{comp}/{stem}.{ext}.index{tag}.json", f"{comp}/{stem}-*-of-*{tag}.{ext}"]
    return out


def snapshot(repo_id: str, allow_patterns: list[str], what: str, revision: str | None = None) -> str:
    """huggingface_hub.snapshot_download with one clear error when the hub cannot be used."""
    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns, revision=revision)
    except RevisionNotFoundError:
        raise WeightsError(f"{repo_id}: the hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"{repo_id}: no such repository on the Hugging Face hub (or it is private / gated: "
                           "log in with `hf auth login`)") from None
    except Exception as e:  # offline mode, no network, timeouts, server errors
        raise WeightsError(f"cannot reach the Hugging Face hub to download {what} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); download it elsewhere and pass "
                           "the folder") from None


def download_pipeline(repo_id: str, variant: str | None = None, revision: str | None = None) -> str:
    """The local snapshot folder of a diffusers pipeline repo: configs, tokenizer, scheduler and the
    UNet / VAE / text encoder(s) weights (safetensors, else .bin); nothing else (no safety checker)."""
    folder = snapshot(repo_id, _META + weight_patterns("safetensors", variant), repo_id, revision)
    for comp, stem, pickle_stem in _WEIGHTS:
        if comp in SDXL_SPECS and not os.path.isfile(os.path.join(folder, comp, "config.json")):
            continue   # not an SDXL repo
        try:
            find_weights(os.path.join(folder, comp), stem, variant, pickle_stem)
        except WeightsError:  # an older repo with only pickles
            return snapshot(repo_id, _META + weight_patterns("bin", variant), repo_id, revision)
    return folder


def download_tokenizer(repo_id: str = SD_TOKENIZER_REPO) -> str:
    return snapshot(repo_id, TOKENIZER_FILES, f"the CLIP tokenizer of {repo_id}")
