"""Bad LoRA input ends in one clear Ip2pError naming the file / module / setting: base shapes that do not
match, a rank that does not fit, an unknown target module, a file that is not a LoRA (fast: no compiles
beyond the tiny model's text encoder)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import edit_fixtures as fx
from ip2p_jax import adapters
from ip2p_jax.errors import Ip2pError
from ip2p_jax.weights import lora as lora_files
from train_helpers import CONFIG, tokenizer_dir

Q = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_dir(str(tmp_path_factory.mktemp("tok")))


def _config(tok, **lora):
    from ip2p_jax.train.configs import load_config

    c = load_config(CONFIG + ":lora_tiny")
    c.model.tokenizer = tok
    for k, v in lora.items():
        c.lora[k] = v
    return c


@pytest.mark.parametrize("settings, words", [
    (dict(rank=17), ["rank 17", "1..16", "to_q"]),                    # the tiny UNet's projections are 16 x 16
    (dict(rank=-2), ["lora.rank=-2", "positive"]),
    (dict(targets=("to_qq",)), ["'to_qq'", "matches no Dense layer", "to_q"]),
    (dict(text_targets=("fc9",)), ["'fc9'", "text encoder"]),
    (dict(targets=("conv1",)), ["'conv1'", "matches no Dense layer"]),   # convs only with lora.convs
    (dict(dropout=1.0), ["lora.dropout"]),
])
def test_bad_lora_settings(tok, settings, words):
    from ip2p_jax.train.lora import lora_task

    with pytest.raises(Ip2pError) as e:
        lora_task(_config(tok, **settings))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_lora_with_full_text_encoder_training_refused(tok):
    from ip2p_jax.train.lora import lora_task

    c = _config(tok)
    c.model.train_text_encoder = True
    with pytest.raises(Ip2pError, match="lora.text_encoder"):
        lora_task(c)


def test_convs_allowed_when_asked(tok):
    from ip2p_jax.train.lora import lora_task

    task = lora_task(_config(tok, targets=("conv1",), convs=True, text_encoder=False))
    shapes = [a for a, _ in adapters.adapter_modules(task.init_params()["unet"]).values()]
    assert shapes and all(len(a) == 4 and a[:2] == (3, 3) for a in shapes)


def _write(path, state, metadata=None):
    save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from ip2p_jax.pipeline import EditPipeline

    return EditPipeline.from_pretrained(fx.tiny_model_dir(tmp_path_factory), dtype="fp32")


def test_shapes_that_do_not_match_name_the_module(pipe, tmp_path):
    # the tiny model's mid-block to_q is (64 -> 64); this LoRA was made for a 32-wide one
    path = _write(str(tmp_path / "other.safetensors"), {Q + ".lora_A.weight": np.ones((4, 32)),
                                                        Q + ".lora_B.weight": np.ones((32, 4))})
    with pytest.raises(Ip2pError) as e:
        pipe.load_lora(path)
    msg = str(e.value)
    assert "other.safetensors" in msg and "mid_block.attentions_0.transformer_blocks_0.attn1.to_q" in msg
    assert "(64, 64)" in msg and not pipe.loras
    missing = _write(str(tmp_path / "missing.safetensors"),
                     {"unet.down_blocks.7.attn9.to_q.lora_A.weight": np.ones((4, 64)),
                      "unet.down_blocks.7.attn9.to_q.lora_B.weight": np.ones((64, 4))})
    with pytest.raises(Ip2pError, match="down_blocks_7.attn9.to_q: the UNet has no such layer"):
        pipe.load_lora(missing)


def test_not_a_lora_file(tmp_path_factory, tmp_path):
    model = fx.tiny_model_dir(tmp_path_factory)
    with pytest.raises(Ip2pError, match="not a LoRA file"):
        lora_files.read_lora(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(Ip2pError, match="no such LoRA file"):
        lora_files.read_lora(str(tmp_path / "nothing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(Ip2pError, match="junk.safetensors"):
        lora_files.read_lora(str(junk))
    half = _write(str(tmp_path / "half.safetensors"), {Q + ".lora_A.weight": np.ones((4, 64))})
    with pytest.raises(Ip2pError, match="has only lora_A"):
        lora_files.read_lora(half)
    other = _write(str(tmp_path / "sdxl.safetensors"), {"text_encoder_2.x.lora_A.weight": np.ones((4, 8)),
                                                        "text_encoder_2.x.lora_B.weight": np.ones((8, 4))})
    with pytest.raises(Ip2pError, match="text_encoder_2"):
        lora_files.read_lora(other)
    dora = _write(str(tmp_path / "dora.safetensors"), {Q + ".lora_A.weight": np.ones((4, 64)),
                                                       Q + ".lora_B.weight": np.ones((64, 4))},
                  {"lora_adapter_metadata": '{"unet.use_dora": true, "unet.r": 4}'})
    with pytest.raises(Ip2pError, match="DoRA"):
        lora_files.read_lora(dora)


def test_metadata_patterns_and_rslora(tmp_path):
    k = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k"
    state = {Q + ".lora_A.weight": np.ones((4, 64)), Q + ".lora_B.weight": np.ones((64, 4)),
             k + ".lora_A.weight": np.ones((4, 64)), k + ".lora_B.weight": np.ones((64, 4))}
    meta = '{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_k": 2}}'
    f = lora_files.read_lora(_write(str(tmp_path / "p.safetensors"), state, {"lora_adapter_metadata": meta}))
    assert f.factors["unet"] == {"mid_block.attentions_0.transformer_blocks_0.attn1.to_q": 2.0,
                                 "mid_block.attentions_0.transformer_blocks_0.attn1.to_k": 0.5}
    meta = '{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": true}'
    f = lora_files.read_lora(_write(str(tmp_path / "rs.safetensors"), state, {"lora_adapter_metadata": meta}))
    assert set(f.factors["unet"].values()) == {4.0}            # alpha / sqrt(r)
    f = lora_files.read_lora(_write(str(tmp_path / "none.safetensors"), state))
    assert set(f.factors["unet"].values()) == {1.0}            # no metadata, no alphas: alpha = rank


def test_bad_scale_and_lora_args(pipe, tmp_path):
    assert lora_files.parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert lora_files.parse_lora_arg("C:/x.safetensors") == ("C:/x.safetensors", 1.0)
    assert lora_files.parse_lora_arg("x.safetensors") == ("x.safetensors", 1.0)
    with pytest.raises(Ip2pError, match="finite"):
        pipe.load_lora("whatever", scale=float("nan"))
    with pytest.raises(Ip2pError, match="no LoRA named"):
        pipe.unload_lora("nope")


def test_cli_reports_a_missing_lora(tmp_path, capsys):
    from ip2p_jax import cli

    img = tmp_path / "in.png"
    fx.sample_images(1)[0].save(img)
    code = cli.main(["edit", "--image", str(img), "--instruction", "x", "--out", str(tmp_path / "out"),
                     "--lora", str(tmp_path / "missing.safetensors:0.8")])
    assert code == 2
    assert "missing.safetensors: no such LoRA file" in capsys.readouterr().err
