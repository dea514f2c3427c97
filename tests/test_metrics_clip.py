"""ip2p_jax.metrics.clip_scores against transformers' CLIPImageProcessor + CLIPModel on a tiny
random CLIPModel folder; scripts/evaluate_clip.py end to end (slow)."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import tiny
from ip2p_jax.metrics import clip_scores as cs

SIDE = 32
SIZES = [(40, 57), (33, 45), (50, 31), (20, 25), (32, 32), (97, 64)]   # non-square, odd, smaller than 32
CAPTIONS_0 = ["a photo of a dog", "a red circle", "the sky", "a blue square", "a cat", "green background"]
CAPTIONS_1 = ["a photo of a cat", "a blue circle", "the winter sky", "a red square", "a dog in winter",
              "red background"]


def save_tiny_clip(directory: str, seed: int = 0) -> str:
    """A tiny random transformers CLIPModel folder: weights, config, tokenizer, preprocessor config."""
    import torch
    import transformers
    from transformers import CLIPImageProcessorPil

    tok = tiny.tokenizer(os.path.join(directory, "_tok"))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=SIDE,
                  patch_size=8)
    torch.manual_seed(seed)
    model = tiny.perturb(transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), seed=seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(
        directory)
    shutil.rmtree(os.path.join(directory, "_tok"))
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return cs.ClipScorer.from_pretrained(clip_dir, batch_size=4)


def _images(seed):
    return [tiny.random_image(h, w, seed=seed + i) for i, (h, w) in enumerate(SIZES)]


def _reference(clip_dir, images_0, images_1, captions_0, captions_1):
    """The metrics in PyTorch with transformers' own processor, tokenizer and CLIPModel."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
    tok = AutoTokenizer.from_pretrained(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        def image(ims):
            px = proc(images=ims, return_tensors="pt").pixel_values
            return F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1), px

        def text(caps):
            ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)

        (i0, px0), (i1, _), t0, t1 = image(images_0), image(images_1), text(captions_0), text(captions_1)
        scores = {"sim_0": F.cosine_similarity(i0, t0), "sim_1": F.cosine_similarity(i1, t1),
                  "sim_direction": F.cosine_similarity(i1 - i0, t1 - t0), "sim_image": F.cosine_similarity(i0, i1)}
    return {k: v.numpy() for k, v in scores.items()}, px0.numpy().transpose(0, 2, 3, 1)


def test_scores_match_transformers(clip_dir, scorer):
    arrays_0 = _images(0)
    images_0 = [Image.fromarray(a) for a in arrays_0[:3]] + arrays_0[3:]     # PIL and uint8 arrays
    rgba = np.concatenate([_images(10)[1], np.full(SIZES[1] + (1,), 128, np.uint8)], -1)
    images_1 = _images(20)
    images_1[1] = Image.fromarray(rgba, "RGBA")                             # alpha: composited on white
    images_1[2] = Image.fromarray(images_1[2]).convert("L")                 # grayscale
    ref, ref_pixels = _reference(clip_dir, images_0, images_1, CAPTIONS_0, CAPTIONS_1)

    pixels = scorer.preprocess(images_0)
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-6)              # same pixels (exact in practice)
    got = scorer.scores(images_0, images_1, CAPTIONS_0, CAPTIONS_1)
    assert list(got) == list(cs.METRICS)
    for m in cs.METRICS:
        assert got[m].shape == (len(SIZES),) and got[m].dtype == np.float32
        np.testing.assert_allclose(got[m], ref[m], atol=1e-5, err_msg=m)
    assert np.ptp(got["sim_direction"]) > 1e-3                             # not a constant
    # 6 examples in batches of 4: one compiled shape per tower.
    assert scorer._image_jit._cache_size() == 1 and scorer._text_jit._cache_size() == 1

    means = cs.mean_scores(got)
    assert means["num"] == len(SIZES)
    for m in cs.METRICS:
        assert means[m] == pytest.approx(float(np.mean(ref[m])), abs=1e-5)
    same = scorer.scores(images_0[:2], images_0[:2], CAPTIONS_0[:2], CAPTIONS_0[:2])
    np.testing.assert_allclose(same["sim_image"], 1.0, atol=1e-5)
    np.testing.assert_array_equal(same["sim_direction"], 0.0)              # no change: 0, as torch's cosine


def test_processor_config_forms():
    new = cs.ClipImageProcessor.from_dict({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}})
    old = cs.ClipImageProcessor.from_dict({"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3,
                                           "feature_extractor_type": "CLIPFeatureExtractor"})
    assert new == old == cs.ClipImageProcessor()
    assert cs.ClipImageProcessor().resize_size(480, 640) == (224, 298)       # long side floored
    assert cs.ClipImageProcessor().resize_size(641, 480) == (299, 224)
    with pytest.raises(cs.ClipModelError, match="pp.json.*longest_edge"):
        cs.ClipImageProcessor.from_dict({"size": {"shortest_edge": 224, "longest_edge": 300}}, source="pp.json")


