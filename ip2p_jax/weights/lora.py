"""LoRA files both ways with diffusers: `pytorch_lora_weights.safetensors` (PEFT names).

Written (`save_lora`): one tensor pair per adapted module, named as diffusers' `save_lora_weights`
names them, `unet.<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) (conv layers:
(r, in, kh, kw) / (out, r, 1, 1)), `text_encoder.<module>...` for a text-encoder LoRA, and the
PEFT LoraConfig of each part (r, lora_alpha, target_modules) in the safetensors metadata under
`lora_adapter_metadata`, where diffusers' `load_lora_weights` reads it.

Read (`read_lora`): that layout and diffusers' older one (`.lora.down` / `.lora.up`, alphas in
`.alpha` tensors); kohya / A1111 SD LoRAs (`lora_unet_...` / `lora_te_...`) through diffusers' own
converter (diffusers is imported lazily, only for those). The factor alpha / r of each module
comes from the metadata (rank_pattern / alpha_pattern / use_rslora honoured), else from `.alpha`
tensors, else 1 (diffusers' convention: alpha = rank).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from ip2p_jax import adapters as lora_math
from ip2p_jax.weights.components import Components
from ip2p_jax.weights.io import read_state_dict
from ip2p_jax.weights.naming import WeightsError, flax_path_to_torch_key
from ip2p_jax.weights.output_folder import atomic_folder, check_finite


LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PARTS = ("unet", "text_encoder")          # diffusers' prefixes = the training params' keys
COMPONENT_FIELD = {"unet": "unet_params", "text_encoder": "text_params"}
TEXT_PREFIX = "text_model."             # our text-encoder paths (and transformers 4's names) start with it
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class LoraFileError(WeightsError, lora_math.LoraError):
    """A LoRA file that cannot be read or does not fit the model; the message names the file."""


@dataclasses.dataclass
class LoraFile:
    adapters: dict          # {"unet": adapter tree, "text_encoder": adapter tree} (parts present only)
    factors: dict           # {part: {module name: alpha / r}}
    source: str

    def modules(self) -> int:
        return sum(len(lora_math.adapter_modules(t)) for t in self.adapters.values())


def torch_module(name: str) -> str:
    """Our module name ('down_blocks_0.attentions_0....to_out_0') -> PyTorch's ('down_blocks.0....to_out.0')."""
    return flax_path_to_torch_key(tuple(name.split(".")) + ("kernel",))[: -len(".weight")]


# ------------------------------------------------------------------------------------------ writing

def lora_state_dict(adapters: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
    """{part: adapter tree} -> diffusers/PEFT names and PyTorch layouts (fp32 numpy)."""
    out = {}
    for part, tree in adapters.items():
        flat = traverse_util.flatten_dict(dict(tree))
        for name in lora_math.adapter_modules(tree):
            path = tuple(name.split("."))
            a, b = np.asarray(flat[path + ("lora_A",)], np.float32), np.asarray(flat[path + ("lora_B",)], np.float32)
            key = f"{part}.{torch_module(name)}"
            out[key + ".lora_A.weight"] = np.ascontiguousarray(a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1))
            out[key + ".lora_B.weight"] = np.ascontiguousarray(b.T if a.ndim == 2 else b.T[:, :, None, None])
    return out


def _target_name(module: str) -> str:
    """'down_blocks.0....attn1.to_q' -> 'to_q'; '....to_out.0' -> 'to_out.0' (PEFT's target_modules)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def lora_metadata(adapters: Mapping[str, Mapping], rank: int, alpha: float) -> dict:
    """PEFT LoraConfig fields per part, as diffusers' save_lora_weights packs them ("unet.r", ...)."""
    meta = {}
    for part, tree in adapters.items():
        targets = sorted({_target_name(torch_module(n)) for n in lora_math.adapter_modules(tree)})
        for k, v in {"r": int(rank), "lora_alpha": float(alpha), "target_modules": targets, "peft_type": "LORA",
                     "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
                     "lora_bias": False, "bias": "none", "init_lora_weights": True, "lora_dropout": 0.0}.items():
            meta[f"{part}.{k}"] = v
    return meta


def save_lora(adapters: Mapping[str, Mapping], out_dir: str, *, rank: int, alpha: float, overwrite: bool = True,
              protect: tuple = ()) -> str:
    """Write out_dir/pytorch_lora_weights.safetensors (atomically: a new folder swapped in; the target
    must be new, empty or an earlier export). Non-finite adapters are refused."""
    check_finite({part: tree for part, tree in adapters.items()}, out_dir)
    state = lora_state_dict(adapters)
    meta = {"format": "pt", METADATA_KEY: json.dumps(lora_metadata(adapters, rank, alpha), indent=2, sort_keys=True)}
    with atomic_folder(out_dir, overwrite=overwrite, protect=protect) as tmp:
        save_file(state, os.path.join(tmp, LORA_FILE), metadata=meta)
    return out_dir


