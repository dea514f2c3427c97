"""There is one sampling loop, ip2p_jax.diffusion.samplers.sample, and what ships runs it.

The pipeline's compiled edit and the pair stage's generate are traced (tiny models, no compile)
with `samplers.sample` wrapped by a spy: each must call it exactly once, and the traced function
must hold exactly one loop, the sampler's (trip count = steps). A static check forbids lax loops
anywhere else in the package. A second loop that appears fails one of these tests.
"""
import ast
import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

import edit_fixtures as fx
from ip2p_jax import placement
from ip2p_jax.datagen.image_pairs import PairSampler, injected_steps
from ip2p_jax.diffusion import samplers
from ip2p_jax.pipeline import EditPipeline
from ip2p_jax.weights import load

PACKAGE = Path(__file__).resolve().parents[1] / "ip2p_jax"
LOOP_SITE = "diffusion/samplers.py"
LOOPS = {"fori_loop", "scan", "while_loop"}
# lax loops that are not sampler steps (module path under ip2p_jax/ -> why it may loop)
ALLOWED_LOOPS = {
    "train/step.py": "lax.scan over gradient-accumulation micro-batches of one training step",
}


@pytest.fixture
def calls(monkeypatch):
    """Record every call of samplers.sample (whether the sampler was chosen at run time); start
    with an empty cache of compiled functions, so what is built here is traced here."""
    log = []
    real = samplers.sample

    def spy(*args, **kwargs):
        log.append("run_time" if args[2].sampler == samplers.ANY else "static")
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", spy)
    monkeypatch.setattr(placement, "_COMPILED", {})
    return log


def trace_instead(monkeypatch, obj, attr: str) -> list:
    """Replace the jitted obj.attr by one that traces it (jax.make_jaxpr) and returns zeros of its
    output shape; returns the list the traced jaxprs go to."""
    jitted, jaxprs = getattr(obj, attr), []

    def traced(*args):
        closed = jax.make_jaxpr(jitted)(*args)
        jaxprs.append(closed)
        return np.zeros(closed.out_avals[0].shape, np.float32)

    monkeypatch.setattr(obj, attr, traced)
    return jaxprs


def loops_in(jaxpr) -> list:
    """Every scan / while equation in a (closed) jaxpr, nested ones included: (primitive, params)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while"):
            found.append((eqn.primitive.name, eqn.params))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found += loops_in(sub)
    return found


def assert_one_sampler_loop(jaxpr, steps: int):
    loops = loops_in(jaxpr)
    assert len(loops) == 1, [name for name, _ in loops]
    name, params = loops[0]
    assert name == "scan" and params["length"] == steps, (name, params.get("length"))


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return load(fx.tiny_model_dir(tmp_path_factory), dtype=np.float32)


def test_pipeline_edit_runs_the_one_loop(components, calls, monkeypatch):
    pipe = EditPipeline(components, dtype="fp32")
    jaxprs = trace_instead(monkeypatch, pipe, "_edit_jit")
    pipe.edit(fx.sample_images(1), fx.INSTRUCTION, steps=fx.STEPS, seed=0, resize="keep", batch_size=fx.BATCH,
              progress=False)
    assert len(jaxprs) == 1 and calls == ["run_time"]   # the sampler is chosen at run time
    assert_one_sampler_loop(jaxprs[0], fx.STEPS)


def test_pair_stage_generate_runs_the_one_loop(components, calls, monkeypatch):
    # the tiny InstructPix2Pix model as a text-to-image one: the conv_in of the noisy latents only
    unet_params = dict(components.unet_params)
    unet_params["conv_in"] = dict(unet_params["conv_in"], kernel=unet_params["conv_in"]["kernel"][:, :, :4])
    sd = dataclasses.replace(components, unet_config=dataclasses.replace(components.unet_config, in_channels=4),
                             unet_params=unet_params)
    sampler = PairSampler(sd, dtype="fp32")
    jaxprs = trace_instead(monkeypatch, sampler, "_generate")
    pairs, steps = sampler.num_devices, 3
    shape = sampler.latent_shape(sampler.vae_scale * sampler.latent_multiple)
    emb = sampler.encode_text(["a red circle", "a blue circle", ""])
    sampler.generate(sampler.plan(steps), np.zeros((pairs,) + shape, np.float32), np.arange(pairs),
                     np.broadcast_to(emb[:2], (pairs,) + emb[:2].shape), emb[2], np.full(pairs, 7.5),
                     np.full(pairs, injected_steps(0.5, steps)))
    assert len(jaxprs) == 1 and calls == ["static"]
    assert_one_sampler_loop(jaxprs[0], steps)


def _loop_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each call of lax.fori_loop / lax.scan / lax.while_loop, however imported."""
    imported = set()   # names bound by `from jax.lax import fori_loop` and the like
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("jax.lax", "lax"):
            imported |= {a.asname or a.name for a in node.names if a.name in LOOPS}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in LOOPS and isinstance(f.value, (ast.Name, ast.Attribute)):
            base = f.value.id if isinstance(f.value, ast.Name) else f.value.attr
            if base == "lax":
                found.append((node.lineno, f.attr))
        elif isinstance(f, ast.Name) and f.id in imported:
            found.append((node.lineno, f.id))
    return found


def test_no_other_module_loops_over_steps():
    offenders, seen = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, name in _loop_calls(ast.parse(path.read_text(), str(path))):
            seen.add(rel)
            if rel != LOOP_SITE and rel not in ALLOWED_LOOPS:
                offenders.append(f"ip2p_jax/{rel}:{line}: lax.{name}")
    assert not offenders, ("sampling loops belong in ip2p_jax/diffusion/samplers.py (call samplers.sample); "
                           f"found: {offenders}")
    assert LOOP_SITE in seen   # the check finds the one loop there is
    assert set(ALLOWED_LOOPS) <= seen, "an allowed loop is gone: drop it from ALLOWED_LOOPS"


def test_static_check_catches_a_second_loop():
    src = ("import jax\nfrom jax import lax\nfrom jax.lax import scan as s\n"
           "def f(x):\n    a = jax.lax.fori_loop(0, 3, g, x)\n    b = lax.while_loop(c, g, x)\n    return s(g, x, None)\n")
    assert [name for _, name in _loop_calls(ast.parse(src))] == ["fori_loop", "while_loop", "s"]
