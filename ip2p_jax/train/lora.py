"""The LoRA task of the training loop: the InstructPix2Pix loss over base + adapters (config.lora).

Only the adapters are trainable params (so the optimizer state, the EMA and the checkpoints hold
adapters only); the base UNet (and text encoder) is part of `frozen`, held once in the compute
dtype. Each step merges W + (alpha/r) A B into the base kernels inside the jitted loss
(ip2p_jax.adapters) and runs the one InstructPix2Pix loss (train/step.py), so pmap, the FSDP
mesh (the frozen base sharded like any frozen part), gradient accumulation and the non-finite
guard are the editor's. The export is `pytorch_lora_weights.safetensors` (weights/lora.py).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import numpy as np

from ip2p_jax import adapters as lora_math
from ip2p_jax.placement import cast
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.train.build import Built, build
from ip2p_jax.train.editor import Sampler
from ip2p_jax.train.parallel import fetch
from ip2p_jax.train.step import make_loss_fn
from ip2p_jax.train.task import Task, abstract_like
from ip2p_jax.weights.lora import save_lora

log = logging.getLogger(__name__)
BASE = "lora_base"   # frozen["lora_base"] = {"unet": ..., "text_encoder": ...} in the compute dtype


def lora_enabled(config) -> bool:
    section = config.get("lora") if hasattr(config, "get") else None
    return bool(section) and int(section.get("rank", 0) or 0) != 0


def _settings(config) -> dict:
    r = config.lora
    if r.rank < 0 or isinstance(r.rank, bool):
        raise lora_math.LoraError(f"--config.lora.rank={r.rank!r}: must be a positive integer (0 = no LoRA)")
    if not 0.0 <= float(r.dropout) < 1.0:
        raise lora_math.LoraError(f"--config.lora.dropout={r.dropout!r}: must be in [0, 1)")
    if float(r.alpha) < 0:
        raise lora_math.LoraError(f"--config.lora.alpha={r.alpha!r}: must be >= 0 (0 = the rank)")
    if config.model.train_text_encoder:
        raise lora_math.LoraError("--config.model.train_text_encoder=true trains the whole text encoder; with a "
                                  "LoRA (lora.rank > 0) adapt it with --config.lora.text_encoder=true instead")
    alpha = float(r.alpha) or float(r.rank)
    return dict(rank=int(r.rank), alpha=alpha, factor=alpha / int(r.rank), dropout=float(r.dropout))


def lora_parts(config, built: Built) -> tuple[dict, dict]:
    """(bases {part: host fp32 params}, fresh adapters {part: tree}) of the run."""
    r, s = config.lora, _settings(config)
    bases = {"unet": built.params["unet"]}
    targets = {"unet": lora_math.find_targets(bases["unet"], r.targets, convs=r.convs, where="UNet")}
    if r.text_encoder:
        bases["text_encoder"] = built.frozen["text_encoder"]
        targets["text_encoder"] = lora_math.find_targets(bases["text_encoder"], r.text_targets, convs=False,
                                                         where="text encoder")
    fresh = {part: lora_math.init_adapters(bases[part], targets[part], s["rank"], seed=config.seed + i)
             for i, part in enumerate(bases)}
    return bases, fresh


def lora_task(config, built: Optional[Built] = None) -> Task:
    built = built or build(config)
    s = _settings(config)
    bases, fresh = lora_parts(config, built)
    dt = built.step_config.compute_dtype
    frozen = {k: v for k, v in built.frozen.items() if not (k == "text_encoder" and "text_encoder" in bases)}
    if "text_encoder" in bases:   # the "" embedding moves with the adapted encoder
        frozen.pop("null_embedding", None)
        frozen["null_ids"] = tokenize(built.tokenizer, [""])
    frozen[BASE] = {part: jax.tree.map(lambda x: np.asarray(cast(x, dt)), base) for part, base in bases.items()}
    ip2p_loss = make_loss_fn(built.models, built.step_config)
    factor, rate = s["factor"], s["dropout"]

    def loss_fn(params, frozen_, batch, step_key):
        rest = {k: v for k, v in frozen_.items() if k != BASE}
        merged = {}
        for i, (part, adapters) in enumerate(sorted(params.items())):
            if rate:
                adapters = lora_math.feature_dropout(adapters, rate, jax.random.fold_in(step_key, 1000 + i))
            merged[part] = lora_math.apply_lora(frozen_[BASE][part], adapters, 1.0, factor)
        return ip2p_loss(merged, rest, batch, step_key), {}

    full = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(bases))
    trained = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(fresh))
    notes = list(built.notes) + [
        f"lora: rank {s['rank']}, alpha {s['alpha']:g} on {', '.join(f'{len(lora_math.adapter_modules(t))} {p} layers' for p, t in fresh.items())}: "
        f"{trained:,} trainable parameters ({100 * trained / max(full, 1):.2f}% of the {full:,} adapted base's)"]

    def merged_host(adapters: dict) -> dict:
        """Base + the adapters on the host (fp32), as the editor's params: for sample edits."""
        out = {}
        for part, a in fetch(adapters).items():
            out[part] = jax.tree.map(np.asarray, lora_math.apply_lora(bases[part], a, 1.0, factor))
        return out

    sampler = None
    if config.log.sample_every_steps and config.data.source != "latent_cache":
        def sampler(writer):
            inner = Sampler(config, built, writer)
            return lambda step, ema: inner(step, merged_host(ema))

    def export(state, out_dir: str) -> str:
        return export_lora(fetch(state.ema_params), out_dir, rank=s["rank"], alpha=s["alpha"])

    return Task(abstract_params=abstract_like(fresh), init_params=lambda: fresh, frozen=frozen,
                step_config=built.step_config, models=built.models, loss_fn=loss_fn, tokenizer=built.tokenizer,
                export=export, make_sampler=sampler, notes=notes)


def export_lora(ema_adapters: Any, out_dir: str, *, rank: int, alpha: float, overwrite: bool = True,
                protect: tuple = ()) -> str:
    """The EMA adapters as out_dir/pytorch_lora_weights.safetensors (process 0), diffusers' layout."""
    if jax.process_index() == 0:
        save_lora(ema_adapters, out_dir, rank=rank, alpha=alpha, overwrite=overwrite, protect=protect)
        log.info("exported the EMA LoRA to %s", out_dir)
    return out_dir
