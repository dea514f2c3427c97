"""LoRA adapters as params data: the math, with no model or file format in it.

An adapter tree mirrors the params tree it adapts: where the base has a module
{"kernel", "bias"} (a Dense kernel (in, out) or a conv kernel (kh, kw, in, out)), the adapter
tree has {"lora_A": (..., in, r), "lora_B": (r, out)}: lora_A is the base kernel's shape with
the output axis replaced by the rank, so the update is one tensordot:

    kernel' = kernel + scale * factor * tensordot(lora_A, lora_B, 1)

with factor = alpha / r (PEFT's scaling; alpha / sqrt(r) for rsLoRA). `apply_loras` adds any
number of (adapters, scale) pairs in fp32 and casts back to the base dtype, so it runs inside the
jitted train step (the base frozen, gradients reaching the adapters only) and once, at load time,
for inference (EditPipeline.load_lora) and merging (`ip2p convert --merge-lora`).

Modules are named by their params path joined with dots ("down_blocks_0.attentions_0.
transformer_blocks_0.attn1.to_q"); a target module matches a name equal to it or ending in
"." + it, and may be written with PyTorch's list indices ("to_out.0" == "to_out_0").
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ip2p_jax.errors import Ip2pError

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")          # the UNet's attention projections
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")    # CLIP's


class LoraError(Ip2pError):
    """A LoRA that does not fit its base model (shapes, rank, target modules) or bad LoRA settings."""


def module_name(path: Sequence[str]) -> str:
    return ".".join(path)


def normalize_target(target: str) -> str:
    """'to_out.0' -> 'to_out_0' (PyTorch list indices as our path segments)."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", target.strip())


