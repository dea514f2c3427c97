"""The demo model: the shipped folder, `make demo`'s code path, the tokenizer, and a few training
steps of the demo pipeline (VAE -> TFDS shapes pairs encoded into a latent cache -> UNet + text encoder ->
folder), each stage a preset of the one training loop."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from unittest import mock

import numpy as np
import pytest

from ip2p_jax import demo
from ip2p_jax.datagen import demo_model as dm

TINY = {
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8], layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                norm_num_groups=4, sample_size=64, mid_block_add_attention=False, scaling_factor=0.18215),
    "text_encoder": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         projection_dim=16),
    "unet": dict(sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=[16, 16],
                 norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
}


def _folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


# ----------------------------------------------------------------------------- shipped model + demo


def test_shipped_model_is_a_small_diffusers_folder():
    path = demo.demo_model_path()
    assert os.path.samefile(path, demo.DEMO_MODEL_DIR) or os.environ.get(demo.DEMO_MODEL_ENV)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(path, sub)), sub
    assert _folder_mb(path) <= 25.0
    with open(os.path.join(path, "unet", "config.json")) as f:
        assert json.load(f)["in_channels"] == 8


def test_autoencode_with_the_shipped_vae():
    """EditPipeline.autoencode: the VAE round trip of shapes scenes is close to them (and is the
    model's own VAE forward pass, not the input returned)."""
    from ip2p_jax.datagen.shapes.evaluate import held_out_examples
    from ip2p_jax.images import to_model_array
    from ip2p_jax.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(demo.demo_model_path())
    images = [e.output_image() for e in held_out_examples(6, seed=3)]
    out = pipe.autoencode(images)
    assert [im.size for im in out] == [(64, 64)] * 6
    got, want = (np.stack([to_model_array(im) for im in ims]) for ims in (out, images))
    psnr = 10 * np.log10(4.0 / np.mean((got - want) ** 2))
    assert 20.0 < psnr < 60.0


def test_demo_edits_an_example(tmp_path):
    """make demo's code path (run_demo) on one example image and one instruction, 2 steps."""
    from PIL import Image

    items = demo.read_examples()
    ex = tmp_path / "examples"
    ex.mkdir()
    Image.open(items[0]["image"]).save(ex / "in.png")
    (ex / demo.EXAMPLES_FILE).write_text(json.dumps([{"image": "in.png", "instructions": [items[0]["instructions"][0]]}]))
    res = demo.run_demo(str(tmp_path / "out"), examples=str(ex), steps=2, progress=False)
    assert len(res["images"]) == 1
    out = Image.open(res["images"][0])
    assert out.size == (64, 64)
    grid = Image.open(res["grid"])
    assert grid.size == (2 * demo.CELL, demo.CELL + demo.LABEL_HEIGHT)


def test_missing_demo_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.DEMO_MODEL_ENV, str(tmp_path))
    with pytest.raises(demo.DemoError, match="no demo model"):
        demo.demo_model_path()
    assert demo.main(["--out", str(tmp_path / "o")]) == 2


def test_examples_are_shapes_world_scenes_with_valid_instructions():
    from ip2p_jax.datagen.shapes import parse_caption, parse_instruction

    items = demo.read_examples()
    assert len(items) >= 3
    for it in items:
        scene = parse_caption(it["caption"])
        for ins in it["instructions"]:
            parse_instruction(scene, ins)   # raises unless it names exactly one edit of the scene


# ----------------------------------------------------------------------------- tokenizer


