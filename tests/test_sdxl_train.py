"""SDXL InstructPix2Pix training: the one train step on an SDXL model against a diffusers-style loss
computed with the references (diffusers UNet / VAE, transformers encoders) on the same tiny weights;
conditioning dropout of text + pooled together; the sdxl_tiny preset on 4 simulated devices with
fsdp = 2 equals one device, its per-device bytes are what train.memory reports, and a run killed
after a checkpoint resumes to the uninterrupted run's state.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from train_helpers import CONFIG, ROOT, run_once, subprocess_env, tokenizer_dir, worker_result

STEPS = 3
# As tests/test_train_parallel.py, only the order of floating-point sums differs (losses agree to ~5e-7
# relative); Adam's division by sqrt(v) keeps small gradients' rounding in the update, so after 3 steps
# (largest param change ~9e-3) params differ by up to ~2.3e-5 (a few leaves whose gradients are near
# rounding level): the tolerance is 4e-5, ~0.4% of that change.
ATOL = 4e-5


def test_dropout_drops_text_and_pooled_together():
    from ip2p_jax.train import dropout

    rng = np.random.default_rng(0)
    b = 64
    text = {"text": jnp.asarray(rng.standard_normal((b, 77, 8)), jnp.float32),
            "pooled": jnp.asarray(rng.standard_normal((b, 4)), jnp.float32)}
    null = {"text": jnp.asarray(rng.standard_normal((1, 77, 8)), jnp.float32),
            "pooled": jnp.asarray(rng.standard_normal((1, 4)), jnp.float32)}
    image = jnp.asarray(rng.standard_normal((b, 2, 2, 4)), jnp.float32)
    r = jnp.asarray(rng.uniform(0, 0.3, b), jnp.float32)
    t2, i2 = dropout.conditioning_dropout(r, 0.05, text, null, image)
    drop_text, drop_image = (np.asarray(m) for m in dropout.dropout_masks(r, 0.05))
    assert drop_text.any() and (~drop_text).any() and drop_image.any()
    for k in range(b):
        for leaf in ("text", "pooled"):
            np.testing.assert_array_equal(t2[leaf][k], null[leaf][0] if drop_text[k] else text[leaf][k])
        np.testing.assert_array_equal(i2[k], 0 * image[k] if drop_image[k] else image[k])


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return tiny.save_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "model"), seed=3)


def _reference_loss(folder, batch, eps, noise, t, r, prob, *, drop_pooled=True, penultimate=True):
    """diffusers' train_instruct_pix2pix_sdxl.py loss per example with the given randomness (posterior
    eps, noise, timesteps, dropout uniforms); image latents are the posterior mode (the authors', as
    our SD step), the pooled embedding is dropped with the text (drop_pooled=False: the script's)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(folder)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    from ip2p_jax.data.augment import to_float

    def nchw(a):   # uint8 batch images -> [-1, 1] as the step scales them; floats as they are
        a = np.asarray(a)
        a = to_float(a) if a.dtype == np.uint8 else a
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    def encode(ids_1, ids_2):
        o1 = pipe.text_encoder(torch.from_numpy(ids_1).long(), output_hidden_states=True)
        o2 = pipe.text_encoder_2(torch.from_numpy(ids_2).long(), output_hidden_states=True)
        h = [o.hidden_states[-2] if penultimate else o.last_hidden_state for o in (o1, o2)]
        return torch.cat(h, dim=-1), o2.text_embeds

    with torch.no_grad():
        edited = pipe.vae.encode(nchw(batch["edited_image"])).latent_dist
        latents = (edited.mean + edited.std * nchw(eps)) * pipe.vae.config.scaling_factor
        image_latents = pipe.vae.encode(nchw(batch["input_image"])).latent_dist.mode()
        text, pooled = encode(batch["input_ids"], batch["input_ids_2"])
        null_text, null_pooled = encode(batch["input_ids"][:1] * 0 + _empty_ids(pipe.tokenizer),
                                        batch["input_ids_2"][:1] * 0 + _empty_ids(pipe.tokenizer_2))
        rp = torch.from_numpy(np.array(r))
        prompt_mask = (rp < 2 * prob).reshape(-1, 1, 1)
        text = torch.where(prompt_mask, null_text, text)
        if drop_pooled:
            pooled = torch.where(prompt_mask[:, :, 0], null_pooled, pooled)
        image_mask = 1 - ((rp >= prob).float() * (rp < 3 * prob).float())
        image_latents = image_mask.reshape(-1, 1, 1, 1) * image_latents
        tt = torch.from_numpy(np.asarray(t)).long()
        noise_t = nchw(noise)
        noisy = sched.add_noise(latents, noise_t, tt)
        h, w = batch["edited_image"].shape[1:3]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(tt), dtype=torch.float32)
        pred = pipe.unet(torch.cat([noisy, image_latents], dim=1), tt, text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return float(torch.nn.functional.mse_loss(pred.float(), noise_t.float()))


def _empty_ids(tokenizer):
    from ip2p_jax.tokenizer import tokenize

    return tokenize(tokenizer, [""])


def test_sdxl_loss_equals_diffusers_reference(sdxl_folder):
    from ip2p_jax.train import step as sp
    from ip2p_jax.train.build import build
    from ip2p_jax.train.configs import load_config
    from ip2p_jax.train.data import make_train_data, model_inputs

    prob = 1 / 3   # every example drops something: text + pooled, both, or the image
    c = load_config(CONFIG + ":sdxl_tiny")
    c.model.init = sdxl_folder
    c.model.compute_dtype = "float32"
    c.train.cond_dropout_prob = prob
    c.data.resolution = c.data.min_resize = c.data.max_resize = 16
    built = build(c)
    assert built.is_sdxl and built.pipeline_config["force_zeros_for_empty_prompt"] is False
    batch = model_inputs(next(make_train_data(c, built.tokenizer, tokenizer_2=built.tokenizer_2)))
    batch = {k: v[:4] for k, v in batch.items()}
    batch["example_id"] = np.arange(4, dtype=np.int32)
    step_key = jax.random.key(5)
    got = float(jax.jit(sp.make_loss_fn(built.models, built.step_config))(built.params, built.frozen, batch, step_key))

    # the step's own draws, as make_loss_fn takes them from the per-example keys
    keys = sp.example_keys(step_key, jnp.asarray(batch["example_id"]))
    shape = (4, 8, 8, 4)
    eps = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys[:, 1])
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000))(keys[:, 2])
    r = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, ()))(keys[:, 3]))
    assert (r < 2 * prob).any() and (r >= 2 * prob).any()   # text dropped in some rows, kept in others
    want = _reference_loss(sdxl_folder, batch, eps, noise, t, r, prob)
    assert abs(got - want) <= 1e-4 * abs(want), (got, want)
    # negative controls: the script's undropped pooled embedding, or final (not penultimate) states, differ
    for kw in ({"drop_pooled": False}, {"penultimate": False}):
        other = _reference_loss(sdxl_folder, batch, eps, noise, t, r, prob, **kw)
        assert abs(other - want) > 1e-3 * abs(want), (kw, other, want)