# ------------------------------------------------------------------------------------------ reading

def _file_of(path: str) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, LORA_FILE)
        if not os.path.isfile(inner):
            cands = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(cands) != 1:
                raise LoraFileError(f"{path}: a folder without {LORA_FILE}" +
                                    (f" and with several .safetensors files ({', '.join(cands[:4])}): give the file"
                                     if cands else ""))
            inner = os.path.join(path, cands[0])
        return inner
    if not os.path.isfile(path):
        raise LoraFileError(f"{path}: no such LoRA file")
    return path


def _metadata(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}
    try:
        with safe_open(path, framework="np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception:   # read_state_dict has already said what is wrong with the file
        return {}
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise LoraFileError(f"{path}: its {METADATA_KEY} metadata is not JSON") from None


def _from_kohya(state: dict, path: str) -> tuple[dict, dict]:
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers  # heavy, optional
    except ImportError:
        raise LoraFileError(f"{path}: a kohya-style LoRA (lora_unet_* names); reading it needs diffusers "
                            "(pip install 'ip2p_jax[torch]'), or convert it to the diffusers layout elsewhere") from None
    if any("dora_scale" in k for k in state):
        raise LoraFileError(f"{path}: a DoRA (dora_scale tensors); only plain LoRAs are supported")
    try:
        converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    except (ValueError, KeyError) as e:
        raise LoraFileError(f"{path}: diffusers cannot convert this kohya-style LoRA: {e}") from None
    return {k: np.asarray(v) for k, v in converted.items()}, {k: float(v) for k, v in (alphas or {}).items()}


_OLD_ATTENTION = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_SUFFIXES = ((".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"),
                 (".lora_linear_layer.down.weight", ".lora_A.weight"), (".lora_linear_layer.up.weight", ".lora_B.weight"))


def canonical_key(key: str) -> str:
    """diffusers' older LoRA names -> PEFT's: '...attn1.processor.to_out_lora.down.weight' ->
    '...attn1.to_out.0.lora_A.weight' (text encoder: to_q_lora -> q_proj), '.lora.up.weight' -> '.lora_B.weight'."""
    k = key.replace(".processor.", ".")
    m = _OLD_ATTENTION.search(k)
    if m:
        proj, which = m.groups()
        name = proj[3:] + "_proj" if k.startswith("text_encoder.") else proj + (".0" if proj == "to_out" else "")
        return f"{k[:m.start()]}.{name}.lora_{'A' if which == 'down' else 'B'}.weight"
    for old, new in _OLD_SUFFIXES:
        if k.endswith(old):
            return k[: -len(old)] + new
    return k


def _alpha_module(key: str) -> str:
    """An alpha tensor's name ('unet.<module>.alpha', or diffusers' kohya converter's
    'unet.<...>.to_q_lora.down.weight.alpha') -> 'unet.<module>'."""
    head = key[: -len(".alpha")]
    if head.endswith(".weight"):
        head = canonical_key(head).rsplit(".", 2)[0]
    return head


def _split(key: str) -> tuple[str, str, str]:
    """'unet.a.b.lora_A.weight' -> ('unet', 'a.b', 'A'); ('', '', '') when not a LoRA tensor name."""
    for marker, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if key.endswith(marker):
            part, _, module = key[: -len(marker)].partition(".")
            return part, module, which
    return "", "", ""


def _matches(module: str, pattern: str) -> bool:
    return module == pattern or module.endswith("." + pattern)


def _factor(part: str, module: str, rank: int, meta: dict, alphas: dict) -> float:
    if f"{part}.r" in meta or f"{part}.lora_alpha" in meta:
        r = rank
        alpha = float(meta.get(f"{part}.lora_alpha", rank))
        for pat, a in (meta.get(f"{part}.alpha_pattern") or {}).items():
            if _matches(module, pat):
                alpha = float(a)
        if meta.get(f"{part}.use_rslora"):
            return alpha / float(np.sqrt(r))
        return alpha / r
    alpha = alphas.get(f"{part}.{module}")
    return float(alpha) / rank if alpha is not None else 1.0


def read_lora(path: str) -> LoraFile:
    """A diffusers / PEFT / kohya LoRA file (or a folder holding pytorch_lora_weights.safetensors)."""
    path = _file_of(path)
    state = read_state_dict(path)
    meta = _metadata(path)
    for part in PARTS:
        if meta.get(f"{part}.use_dora") or meta.get(f"{part}.lora_bias"):
            raise LoraFileError(f"{path}: a {'DoRA' if meta.get(f'{part}.use_dora') else 'LoRA with biases'}; "
                                "only plain LoRAs are supported")
    alphas: dict = {}
    if state and all(k.startswith(KOHYA_PREFIXES) for k in state):
        state, alphas = _from_kohya(state, path)
    alphas.update({k: float(np.asarray(v)) for k, v in state.items() if k.endswith(".alpha")})
    alphas = {_alpha_module(k): v for k, v in alphas.items()}
    state = {canonical_key(k): v for k, v in state.items() if not k.endswith(".alpha")}
    pairs: dict[tuple[str, str], dict] = {}
    other = []
    for key, value in state.items():
        part, module, which = _split(key)
        if not part:
            other.append(key)
            continue
        pairs.setdefault((part, module), {})[which] = np.asarray(value, np.float32)
    if not pairs:
        raise LoraFileError(f"{path}: not a LoRA file (no lora_A/lora_B, lora.down/lora.up or lora_unet_* tensors; "
                            f"it holds e.g. {', '.join(list(state)[:3]) or 'nothing'})")
    if other:
        raise LoraFileError(f"{path}: tensors that are not LoRA weights: {', '.join(other[:4])}"
                            + (f" ... ({len(other)} in all)" if len(other) > 4 else ""))
    unknown = sorted({p for p, _ in pairs if p not in PARTS})
    if unknown:
        raise LoraFileError(f"{path}: LoRA weights for {', '.join(unknown)}; InstructPix2Pix has "
                            f"{' and '.join(PARTS)} (text_encoder_2 etc. belong to other pipelines)")
    flat: dict[str, dict] = {p: {} for p in PARTS}
    factors: dict[str, dict] = {p: {} for p in PARTS}
    for (part, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoraFileError(f"{path}: {part}.{module} has only lora_{'A' if 'A' in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or b.shape[1] != a.shape[0] or (b.ndim == 4 and b.shape[2:] != (1, 1)):
            raise LoraFileError(f"{path}: {part}.{module}: lora_A {a.shape} and lora_B {b.shape} do not make a LoRA pair")
        rank = a.shape[0]
        ours = module if part != "text_encoder" or module.startswith(TEXT_PREFIX) else TEXT_PREFIX + module
        name = lora_math.normalize_target(ours)   # (transformers 5 names drop text_model.)
        p = tuple(name.split("."))
        flat[part][p + ("lora_A",)] = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)
        flat[part][p + ("lora_B",)] = b.T if b.ndim == 2 else b[:, :, 0, 0].T
        rank_pattern = meta.get(f"{part}.rank_pattern") or {}
        if any(_matches(module, pat) and int(r) != rank for pat, r in rank_pattern.items()):
            raise LoraFileError(f"{path}: {part}.{module} has rank {rank}, its metadata's rank_pattern says otherwise")
        factors[part][name] = _factor(part, module, rank, meta, alphas)
    adapters = {part: traverse_util.unflatten_dict(f) for part, f in flat.items() if f}
    return LoraFile(adapters=adapters, factors={p: factors[p] for p in adapters}, source=path)


def check_lora_fits(lora: LoraFile, bases: Mapping[str, Any]) -> None:
    """Each part's adapters fit the base params of that part ({'unet': ..., 'text_encoder': ...}; parts
    missing from `bases` are not checked)."""
    for part, tree in lora.adapters.items():
        if part not in bases:
            continue
        try:
            lora_math.check_fits(bases[part], tree, where="UNet" if part == "unet" else "text encoder")
        except lora_math.LoraError as e:
            raise LoraFileError(f"{lora.source}: {e}") from None


def merge_lora(components: Components, loras: list[tuple[LoraFile, float]]) -> Components:
    """Components with the LoRAs' updates added to their UNet / text-encoder kernels (fp32 sum, then the
    components' dtype)."""
    changes = {}
    for part, field in COMPONENT_FIELD.items():
        base = getattr(components, field)
        pairs = [(lf.adapters[part], s) for lf, s in loras if part in lf.adapters]
        if not pairs:
            continue
        for lf, _ in loras:
            check_lora_fits(lf, {part: base})
        factors = [lf.factors[part] for lf, _ in loras if part in lf.adapters]
        merged = lora_math.apply_loras(base, pairs, factors)
        changes[field] = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in
                                                       traverse_util.flatten_dict(merged).items()})
    notes = list(components.notes) + [f"merged LoRA {lf.source} (scale {s:g}, {lf.modules()} modules)"
                                      for lf, s in loras]
    return dataclasses.replace(components, notes=notes, **changes)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'FILE[:SCALE]' -> (FILE, SCALE); a colon that is not followed by a number is part of the path."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0