def test_shapes_tokenizer_round_trips_in_hf_format(tmp_path):
    from transformers import CLIPTokenizer

    from ip2p_jax.tokenizer import load_tokenizer, tokenize
    from ip2p_jax.datagen.shapes_tokenizer import build_tokenizer, shapes_words

    build_tokenizer(str(tmp_path / "tokenizer"))
    ours, ref = load_tokenizer(str(tmp_path)), CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    for w in shapes_words():
        assert len(ref(w, add_special_tokens=False)["input_ids"]) == 1, w
    text = "Turn the small RED circle into a star, please!"
    ids = tokenize(ours, [text])[0]
    assert list(ids[:len(ref(text)["input_ids"])]) == ref(text)["input_ids"]
    assert ref.decode(ref(text)["input_ids"], skip_special_tokens=True) == "turn the small red circle into a star , please !"
    assert ids[0] == ref.bos_token_id and ids[-1] == ref.pad_token_id == ref.eos_token_id


def test_shipped_tokenizer_matches_the_builder(tmp_path):
    from ip2p_jax.datagen.shapes_tokenizer import build_tokenizer

    from ip2p_jax.tokenizer import load_tokenizer

    built = build_tokenizer(str(tmp_path / "tok"))
    assert load_tokenizer(demo.demo_model_path()).get_vocab() == built.get_vocab()


# ----------------------------------------------------------------------------- training path


@pytest.fixture(scope="module")
def shapes_tfds(tmp_path_factory):
    """A tiny TFDS shapes dataset built by the project's own scripts' library calls."""
    from ip2p_jax.data.builder import build_dataset
    from ip2p_jax.datagen.shapes import generate_prompts, write_pairs

    root = tmp_path_factory.mktemp("shapes")
    write_pairs(list(generate_prompts(40, seed=3)), root / "pairs", progress=False)
    build_dataset("authors", str(root / "pairs"), str(root / "tfds"), "shapes", progress=False)
    return str(root / "tfds")


@pytest.fixture(scope="module")
def encoded_run(tmp_path_factory, shapes_tfds):
    """Workdir after the demo pipeline's VAE stage (2 steps) and the encoding of the shapes TFDS."""
    work = str(tmp_path_factory.mktemp("demo_run") / "run")
    base = dm.train_vae(work, steps=2, batch_size=4, progress=False, crop=32, configs=TINY)
    shapes = dm.encode_pairs(work, shapes_tfds, "shapes", progress=False)
    return work, base, shapes


def _interrupted_at(step: int):
    """The loop's stop request (SIGTERM's path) raised once `step` is done."""
    from ip2p_jax.train import loop

    return mock.patch.object(loop.StopFlag, "should_stop", lambda self, s: s == step)


def _assert_same_state(a, b):
    import jax

    for field in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(a, field), getattr(b, field))
    assert int(a.step) == int(b.step) and int(a.updates) == int(b.updates)


def _tiny_autoencoder_config(steps: int, **changes):
    c = dm.preset("autoencoder.py:demo")
    c.model.vae = {**TINY["vae"], "block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
                   "up_block_types": ["UpDecoderBlock2D"] * 2}
    c.train.num_steps, c.train.batch_size = steps, 4
    c.data.crop, c.data.pool = 16, 8
    c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 1
    c.checkpoint.every_steps, c.checkpoint.async_save = 100, False
    c.log.every_steps = 1
    for k, v in changes.items():
        section, name = k.split("__")
        c[section][name] = v
    return c