def kernel_modules(base: Mapping) -> dict[str, tuple]:
    """{module name: kernel shape} of every module of `base` with a 2-D (Dense) or 4-D (conv) kernel."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(base)).items():
        if path[-1] == "kernel" and len(np.shape(leaf)) in (2, 4):
            out[module_name(path[:-1])] = tuple(np.shape(leaf))
    return out


def find_targets(base: Mapping, targets: Iterable[str], *, convs: bool = False, where: str = "model") -> list[str]:
    """The module names of `base` matched by `targets` (Dense kernels; conv kernels only with `convs`).
    A target that matches no module is an error naming it and some module names that exist."""
    modules = kernel_modules(base)
    found: list[str] = []
    for target in targets:
        t = normalize_target(target)
        hits = [m for m, shape in modules.items() if (m == t or m.endswith("." + t)) and (convs or len(shape) == 2)]
        if not hits:
            leaf_names = sorted({m.rsplit(".", 1)[-1] for m, s in modules.items() if convs or len(s) == 2})
            raise LoraError(f"LoRA target module {target!r} matches no {'layer' if convs else 'Dense layer'} of the "
                            f"{where}; its layer names include: {', '.join(leaf_names[:24])}")
        found += [m for m in hits if m not in found]
    return found


def check_rank(rank: int, shape: tuple, name: str) -> None:
    """rank must be in 1..min(fan_in, out) of the kernel (a larger one adds nothing but cost)."""
    fan_in, out = int(np.prod(shape[:-1])), int(shape[-1])
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(fan_in, out):
        raise LoraError(f"LoRA rank {rank!r} does not fit {name} (kernel {shape}): it must be an integer in "
                        f"1..{min(fan_in, out)} (= min(inputs, outputs))")


def init_adapters(base: Mapping, modules: Sequence[str], rank: int, seed: int = 0) -> dict:
    """Fresh host (numpy fp32) adapters over `modules` of `base`: lora_A uniform(+-1/sqrt(fan_in)) (PEFT's
    default, kaiming-uniform with a=sqrt(5)), lora_B zero, so training starts at the base model. Each
    module draws from its own stream (seed, name)."""
    shapes = kernel_modules(base)
    flat = {}
    for name in modules:
        shape = shapes[name]
        check_rank(rank, shape, name)
        fan_in = int(np.prod(shape[:-1]))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        bound = 1.0 / np.sqrt(fan_in)
        path = tuple(name.split("."))
        flat[path + ("lora_A",)] = rng.uniform(-bound, bound, shape[:-1] + (rank,)).astype(np.float32)
        flat[path + ("lora_B",)] = np.zeros((rank, shape[-1]), np.float32)
    return traverse_util.unflatten_dict(flat)


def adapter_modules(adapters: Mapping) -> dict[str, tuple]:
    """{module name: (lora_A shape, lora_B shape)} of an adapter tree."""
    flat = traverse_util.flatten_dict(dict(adapters))
    names = {path[:-1] for path in flat if path[-1] in ("lora_A", "lora_B")}
    out = {}
    for p in sorted(names):
        a, b = flat.get(p + ("lora_A",)), flat.get(p + ("lora_B",))
        if a is None or b is None:
            raise LoraError(f"LoRA module {module_name(p)} has {'lora_B' if a is None else 'lora_A'} but not "
                            f"{'lora_A' if a is None else 'lora_B'}")
        out[module_name(p)] = (tuple(np.shape(a)), tuple(np.shape(b)))
    return out


def check_fits(base: Mapping, adapters: Mapping, where: str = "model") -> None:
    """Every adapter module exists in `base` with a kernel its lora_A / lora_B fit; the error names the module."""
    kernels = kernel_modules(base)
    for name, (a, b) in adapter_modules(adapters).items():
        if name not in kernels:
            raise LoraError(f"LoRA module {name}: the {where} has no such layer (a LoRA for another architecture?)")
        k = kernels[name]
        if len(a) != len(k) or a[:-1] != k[:-1] or len(b) != 2 or b[0] != a[-1] or b[1] != k[-1]:
            raise LoraError(f"LoRA module {name}: lora_A {a} / lora_B {b} do not fit the {where}'s kernel {k} "
                            f"(expected lora_A {k[:-1] + ('r',)} and lora_B ('r', {k[-1]})): a LoRA for another "
                            "base model?")


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """The kernel update of one module, fp32: tensordot(lora_A, lora_B) over the rank."""
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def apply_loras(base: Mapping, loras: Sequence[tuple[Mapping, Any]], factors: Sequence[Any] = ()) -> dict:
    """base with every adapted kernel replaced by kernel + sum_i scale_i * factor_i(module) * A_i B_i.

    loras: (adapters, scale) pairs (scale a float or a traced scalar); factors: per pair, a float for all
    modules or {module name: float} (default 1). The sum is taken in fp32, then cast to the kernel's dtype;
    modules no adapter touches are returned as they are (the same arrays)."""
    flat = traverse_util.flatten_dict(dict(base))
    updates: dict[tuple, jax.Array] = {}
    for i, (adapters, scale) in enumerate(loras):
        factor = factors[i] if i < len(factors) else 1.0
        aflat = traverse_util.flatten_dict(dict(adapters))
        for path in {p[:-1] for p in aflat if p[-1] == "lora_A"}:
            f = factor.get(module_name(path), 1.0) if isinstance(factor, Mapping) else factor
            d = (scale * f) * delta(aflat[path + ("lora_A",)], aflat[path + ("lora_B",)])
            key = path + ("kernel",)
            updates[key] = updates[key] + d if key in updates else d
    for key, d in updates.items():
        kernel = flat[key]
        flat[key] = (jnp.asarray(kernel).astype(jnp.float32) + d).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def apply_lora(base: Mapping, adapters: Mapping, scale: Any = 1.0, factor: Any = 1.0) -> dict:
    """One adapter tree: apply_loras(base, [(adapters, scale)], [factor])."""
    return apply_loras(base, [(adapters, scale)], [factor])


def feature_dropout(adapters: Mapping, rate: float, key: jax.Array) -> Mapping:
    """LoRA dropout on merged weights: each module's lora_A input features are dropped with probability
    `rate` (kept ones scaled by 1/(1-rate)), one mask per module per call. PEFT drops each activation of
    each token; with the update merged into the kernel, a mask over input features (shared by the
    batch and the tokens of the step) is what the same regulariser can be."""
    if not rate:
        return adapters
    flat = traverse_util.flatten_dict(dict(adapters))
    out = {}
    for i, (path, x) in enumerate(sorted(flat.items())):
        if path[-1] == "lora_A":
            fan_in = x.shape[-2]
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, (fan_in, 1))
            x = x * (keep.astype(x.dtype) / (1.0 - rate))
        out[path] = x
    return traverse_util.unflatten_dict(out)


def num_bytes(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
