"""Train-state pieces that need no model: conditioning dropout, EMA, LR schedule, optimizer, sharding
rule, micro-batch split, config presets and --config.key=value overrides."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models.unet import remat_policy
from ip2p_jax.train import dropout, parallel, state as st, step as sp
from ip2p_jax.train.configs import ConfigOverrideError, apply_overrides, load_config, split_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "train.py")


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_dropout_rates(p):
    n = 400_000
    r = jax.random.uniform(jax.random.key(1), (n,))
    text, image = (np.asarray(m) for m in dropout.dropout_masks(r, p))
    rates = {"text only": np.mean(text & ~image), "both": np.mean(text & image),
             "image only": np.mean(~text & image), "neither": np.mean(~text & ~image)}
    sigma = np.sqrt(p * (1 - p) / n)
    for name in ("text only", "both", "image only"):
        assert abs(rates[name] - p) < 5 * sigma, (name, rates[name], p)
    assert abs(rates["neither"] - (1 - 3 * p)) < 5 * np.sqrt(3 * p * (1 - 3 * p) / n)


def test_dropout_thresholds_are_the_authors():
    r = jnp.array([0.0, 0.0499, 0.05, 0.0999, 0.1, 0.1499, 0.15, 0.9])
    text, image = dropout.dropout_masks(r, 0.05)
    assert np.asarray(text).tolist() == [True, True, True, True, False, False, False, False]
    assert np.asarray(image).tolist() == [False, False, True, True, True, True, False, False]


def test_dropped_inputs_are_null_embedding_and_zeros():
    rng = np.random.default_rng(0)
    b = 64
    text = jnp.asarray(rng.standard_normal((b, 77, 8)), jnp.float32)
    null = jnp.asarray(rng.standard_normal((1, 77, 8)), jnp.float32)
    image = jnp.asarray(rng.standard_normal((b, 4, 4, 4)), jnp.float32)
    r = jnp.asarray(rng.uniform(0, 0.3, b), jnp.float32)
    t2, i2 = dropout.conditioning_dropout(r, 0.05, text, null, image)
    drop_text, drop_image = (np.asarray(m) for m in dropout.dropout_masks(r, 0.05))
    assert drop_text.any() and drop_image.any() and (~drop_text & ~drop_image).any()
    for k in range(b):
        np.testing.assert_array_equal(t2[k], null[0] if drop_text[k] else text[k])
        np.testing.assert_array_equal(i2[k], np.zeros((4, 4, 4)) if drop_image[k] else image[k])


def test_ema_warmup_and_update():
    assert float(st.ema_decay(1, 0.9999)) == pytest.approx(2 / 11)
    assert float(st.ema_decay(100, 0.9999)) == pytest.approx(101 / 110)
    assert float(st.ema_decay(10**6, 0.9999)) == pytest.approx(0.9999)
    ema = {"w": jnp.array([1.0, 2.0])}
    new = st.ema_update(ema, {"w": jnp.array([3.0, 0.0])}, 1, 0.9999)
    d = 2 / 11
    np.testing.assert_allclose(new["w"], d * np.array([1.0, 2.0]) + (1 - d) * np.array([3.0, 0.0]), rtol=1e-6)


def test_learning_rate_warmup_then_constant():
    sched = st.learning_rate_schedule(st.OptimizerConfig(learning_rate=1e-4, warmup_steps=10))
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-5)
    assert float(sched(10)) == pytest.approx(1e-4) and float(sched(10_000)) == pytest.approx(1e-4)
    assert float(st.learning_rate_schedule(st.OptimizerConfig(learning_rate=1e-4))(0)) == pytest.approx(1e-4)


def test_learning_rate_cool_down_after_constant():
    cfg = st.OptimizerConfig(learning_rate=1e-4, warmup_steps=10, decay_start=100, decay_steps=50)
    sched = st.learning_rate_schedule(cfg)
    assert float(sched(5)) == pytest.approx(5e-5) and float(sched(100)) == pytest.approx(1e-4)
    assert float(sched(125)) == pytest.approx(5e-5) and float(sched(150)) == 0.0 and float(sched(10**4)) == 0.0
    with pytest.raises(ValueError, match="decay_start"):
        st.learning_rate_schedule(st.OptimizerConfig(warmup_steps=10, decay_start=5, decay_steps=5))


def test_optimizer_is_adamw_with_clipping():
    cfg = st.OptimizerConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0)
    tx = st.make_optimizer(cfg)
    params = {"w": jnp.array([2.0, -1.0])}
    grads = {"w": jnp.array([30.0, 40.0])}                    # norm 50 -> clipped to norm 1
    updates, _ = tx.update(grads, tx.init(params), params)
    # first AdamW step: -lr * (g/|g| + wd * p) elementwise (bias-corrected m/sqrt(v) = sign(g))
    np.testing.assert_allclose(updates["w"], -0.1 * (np.sign([30.0, 40.0]) + 0.5 * np.array([2.0, -1.0])),
                               rtol=1e-4)


def test_train_state_and_abstract_state_agree():
    tx = st.make_optimizer(st.OptimizerConfig())
    params = {"unet": {"k": np.ones((3, 4), np.float32)}}
    s = st.create_train_state(params, tx, seed=3)
    a = st.abstract_train_state(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), tx)
    assert jax.tree.structure(s) == jax.tree.structure(a)
    assert [x.shape for x in jax.tree.leaves(s)] == [x.shape for x in jax.tree.leaves(a)]
    assert s.ema_params["unet"]["k"] is not s.params["unet"]["k"]


def test_fsdp_spec_picks_largest_divisible_axis():
    from jax.sharding import PartitionSpec as P

    assert parallel.fsdp_spec((3, 3, 320, 640), 2, 0) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((7, 6), 2, 0) == P(None, "fsdp")
    assert parallel.fsdp_spec((7,), 2, 0) == P()
    assert parallel.fsdp_spec((1024,), 2, 10_000) == P()       # small arrays stay replicated
    assert parallel.fsdp_spec((1024,), 1, 0) == P()


def test_micro_batches_split_by_stride():
    batch = {"x": jnp.arange(8)}
    micro = sp.micro_batches(batch, 4)["x"]
    assert micro.shape == (4, 2)
    assert np.asarray(micro).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="grad_accum=3"):
        sp.micro_batches(batch, 3)


def test_step_config_validates():
    with pytest.raises(ValueError, match="prediction_type"):
        sp.StepConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="cond_dropout_prob"):
        sp.StepConfig(cond_dropout_prob=0.5)


def test_presets_load():
    for preset, init in [("sd15", "runwayml/stable-diffusion-v1-5"), ("tiny", ""), ("shapes", "")]:
        c = load_config(f"{CONFIG}:{preset}")
        assert c.preset == preset and c.model.init == init
    sd = load_config(f"{CONFIG}:sd15")
    assert (sd.train.batch_size, sd.train.grad_accum, sd.optim.learning_rate, sd.train.ema_decay,
            sd.train.cond_dropout_prob, sd.data.resolution) == (1024, 4, 1e-4, 0.9999, 0.05, 256)
    with pytest.raises(ConfigOverrideError, match="unknown preset"):
        load_config(f"{CONFIG}:nope")
    with pytest.raises(ConfigOverrideError, match="no such file"):
        load_config("nope.py:tiny")


def test_overrides():
    c = load_config(f"{CONFIG}:tiny")
    ov, rest = split_overrides(["--workdir", "w", "--config.train.batch_size=64", "--config.model.remat",
                                "--config.optim.learning_rate", "2e-4", "--config.model.init=/m",
                                "--config.model.unet.block_out_channels=(32, 64)"])
    assert rest == ["--workdir", "w"]
    apply_overrides(c, ov)
    assert c.train.batch_size == 64 and remat_policy(c.model.remat) == "full" and c.optim.learning_rate == 2e-4
    assert c.model.init == "/m" and tuple(c.model.unet.block_out_channels) == (32, 64)
    with pytest.raises(ConfigOverrideError, match="did you mean train.batch_size"):
        apply_overrides(c, ["--config.train.batch_sise=3"])
    with pytest.raises(ConfigOverrideError, match="expected an integer"):
        apply_overrides(c, ["--config.train.batch_size=1.5"])
    with pytest.raises(ConfigOverrideError, match="boolean"):
        apply_overrides(c, ["--config.model.train_text_encoder=maybe"])


def test_cli_parses_overrides():
    from ip2p_jax import cli

    args = cli.build_parser().parse_args(["train", "--config", "configs/train.py:tiny", "--config.train.num_steps=3",
                                          "--workdir", "w", "--config.model.remat", "true"])
    assert args.workdir == "w" and args.config == "configs/train.py:tiny"
    assert args.config_overrides == ["--config.train.num_steps=3", "--config.model.remat=true"]


def test_bad_batch_size_is_a_clear_error():
    from ip2p_jax.train.loop import TrainingStopped, check_batch

    c = load_config(f"{CONFIG}:tiny")
    c.train.batch_size, c.train.grad_accum = 12, 4
    with pytest.raises(TrainingStopped, match="multiple of grad_accum"):
        check_batch(c, num_devices=2)


@pytest.fixture(scope="module")
def sd_and_ip2p_folders(tmp_path_factory):
    """A tiny 4-channel Stable Diffusion folder and a tiny 8-channel InstructPix2Pix folder."""
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import tiny

    tmp = tmp_path_factory.mktemp("init")
    tok = tiny.tokenizer(tempfile.mkdtemp(prefix="tok_"))
    sd = StableDiffusionPipeline(vae=tiny.vae(1), text_encoder=tiny.text_encoder(len(tok), 1), tokenizer=tok,
                                 unet=tiny.unet(4, seed=1), scheduler=DDIMScheduler(), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(str(tmp / "sd"))
    return str(tmp / "sd"), tiny.save_pipeline(str(tmp / "ip2p"), seed=2)


def test_init_from_sd_widens_conv_in_and_from_ip2p_continues(sd_and_ip2p_folders):
    from ip2p_jax.train.build import build
    from ip2p_jax.weights import load

    sd_dir, ip2p_dir = sd_and_ip2p_folders
    c = load_config(f"{CONFIG}:tiny")
    c.model.init, c.model.train_text_encoder = sd_dir, False
    built = build(c)
    src = load(sd_dir)
    k = built.params["unet"]["conv_in"]["kernel"]
    assert built.unet_config.in_channels == 8 and k.shape[2] == 8
    np.testing.assert_array_equal(k[:, :, :4], src.unet_params["conv_in"]["kernel"])
    assert not np.any(k[:, :, 4:])
    np.testing.assert_array_equal(built.params["unet"]["conv_in"]["bias"], src.unet_params["conv_in"]["bias"])
    assert any("widened to 8" in n for n in built.notes)
    assert built.frozen["null_embedding"].shape == (1, 77, 32) and "text_encoder" not in built.params

    c.model.init = ip2p_dir
    built = build(c)
    src = load(ip2p_dir)
    for a, b in zip(jax.tree.leaves(built.params["unet"]), jax.tree.leaves(src.unet_params)):
        np.testing.assert_array_equal(a, b)
    assert any("continuing" in n for n in built.notes)


def test_tfds_source_feeds_the_step_inputs(tmp_path):
    """config.data.source=tfds: the run's stream gives this host's batch of uint8 images and token ids."""
    import data_helpers
    import tiny
    from ip2p_jax.data.builder import build_dataset
    from ip2p_jax.train.data import make_train_data, model_inputs

    data_helpers.write_jsonl(str(tmp_path / "src"), n=40, size=32)
    build_dataset("jsonl", str(tmp_path / "src"), str(tmp_path / "tfds"), name="pairs", workers=1, progress=False)
    c = load_config(f"{CONFIG}:tiny")
    c.data.source, c.data.path, c.data.name, c.data.split = "tfds", str(tmp_path / "tfds"), "pairs", "train"
    c.data.resolution, c.data.min_resize, c.data.max_resize = 16, 16, 24
    batch = model_inputs(next(make_train_data(c, tiny.tokenizer(str(tmp_path / "tok")))))
    assert sorted(batch) == ["edited_image", "input_ids", "input_image"]
    assert batch["input_image"].shape == batch["edited_image"].shape == (8, 16, 16, 3)
    assert batch["input_image"].dtype == np.uint8   # bytes on the wire; the step scales them on the device
    assert batch["input_ids"].shape == (8, 77) and batch["input_ids"].dtype == np.int32


def test_uint8_batches_train_as_their_float_images(tmp_path):
    """config.data.image_dtype: a uint8 batch (scaled on the device) gives the same step as the host's
    [-1, 1] floats of the same pixels; a batch of other pixels does not (negative control)."""
    from train_helpers import tiny_config, tokenizer_dir
    from ip2p_jax.data.augment import to_float
    from ip2p_jax.train.build import build
    from ip2p_jax.train.data import make_train_data, model_inputs

    config = tiny_config(tokenizer_dir(str(tmp_path)))
    built = build(config)
    raw = model_inputs(next(make_train_data(config, built.tokenizer)))
    assert raw["input_image"].dtype == np.uint8
    floats = dict(raw, input_image=to_float(raw["input_image"]), edited_image=to_float(raw["edited_image"]))
    other = dict(raw, edited_image=255 - raw["edited_image"])
    ocfg = st.OptimizerConfig.from_mapping(config.optim)
    mesh = parallel.make_mesh(1, 1)
    runner = parallel.MeshRunner(built.models, built.step_config, st.make_optimizer(ocfg),
                                 st.learning_rate_schedule(ocfg), mesh, 0)
    frozen = runner.put_frozen(built.frozen)
    losses = [float(runner.scalars(runner.step(runner.init_state(built.params, config.seed), frozen,
                                               runner.put_batch(b))[1])["loss"]) for b in (raw, floats, other)]
    assert losses[0] == losses[1] and losses[2] != losses[0]


def test_input_workers_default_follows_the_host(monkeypatch):
    from ip2p_jax.train import data

    for cores, want in ((2, 0), (16, 4), (240, 8)):
        monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert data.input_workers(-1) == want
    assert data.input_workers(3) == 3 and data.input_workers(0) == 0


def test_finetune_preset_keeps_the_editor_as_it_is(sd_and_ip2p_folders):
    """finetune from an 8-channel editor: conv_in (and every UNet leaf) bit-identical, the EMA starts
    as the loaded weights; a 4-channel SD init is refused there (the sd15/tiny path still widens it)."""
    import optax

    from ip2p_jax.train.build import ModelBuildError, build
    from ip2p_jax.train.state import create_train_state
    from ip2p_jax.weights import load

    sd_dir, ip2p_dir = sd_and_ip2p_folders
    c = load_config(f"{CONFIG}:finetune")
    assert (c.model.init, c.model.init_must_be_editor, c.optim.learning_rate, c.optim.warmup_steps,
            c.data.resolution, c.data.name) == ("timbrooks/instruct-pix2pix", True, 5e-5, 1000, 256, "magicbrush")
    c.model.init, c.model.compute_dtype = ip2p_dir, "float32"
    built = build(c)
    src = load(ip2p_dir)
    assert built.unet_config.in_channels == 8
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(built.params["unet"]["conv_in"][name], src.unet_params["conv_in"][name])
    state = create_train_state(built.params, optax.sgd(1e-3), 0)
    for a, b in zip(jax.tree.leaves(state.ema_params["unet"]), jax.tree.leaves(src.unet_params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    c.model.init = sd_dir
    with pytest.raises(ModelBuildError, match="not an InstructPix2Pix editor .* 4 input channels"):
        build(c)
    c.model.init_must_be_editor = False   # the paper's path: 4 -> 8 channels
    widened = build(c)
    assert widened.params["unet"]["conv_in"]["kernel"].shape[2] == 8
    assert not np.any(widened.params["unet"]["conv_in"]["kernel"][:, :, 4:])