@pytest.mark.slow  # ~2 min of compiles on 2 cores; `make test-slow`
def test_autoencoder_preset_learns_resumes_and_fine_tunes_the_decoder(tmp_path):
    """configs/autoencoder.py through the training loop: loss falls over a few steps; a run interrupted
    (stop request) and resumed ends in the same state as an uninterrupted one; decoder-only
    fine-tuning leaves the encoder alone."""
    import jax

    from ip2p_jax.train import autoencoder as ae
    from ip2p_jax.train.loop import train

    straight = train(_tiny_autoencoder_config(4), str(tmp_path / "a"), return_state=True)
    assert straight.step == 4 and os.path.isfile(straight.export_dir)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert {"l1", "psnr", "kl"} <= set(json.loads(open(tmp_path / "a" / "metrics.jsonl").readline()))

    with _interrupted_at(2):
        first = train(_tiny_autoencoder_config(4), str(tmp_path / "b"))
    assert first.preempted and first.step == 2 and first.export_dir is None
    resumed = train(_tiny_autoencoder_config(4), str(tmp_path / "b"), return_state=True)
    assert resumed.step == 4
    _assert_same_state(resumed.state, straight.state)

    # decoder-only fine-tuning from those params: the encoder side (so every latent) is unchanged
    with pytest.raises(ae.AutoencoderConfigError, match="init_params"):
        train(_tiny_autoencoder_config(2, model__decoder_only=True), str(tmp_path / "c"))
    params = straight.state.params
    tuned = train(_tiny_autoencoder_config(2, model__decoder_only=True, model__init_params=straight.export_dir),
                  str(tmp_path / "d"), return_state=True).state.params
    for side in ae.ENCODER_SIDE:
        jax.tree.map(np.testing.assert_array_equal, tuned[side], params[side])
    assert not np.allclose(tuned["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])


def test_scene_crops_resume_where_they_stopped():
    from ip2p_jax.train.scene_crops import SceneCrops

    a = SceneCrops(global_batch_size=4, crop=16, pool=8)
    for _ in range(3):
        next(a)
    b = SceneCrops(global_batch_size=4, crop=16, pool=8)
    b.set_state(a.get_state())
    np.testing.assert_array_equal(next(a)["image"], next(b)["image"])
    half = SceneCrops(global_batch_size=4, crop=16, pool=8, process_index=1, process_count=2)
    assert next(half)["image"].shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_vae_stage_and_encoding_of_shapes_pairs(encoded_run):
    work, base, shapes = encoded_run
    assert base["vae_metrics"]["steps"] == 2 and np.isfinite(base["vae_metrics"]["psnr_db"])
    assert base["vae"]["scaling_factor"] > 0 and base["text_encoder"]["vocab_size"] == 706
    n = shapes["input_ids"][0]
    assert n > 20 and shapes["input_moments"] == (n, 16, 16, 8) and shapes["input_ids"] == (n, 77)
    # resuming a finished VAE run trains nothing more and gives the same weights
    params = dm.load_vae_params(work)
    dm.train_vae(work, steps=2, batch_size=4, progress=False, crop=32, configs=TINY)
    again = dm.load_vae_params(work)
    assert np.array_equal(params["decoder"]["conv_out"]["kernel"], again["decoder"]["conv_out"]["kernel"])


@pytest.mark.slow
def test_decoder_stage_keeps_the_latents(encoded_run, tmp_path):
    """decoder: the VAE decoder is fine-tuned, the encoder (so the latent cache) stays valid, PSNRs recorded."""
    work = str(tmp_path / "run")
    shutil.copytree(encoded_run[0], work)
    before = dm.load_vae_params(work)
    assert dm.main(["decoder", "--workdir", work, "--steps", "2", "--batch-size", "4"]) == 0
    after = dm.load_vae_params(work)
    np.testing.assert_array_equal(after["encoder"]["conv_in"]["kernel"], before["encoder"]["conv_in"]["kernel"])
    assert not np.allclose(after["decoder"]["conv_out"]["kernel"], before["decoder"]["conv_out"]["kernel"])
    metrics = dm.read_base(work)["vae_metrics"]
    assert metrics["decoder_steps"] == 2 and np.isfinite([metrics["psnr_db"], metrics["psnr_db_before_decoder"]]).all()


@pytest.mark.slow
def test_editor_training_resumes_and_assembles_a_model(encoded_run, tmp_path):
    """Editor (UNet + text encoder) 2 steps, resumed to 5 as a cool-down from step 2 (the constant-rate
    checkpoint is kept), then a folder EditPipeline edits with."""
    from ip2p_jax.pipeline import EditPipeline

    work = str(tmp_path / "run")
    shutil.copytree(encoded_run[0], work)
    cfg = dm.EditorTrainConfig(steps=2, batch_size=4, checkpoint_every=1, log_every=1, warmup_steps=0)
    state = dm.train_editor(work, cfg, progress=False)
    assert int(state.step) == 2 and int(state.updates) == 2
    first = np.asarray(state.ema_params["unet"]["conv_in"]["kernel"]).copy()
    state = dm.train_editor(work, dataclasses.replace(cfg, steps=5, decay_start=2, decay_steps=3), progress=False)
    assert int(state.step) == 5
    assert not np.allclose(first, np.asarray(state.ema_params["unet"]["conv_in"]["kernel"]))
    steps = sorted(int(n) for n in os.listdir(os.path.join(work, dm.EDITOR_DIR, "checkpoints")) if n.isdigit())
    assert steps == [2, 4, 5]   # the last 2 and the constant-rate state at decay_start

    out = dm.assemble(work, str(tmp_path / "model"))
    pipe = EditPipeline.from_pretrained(out)
    img = np.zeros((64, 64, 3), np.uint8)
    res = pipe.edit(img, "make the circle red", steps=1, seed=0, resize="keep", progress=False)
    assert res.images[0].size == (64, 64)


@pytest.mark.slow
def test_editor_preset_resumes_to_the_uninterrupted_state(encoded_run, tmp_path):
    """configs/train.py:demo over the latent cache: stopped after step 1 (SIGTERM's path) and resumed to 3,
    the state equals a run of 3 steps without a stop."""
    cfg = dm.EditorTrainConfig(steps=3, batch_size=4, checkpoint_every=100, log_every=1, warmup_steps=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(encoded_run[0], a)
    shutil.copytree(encoded_run[0], b)
    straight = dm.train_editor(a, cfg, progress=False)
    with _interrupted_at(1):
        assert int(dm.train_editor(b, cfg, progress=False).step) == 1
    _assert_same_state(dm.train_editor(b, cfg, progress=False), straight)


@pytest.mark.slow
def test_editor_goes_on_from_an_assembled_model(encoded_run, shapes_tfds, tmp_path):
    """unpack + encode + editor --init-from: training continues from the assembled EMA weights."""
    import jax

    work = str(tmp_path / "run")
    shutil.copytree(encoded_run[0], work)
    dm.train_editor(work, dm.EditorTrainConfig(steps=1, batch_size=4, warmup_steps=0), progress=False)
    model = dm.assemble(work, str(tmp_path / "model"), dtype="fp32")
    ema, step = dm.read_editor_ema(work)
    again = str(tmp_path / "again")
    base = dm.unpack(model, again)
    assert base["warm_start"]["editor_steps"] == step
    dm.encode_pairs(again, shapes_tfds, "shapes", progress=False)
    cfg = dm.EditorTrainConfig(steps=1, batch_size=4, warmup_steps=0, learning_rate=0.0, weight_decay=0.0,
                               init_from=model)
    state = dm.train_editor(again, cfg, progress=False)
    # a zero rate leaves the params where the model's weights put them
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want), state.params,
                 {"unet": ema["unet"], "text_encoder": ema["text_encoder"]})
    with open(os.path.join(dm.assemble(again, str(tmp_path / "model2")), "training.json")) as f:
        assert json.load(f)["warm_start"]["editor_steps"] == step


def test_unpack_the_shipped_model(tmp_path, capsys):
    """unpack writes the shipped model's tokenizer, VAE and configs; a mismatched workdir is refused."""
    from ip2p_jax.models.unet import UNetConfig
    from ip2p_jax.weights import load_diffusers_folder

    model, work = demo.demo_model_path(), str(tmp_path / "run")
    base = dm.unpack(model, work)
    assert UNetConfig.from_dict(base["unet"]) == UNetConfig.from_dict(dm.UNET_CONFIG)
    assert base["text_encoder"]["vocab_size"] == 706
    comps = load_diffusers_folder(model)
    np.testing.assert_array_equal(dm.load_vae_params(work)["decoder"]["conv_out"]["kernel"],
                                  comps.vae_params["decoder"]["conv_out"]["kernel"])
    assert dm.make_tokenizer(work).get_vocab() == comps.tokenizer.get_vocab()
    assert dm.main(["unpack", "--model", model, "--workdir", work]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # a model whose networks differ from the workdir's configs
    with pytest.raises(ValueError, match="do not match"):
        dm.warm_start_params(model, {"unet": {}, "text_encoder": {}})


def _without_top_attention(model: str, out: str) -> str:
    """A copy of the demo model whose UNet has no cross-attention at the latent resolution."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(model, out)
    unet = os.path.join(out, "unet")
    weights = os.path.join(unet, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    last = len(dm.UNET_CONFIG["up_block_types"]) - 1
    save_file({k: v for k, v in tensors.items()
               if not k.startswith(("down_blocks.0.attentions.", f"up_blocks.{last}.attentions."))}, weights)
    with open(os.path.join(unet, "config.json")) as f:
        cfg = json.load(f)
    cfg["down_block_types"][0], cfg["up_block_types"][last] = "DownBlock2D", "UpBlock2D"
    with open(os.path.join(unet, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def test_warm_start_grows_cross_attention_as_identities(tmp_path, caplog):
    """unpack --recipe-unet + warm start: an older model without 16x16 cross-attention grows it; the
    new blocks start as identities, so the grown UNet computes what the model did."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax.weights import load_diffusers_folder

    old = _without_top_attention(demo.demo_model_path(), str(tmp_path / "old"))
    full_attention = {**dm.UNET_CONFIG, "down_block_types": ["CrossAttnDownBlock2D"] * 3,
                      "up_block_types": ["CrossAttnUpBlock2D"] * 3}
    # (the script's own stderr log set-up would stop records reaching caplog)
    with mock.patch.object(dm, "UNET_CONFIG", full_attention), mock.patch.object(dm, "show_progress_logs", lambda: None):
        assert dm.main(["unpack", "--model", old, "--workdir", str(tmp_path / "run"), "--recipe-unet"]) == 0
    base = dm.read_base(str(tmp_path / "run"))
    assert base["unet"] == full_attention
    _, _, unet, text = dm.editor_models(base)
    x, t, ctx = jnp.ones((2, 16, 16, 8)), jnp.array([10, 900]), jax.random.normal(jax.random.key(1), (2, 77, 64))
    fresh = {"unet": unet.init(jax.random.key(0), x[:1], t[:1], ctx[:1])["params"],
             "text_encoder": text.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]}
    with caplog.at_level("INFO"):
        grown = dm.warm_start_params(old, fresh)
    assert "3 cross-attention blocks added" in caplog.text   # 1 down, 2 up
    assert jax.tree.map(np.shape, grown) == jax.tree.map(np.shape, fresh)
    new_block = grown["unet"]["down_blocks_0"]["attentions_0"]
    assert not np.any(new_block["proj_out"]["kernel"]) and np.any(new_block["proj_in"]["kernel"])

    comps = load_diffusers_folder(old)
    _, _, old_unet, _ = dm.editor_models({**base, "unet": comps.unet_config.to_dict()})
    want = old_unet.apply({"params": comps.unet_params}, x, t, ctx)
    np.testing.assert_allclose(unet.apply({"params": grown["unet"]}, x, t, ctx), want, atol=1e-5)
    # everything but whole new cross-attention blocks must match
    del fresh["unet"]["down_blocks_1"]["attentions_0"]["proj_in"]
    with pytest.raises(ValueError, match="do not match.*down_blocks_1/attentions_0/proj_in"):
        dm.warm_start_params(old, fresh)


def test_stage_errors_are_messages_not_tracebacks(tmp_path, capsys):
    # a cool-down that starts inside the warm-up is refused before anything is loaded
    assert dm.main(["editor", "--workdir", str(tmp_path), "--decay-start", "50", "--decay-steps", "10"]) == 2
    assert "decay_start >= warmup_steps" in capsys.readouterr().err
    assert dm.main(["assemble", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    assert "run the vae stage first" in capsys.readouterr().err