def test_time_ids_follow_the_crop():
    from ip2p_jax.data import augment as aug

    p = aug.JointParams(size=300, top=10, left=20, flip=False)
    np.testing.assert_array_equal(aug.sdxl_time_ids((480, 640), p, 256), [480, 640, 10, 20, 256, 256])
    flipped = aug.JointParams(size=300, top=10, left=20, flip=True)   # a crop of the flipped image
    np.testing.assert_array_equal(aug.sdxl_time_ids((480, 640), flipped, 256), [480, 640, 10, 24, 256, 256])


def test_sdxl_build_errors(tmp_path):
    from ip2p_jax.train.build import ModelBuildError, build
    from ip2p_jax.train.configs import load_config

    c = load_config(CONFIG + ":sdxl_tiny")
    c.model.text_encoder_2 = {}
    with pytest.raises(ModelBuildError, match="text_time.*text_encoder_2"):
        build(c, load_weights=False)
    c = load_config(CONFIG + ":sdxl_tiny")
    c.model.train_text_encoder = True
    with pytest.raises(ModelBuildError, match="train_text_encoder"):
        build(c, load_weights=False)


# ----------------------------------------------------------------------------- 4 devices, fsdp = 2

def worker(out_path: str, tok: str) -> None:
    from jax.sharding import AxisType, Mesh

    from ip2p_jax.train import memory, parallel, state as st
    from ip2p_jax.train.build import build
    from ip2p_jax.train.configs import load_config
    from ip2p_jax.train.data import make_train_data, model_inputs

    config = load_config(CONFIG + ":sdxl_tiny")
    config.model.tokenizer = tok
    config.optim.eps = 1e-6   # see tests/test_train_parallel.py (zero-gradient k_proj biases)
    built = build(config)
    ocfg = st.OptimizerConfig.from_mapping(config.optim)
    tx, sched = st.make_optimizer(ocfg), st.learning_rate_schedule(ocfg)
    data = make_train_data(config, built.tokenizer, tokenizer_2=built.tokenizer_2)
    batches = [model_inputs(next(data)) for _ in range(STEPS)]
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    out = {"losses": {}}
    states = {}
    for name, mesh in (("one", one), ("fsdp", parallel.make_mesh(2, 2))):
        runner = parallel.MeshRunner(built.models, built.step_config, tx, sched, mesh, 0)
        state = runner.init_state(built.params, config.seed)
        if name == "fsdp":   # what one device holds, against the memory report of the same shapes
            dev = jax.devices()[0]
            held = {part: sum(s.data.nbytes for x in jax.tree.leaves(getattr(state, attr))
                              for s in x.addressable_shards if s.device == dev)
                    for part, attr in (("params", "params"), ("ema", "ema_params"), ("optimizer", "opt_state"))}
            out["held"] = held
            out["report"] = memory.train_state_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                                  np.float32), built.params), 2, min_size=0)
            out["report_one"] = memory.train_state_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                np.shape(x), np.float32), built.params), 1, min_size=0)
        frozen = runner.put_frozen(built.frozen)
        losses = []
        for b in batches:
            state, m = runner.step(state, frozen, runner.put_batch(b))
            losses.append(runner.scalars(m)["loss"])
        states[name], out["losses"][name] = parallel.fetch(state), losses
    a, b = states["one"], states["fsdp"]
    out["max_abs_diff"] = {f: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                                  for x, y in zip(jax.tree.leaves(getattr(a, f)), jax.tree.leaves(getattr(b, f))))
                           for f in ("params", "ema_params", "opt_state")}
    out["param_change"] = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                              for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(built.params)))
    with open(out_path, "w") as f:
        json.dump(out, f)


