"""The Pallas attention on a device mesh runs per batch shard (shard_map; XLA cannot partition the
kernel): results equal one device (interpret mode, forward and gradients, the edit's ('data',) mesh
and training's ('data', 'fsdp') mesh, a batch that does not divide; the whole edit on 4 devices of
one process and of two processes), and a TPU export of a sharded edit and of the FSDP train step
holds the kernel inside a manual computation. Workers: this file as a script, on 4 CPU devices,
and as two gloo processes of 2 devices each."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from edit_fixtures import tiny_model_dir
    from train_helpers import worker_result
    out = str(tmp_path_factory.mktemp("sharded_attention") / "result.json")
    res = worker_result(__file__, [tiny_model_dir(tmp_path_factory), out], out, devices=4, timeout=600)
    res["dir"] = os.path.dirname(out)
    return res


def test_sharded_kernel_equals_one_device(result):
    for case in ("data", "data_fsdp", "indivisible"):
        assert result[case]["forward"] < 1e-6, case
        assert result[case]["grad"] < 1e-6, case
    assert result["xla_vs_pallas"] < 1e-5
    assert result["data"]["shards"] == 4 and result["data_fsdp"]["shards"] == 4
    assert result["indivisible"]["shards"] == 1   # 6 rows on 4 devices: each device runs all rows


def test_sharded_edit_equals_one_device(result):
    assert result["edit_4_vs_1"] < 1e-5
    assert result["edit_other_seed"] > 1e-3   # negative control: the comparison sees a changed edit


def test_two_processes_edit_as_one_device(result, tmp_path_factory):
    import numpy as np
    from edit_fixtures import tiny_model_dir
    from train_helpers import finish, free_port, subprocess_env
    port, out = free_port(), os.path.join(result["dir"], "two_processes.npy")
    procs = [subprocess.Popen([sys.executable, __file__, "--process", str(i), str(port),
                               tiny_model_dir(tmp_path_factory), out], env=subprocess_env(devices=2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    finish(procs, timeout=600)
    one = np.load(os.path.join(result["dir"], "one_device.npy"))
    assert np.abs(np.load(out) - one).max() < 1e-5


def test_tpu_exports_run_the_kernel_per_shard(result):
    for name in ("attention", "edit", "train_step"):
        assert result["tpu"][name]["kernel_in_manual_computation"], name
    # negative control: traced without the mesh, JAX refuses the kernel in a 4-device program
    assert "shard_map" in result["tpu"]["unmeshed_refused"]


def test_region_check_has_teeth():
    """A one-device TPU export calls the kernel directly: the check above must say no."""
    import jax
    import jax.numpy as jnp
    from ip2p_jax.models import layers, pallas_attention
    with pallas_attention.interpret(False):
        avals = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [(2, 64, 2, 40), (2, 77, 2, 40), (2, 77, 2, 40)]]
        mlir = jax.export.export(jax.jit(lambda q, k, v: layers.attention(q, k, v, impl="pallas")),
                                 platforms=["tpu"])(*avals).mlir_module()
    assert "tpu_custom_call" in mlir and not _kernel_in_manual_computation(mlir)


# ---------------------------------------------------------------------------------------- workers

EDIT = dict(steps=2, seed=5, progress=False)


def _edit(pipe, images, **kw):
    import numpy as np
    from edit_fixtures import INSTRUCTION
    return np.stack(pipe.edit(images, [INSTRUCTION] * len(images), batch_size=4, **kw).arrays)


def _process_worker(index: int, port: int, model_dir: str, out: str) -> None:
    """One of two processes (2 devices each): the Pallas edit on the global 4-device mesh."""
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, index)
    sys.path.insert(0, HERE)
    import edit_fixtures as fx
    from ip2p_jax.models import pallas_attention
    from ip2p_jax.pipeline import EditPipeline
    from ip2p_jax.weights import load
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    pipe = EditPipeline(load(model_dir, dtype=np.float32), dtype="fp32", attention_impl="pallas")
    with pallas_attention.interpret():
        arrays = _edit(pipe, fx.sample_images(4), **EDIT)
    if index == 0:
        np.save(out, arrays)


def _kernel_in_manual_computation(mlir: str) -> bool:
    """Whether the module's tpu_custom_calls are all reached from inside an sdy.manual_computation
    (shard_map) region of @main - through the private functions JAX outlines - and none outside."""
    funcs, name = {}, None
    for line in mlir.splitlines():
        m = re.search(r"func\.func \w+ @([\w.$-]+)\(", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name:
            funcs[name].append(line)
    seen = {"inside": False}

    def walk(func: str, inside: bool, stack=()) -> bool:   # False: a kernel reached outside a region
        depth, manual = 0, []
        for line in funcs[func]:
            here = inside or bool(manual)
            if "tpu_custom_call" in line:
                if not here:
                    return False
                seen["inside"] = True
            for callee in re.findall(r"call @([\w.$-]+)\(", line):
                if callee in funcs and callee not in stack and not walk(callee, here, stack + (func,)):
                    return False
            if "sdy.manual_computation" in line:
                manual.append(depth)
            depth += line.count("{") - line.count("}")
            while manual and depth <= manual[-1]:
                manual.pop()
        return True

    return walk("main", False) and seen["inside"]


def _worker(model_dir: str, out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    sys.path.insert(0, HERE)
    import edit_fixtures as fx
    from ip2p_jax import sharding
    from ip2p_jax.models import layers, pallas_attention
    from ip2p_jax.pipeline import EditPipeline
    from ip2p_jax.weights import load
    assert jax.device_count() == 4, jax.devices()
    r = np.random.default_rng(0)

    def qkv(batch):
        shapes = [(batch, 130, 2, 40), (batch, 77, 2, 40), (batch, 77, 2, 40)]
        return [jnp.asarray(r.standard_normal(s).astype(np.float32)) for s in shapes]

    def loss(q, k, v):   # a non-linear read-out, and the attention output itself
        out = layers.attention(q, k, v, impl="pallas")
        return jnp.sum(jnp.sin(out)), out

    def shards_seen(q):   # how many pieces the kernel's batch is cut into at trace time
        axes, divides = pallas_attention.mesh_split(q.shape[0])
        mesh = jax.sharding.get_abstract_mesh()
        return int(np.prod([mesh.shape[a] for a in axes])) if divides else 1

    res = {}
    meshes = {"data": (sharding.data_mesh(), P("data"), 8),
              "data_fsdp": (jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2),
                            P(("data", "fsdp")), 8),
              "indivisible": (sharding.data_mesh(), P(), 6)}
    with pallas_attention.interpret():
        for name, (mesh, spec, batch) in meshes.items():
            q, k, v = qkv(batch)
            grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
            (_, one_out), one_grad = jax.jit(grad_fn)(q, k, v)
            s = NamedSharding(mesh, spec)
            (_, value), grad = jax.jit(sharding.traced_on(mesh, grad_fn), in_shardings=(s,) * 3)(q, k, v)
            seen = []
            jax.eval_shape(sharding.traced_on(mesh, lambda a: seen.append(shards_seen(a)) or a), q)
            res[name] = {"forward": float(jnp.max(jnp.abs(value - one_out))),
                         "grad": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grad, one_grad)),
                         "shards": seen[0]}
        q, k, v = qkv(4)
        res["xla_vs_pallas"] = float(jnp.max(jnp.abs(layers.attention(q, k, v, impl="pallas")
                                                     - layers.attention(q, k, v, impl="xla"))))

        # the whole edit, Pallas attention everywhere, on 4 devices and on 1
        components = load(model_dir, dtype=np.float32)
        images = fx.sample_images(4)
        kw = EDIT
        edits = {}
        for n in (4, 1):
            pipe = EditPipeline(components, dtype="fp32", attention_impl="pallas",
                                mesh=sharding.data_mesh(jax.devices()[:n]))
            edits[n] = _edit(pipe, images, **kw)
        other_seed = _edit(pipe, images, **{**kw, "seed": 6})
        res["edit_4_vs_1"] = float(np.abs(edits[4] - edits[1]).max())
        np.save(os.path.join(os.path.dirname(out), "one_device.npy"), edits[1])
        res["edit_other_seed"] = float(np.abs(other_seed - edits[1]).max())

    tpu = {}
    with pallas_attention.interpret(False):
        mesh = sharding.data_mesh()
        s = sharding.batch_sharding(mesh)
        avals = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) for a in qkv(8)]
        attend = lambda q, k, v: layers.attention(q, k, v, impl="pallas")  # noqa: E731
        exp = jax.export.export(jax.jit(sharding.traced_on(mesh, attend), in_shardings=(s,) * 3),
                                platforms=["tpu"])(*avals)
        tpu["attention"] = {"kernel_in_manual_computation": _kernel_in_manual_computation(exp.mlir_module())}
        try:   # negative control: without the mesh, a multi-device TPU program cannot hold the kernel
            jax.export.export(jax.jit(attend, in_shardings=(s,) * 3), platforms=["tpu"])(*avals)
            tpu["unmeshed_refused"] = ""
        except NotImplementedError as e:
            tpu["unmeshed_refused"] = str(e)
        pipe = EditPipeline(components, dtype="bf16", attention_impl="pallas")
        exp = pipe.export(platform="tpu", batch=4, size=(fx.H, fx.W), steps=2)
        tpu["edit"] = {"kernel_in_manual_computation": _kernel_in_manual_computation(exp.mlir_module())}
        tpu["train_step"] = {"kernel_in_manual_computation": _train_step_kernel_sharded(components)}
    res["tpu"] = tpu
    with open(out, "w") as f:
        json.dump(res, f)


def _train_step_kernel_sharded(components) -> bool:
    """Lower the FSDP runner's compiled train step (2x2 mesh, Pallas attention) for TPU."""
    import jax
    import jax.numpy as jnp
    from ip2p_jax.models.unet import UNet2DConditionModel
    from ip2p_jax.train import parallel
    from ip2p_jax.train import state as st
    from ip2p_jax.train import step as sp

    c = components
    unet = UNet2DConditionModel(c.unet_config, dtype=jnp.bfloat16, attention_impl="pallas")
    opt = st.OptimizerConfig()
    tx = st.make_optimizer(opt)
    runner = parallel.make_runner("jit", sp.Models(unet=unet), sp.StepConfig(), tx, st.learning_rate_schedule(opt),
                                  mesh_data=2, fsdp=2, fsdp_min_size=1)
    sds = jax.ShapeDtypeStruct
    state = runner.restore_target(st.abstract_train_state(
        {"unet": jax.tree.map(lambda a: sds(a.shape, jnp.float32), c.unet_params)}, tx))
    b, h, w, ch = 4, 8, 8, c.vae_config.latent_channels
    text = (77, c.text_config.hidden_size)
    frozen = {"null_embedding": sds(text, jnp.float32), "alphas_cumprod": sds((1000,), jnp.float32)}
    runner._frozen_sh = runner.shardings(frozen)   # what put_frozen records, without arrays
    batch = {"input_moments": sds((b, h, w, 2 * ch), jnp.float32), "edited_moments": sds((b, h, w, 2 * ch), jnp.float32),
             "text_embedding": sds((b,) + text, jnp.float32), "example_id": sds((b,), jnp.int32)}
    exported = jax.export.export(runner._compile(), platforms=["tpu"])(state, frozen, batch)
    return _kernel_in_manual_computation(exported.mlir_module())


if __name__ == "__main__":
    if sys.argv[1] == "--process":
        _process_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        _worker(sys.argv[1], sys.argv[2])