def test_folder_errors(clip_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(cs.ClipModelError, match=f"{missing}: no such CLIP model folder"):
        cs.ClipScorer.from_pretrained(str(missing))

    def broken(name, drop=(), edit=None):
        d = tmp_path / name
        shutil.copytree(clip_dir, d)
        for f in drop:
            os.remove(d / f)
        if edit:
            path, patch = edit
            with open(d / path) as f:
                cfg = json.load(f)
            cfg.update(patch)
            with open(d / path, "w") as f:
                json.dump(cfg, f)
        return str(d)

    with pytest.raises(cs.ClipModelError, match="no config.json"):
        cs.load_clip_folder(broken("a", ["config.json"]))
    with pytest.raises(cs.ClipModelError, match="no weight file model.safetensors"):
        cs.load_clip_folder(broken("b", ["model.safetensors"]))
    with pytest.raises(cs.ClipModelError, match="no tokenizer found"):
        cs.load_clip_folder(broken("c", ["tokenizer.json"]))
    with pytest.raises(cs.ClipModelError, match="crops to 48x48.*takes 32x32"):
        cs.load_clip_folder(broken("d", edit=("preprocessor_config.json", {"crop_size": 48})))
    with pytest.raises(cs.ClipModelError, match="model_type='clip_text_model'"):
        cs.load_clip_folder(broken("e", edit=("config.json", {"model_type": "clip_text_model"})))
    with pytest.raises(cs.ClipModelError, match=r"f/model.safetensors do not fit the model"):
        cs.load_clip_folder(broken("f", edit=("config.json", {"vision_config": {"image_size": 32, "patch_size": 8}})))
    # without preprocessor_config.json: CLIP's defaults at the model's image size
    _, _, _, proc = cs.load_clip_folder(broken("g", ["preprocessor_config.json"]))
    assert proc == cs.ClipImageProcessor.default(SIDE)


def test_input_errors(scorer):
    ims = _images(0)[:2]
    with pytest.raises(ValueError, match="2 input images, 2 edited images, 1 input captions"):
        scorer.scores(ims, ims, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="edited image 1: expected a uint8 array, got dtype float32"):
        scorer.scores(ims, [ims[0], ims[1].astype(np.float32)], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="input image 0: expected a PIL image"):
        scorer.scores(["x.png", ims[1]], ims, ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="captions must be strings"):
        scorer.scores(ims, ims, ["a", None], ["c", "d"])
    with pytest.raises(ValueError, match="no examples"):
        cs.mean_scores({m: np.zeros(0) for m in cs.METRICS})


# ---------------------------------------------------------------------------- scripts/evaluate_clip.py

def _script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "evaluate_clip.py")
    spec = importlib.util.spec_from_file_location("evaluate_clip", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_examples(folder, n=2):
    lines = []
    for i in range(n):
        Image.fromarray(tiny.random_image(48 + 16 * i, 64, seed=i)).save(os.path.join(folder, f"{i}.png"))
        lines.append({"image": f"{i}.png", "edit": "make it winter", "input": CAPTIONS_0[i], "output": CAPTIONS_1[i]})
    path = os.path.join(folder, "examples.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    return path, lines


def test_script_errors(clip_dir, tmp_path, capsys):
    script = _script()
    path, lines = _write_examples(str(tmp_path), n=1)
    common = ["--model", str(tmp_path / "no_model"), "--clip", clip_dir, "--out", str(tmp_path / "r.jsonl")]
    with open(path, "a") as f:
        f.write(json.dumps({**lines[0], "output": ""}) + "\n")
    assert script.main(common + ["--jsonl", path]) == 2
    assert f"{path}:2: needs non-empty string fields" in capsys.readouterr().err
    with open(path, "w") as f:
        f.write(json.dumps({**lines[0], "image": "missing.png"}) + "\n")
    assert script.main(common + ["--jsonl", path]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    _write_examples(str(tmp_path), n=1)
    assert script.main(common + ["--jsonl", path, "--clip", str(tmp_path / "no_clip")]) == 2
    assert "no_clip: no such CLIP model folder" in capsys.readouterr().err
    assert script.main(common + ["--jsonl", path]) == 2
    assert "no_model: no such file or folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.jsonl")
    with pytest.raises(SystemExit) as e:
        script.main(common + ["--jsonl", path, "--image-scales", "1.5,x"])
    assert e.value.code == 2


@pytest.mark.slow
def test_script_sweep(clip_dir, tmp_path, capsys):
    """2 examples, 1 scale pair, 2 steps on the tiny InstructPix2Pix folder: rows written and printed."""
    script = _script()
    model = tiny.save_pipeline(str(tmp_path / "model"))
    path, lines = _write_examples(str(tmp_path))
    out = tmp_path / "res" / "results.jsonl"
    argv = ["--model", model, "--clip", clip_dir, "--jsonl", path, "--text-scales", "7.5", "--image-scales", "1.5",
            "--steps", "2", "--resolution", "64", "--out", str(out), "--per-example", "--no-progress"]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    final = json.loads(printed[-1])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and len(final["rows"]) == 1 and final["settings"]["num"] == 2
    row = rows[0]
    assert (row["text_scale"], row["image_scale"], row["steps"], row["num"]) == (7.5, 1.5, 2, 2)
    for m in cs.METRICS:
        assert -1 <= row[m] <= 1 and row[m] == pytest.approx(final["rows"][0][m])
        assert row[m] == pytest.approx(np.mean(row["per_example"][m]), abs=1e-6)
    # sim_0 depends on the inputs only: the scorer on the same files gives the same numbers.
    scorer = cs.ClipScorer.from_pretrained(clip_dir)
    inputs = [Image.open(tmp_path / x["image"]) for x in lines]
    direct = scorer.scores(inputs, inputs, [x["input"] for x in lines], [x["output"] for x in lines])
    np.testing.assert_allclose(row["per_example"]["sim_0"], direct["sim_0"], atol=1e-6)
    assert any(line.lstrip().startswith("7.50") for line in printed[:-1])   # the table row
    assert script.main(argv) == 0                                            # a second run appends
    assert len(out.read_text().splitlines()) == 2