def _compute_parallel(folder: str) -> dict:
    out = os.path.join(folder, "out.json")
    return worker_result(__file__, ["worker", out, tokenizer_dir(folder)], out, devices=4)


@pytest.fixture(scope="module")
def parallel_result(tmp_path_factory):
    return run_once(tmp_path_factory, "sdxl_parallel", _compute_parallel)


def test_fsdp2_on_4_devices_equals_one_device(parallel_result):
    r = parallel_result
    assert r["param_change"] > 100 * ATOL
    for field, diff in r["max_abs_diff"].items():
        assert diff <= ATOL, (field, diff)
    np.testing.assert_allclose(r["losses"]["fsdp"], r["losses"]["one"], rtol=1e-5)


def test_memory_report_is_what_a_device_holds(parallel_result):
    held, report, one = parallel_result["held"], parallel_result["report"], parallel_result["report_one"]
    for part in ("params", "ema", "optimizer"):
        assert held[part] == report[part], (part, held, report)
        assert report[part] < 0.6 * one[part]   # fsdp = 2 roughly halves it


def test_memory_script_table_on_a_tiny_config():
    """scripts/sdxl_memory.py's table of train.memory rows, here for the tiny SDXL UNet (fsdp 1, 2)."""
    import importlib.util

    from ip2p_jax.models import unet
    from ip2p_jax.train import memory
    from ip2p_jax.train.configs import load_config

    spec = importlib.util.spec_from_file_location("sdxl_memory", os.path.join(ROOT, "scripts", "sdxl_memory.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shapes = unet.abstract_params(unet.UNetConfig.from_dict(dict(load_config(CONFIG + ":sdxl_tiny").model.unet)))
    rows = []
    for n in (1, 2):
        state = memory.train_state_bytes(shapes, n, min_size=0)
        rows.append({"fsdp": n, **{f"unet_{k}": v * 2 ** 20 for k, v in state.items()}, "frozen": 0,
                     "total": state["total"] * 2 ** 20})   # scaled so GiB shows digits
    table = script.markdown_table(rows).splitlines()
    assert table[0].startswith("| `parallel.fsdp` | UNet params | EMA | AdamW state") and len(table) == 4
    one, two = (line.split(" | ") for line in table[2:])
    assert one[0] == "| 1" and two[0] == "| 2"
    p1, p2 = (float(cell.split()[0]) for cell in (one[1], two[1]))
    assert p1 == pytest.approx(rows[0]["unet_params"] / 2 ** 30, abs=0.05) and p2 < 0.6 * p1


# ----------------------------------------------------------------------------- kill and resume

RESUME_STEPS, EVERY = 8, 3


def _train_cmd(workdir: str, tok: str) -> list[str]:
    return [sys.executable, "-m", "ip2p_jax.cli", "train", "--config", CONFIG + ":sdxl_tiny", "--workdir", workdir,
            f"--config.model.tokenizer={tok}", f"--config.train.num_steps={RESUME_STEPS}",
            f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.async_save=false",
            "--config.log.every_steps=1", "--config.log.tensorboard=false"]


def _compute_resume(tmp: str) -> dict:
    tok = tokenizer_dir(tmp)
    env = subprocess_env(cache_dir=os.path.join(tmp, "xla_cache"))
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    done = subprocess.run(_train_cmd(a, tok), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # B: SIGKILL once step 5 is logged (the step-3 checkpoint was written synchronously), then rerun
    p = subprocess.Popen(_train_cmd(b, tok), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    killed_after = None
    for line in p.stdout:
        if f"step 5/{RESUME_STEPS}" in line:
            killed_after = line
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert killed_after, "the run ended before step 5"
    rerun = subprocess.run(_train_cmd(b, tok), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    return {"a": a, "b": b, "rerun_log": rerun.stdout + rerun.stderr}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    return run_once(tmp_path_factory, "sdxl_resume", _compute_resume)


def test_killed_run_resumes_to_the_same_state(resume_runs):
    from test_train_resume import read_state

    assert f"resumed from {os.path.join(resume_runs['b'], 'checkpoints')}/{EVERY}" in resume_runs["rerun_log"]
    a, b = read_state(resume_runs["a"], RESUME_STEPS), read_state(resume_runs["b"], RESUME_STEPS)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_export_is_an_sdxl_folder(resume_runs):
    from ip2p_jax.weights import load

    c = load(os.path.join(resume_runs["a"], "export"), dtype=np.float32)
    assert c.is_sdxl and c.unet_config.text_time and c.pipeline_config.get("force_zeros_for_empty_prompt") is False


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
