"""The pair stage (ip2p_jax.datagen.image_pairs) against PyTorch references on tiny random models:
diffusers' UNet with an attention processor doing what the authors' CrossAttention does with
`prompt_to_prompt`, diffusers' Euler-A scheduler in the authors' sampling loop, transformers'
CLIPModel for the filter; then the written layout, resuming, and errors."""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from ip2p_jax.datagen import layout
from ip2p_jax.datagen.image_pairs import (ClipFilter, LayoutError, PairSampler, PairSettings, candidate_seeds,
                                          draw_sample, generate_pairs, injected_steps, pair_scores,
                                          partition_indices, read_prompts, select, self_attn_source, to_uint8)
from ip2p_jax.models.unet import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
STEPS, RES, PAIRS = 4, 16, 4      # every sampling call below has this shape: one compile
CAPTIONS = [("a red circle", "a blue circle"), ("a photo of a dog", "a photo of a cat")]
PROMPTS = [{"input": a, "edit": f"turn it into {b}", "output": b, "url": f"u{i}"} for i, (a, b) in
           enumerate(CAPTIONS + [("the sky", "the winter sky")])]
SMALL = dict(steps=STEPS, resolution=RES)
ATTN1_QK_GAIN, ATTN1_OUT_GAIN = 3.0, 4.0
TOL = 1e-4                        # fp32 parity of whole sampling runs (measured ~2e-5)


# ------------------------------------------------------------------ references and fixtures

class Model:
    """A tiny text-to-image Stable Diffusion: the torch modules and the saved diffusers folder."""

    def __init__(self, folder: str):
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

        self.tokenizer = tiny.tokenizer(tempfile.mkdtemp(prefix="tok_"))
        self.unet, self.vae = tiny.unet(4, seed=1), tiny.vae(seed=1)
        with torch.no_grad():   # sharper, stronger self-attention: the injection must show in the images
            for name, p in self.unet.named_parameters():
                if ".attn1.to_q." in name or ".attn1.to_k." in name:
                    p.mul_(ATTN1_QK_GAIN)
                elif ".attn1.to_out." in name:
                    p.mul_(ATTN1_OUT_GAIN)
        self.text_encoder = tiny.text_encoder(len(self.tokenizer), seed=1)
        StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                unet=self.unet, scheduler=EulerAncestralDiscreteScheduler(**SCHEDULE),
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(folder)
        self.folder = folder

    def text(self, texts):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids).last_hidden_state


SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                timestep_spacing="linspace", steps_offset=1)   # no offset is used with linspace


class AuthorsSelfAttention:
    """diffusers processor for attn1 layers doing what the authors' CrossAttention does when
    `prompt_to_prompt` is set: in each pair's 4 rows [uncond img0, uncond img1, cond img0, cond img1]
    the attention logits become (sims[0], sims[0], sims[2], sims[2]) before the softmax.
    `inject` holds one flag per pair; `log` records them per call."""

    def __init__(self):
        self.inject, self.log = [], []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        b, n, _ = hidden_states.shape
        q, k, v = (attn.head_to_batch_dim(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        sims = list((torch.bmm(q, k.transpose(1, 2)) * attn.scale).view(b, attn.heads, n, n))
        for p, on in enumerate(self.inject):
            if on:
                sims[4 * p + 1], sims[4 * p + 3] = sims[4 * p], sims[4 * p + 2]
        self.log.append(list(self.inject))
        probs = torch.stack(sims).flatten(0, 1).softmax(dim=-1)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def with_processor(unet, proc):
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor({name: proc if name.endswith("attn1.processor") else AttnProcessor()
                             for name in unet.attn_processors})


def reference_images(model, captions, noise, seed, cfg, p2p, monkeypatch):
    """The authors' sampling loop with diffusers' Euler-A: len(captions) images (2 = a pair, 1 = an
    independent generation), batch [uncond x k, cond x k], the same start noise for all, one shared
    ancestral noise per step (JAX's for `seed`), CFG on eps, p2p at step i iff p2p > i / (steps - 1).
    Returns NHWC images in [0, 1] and the injection flag of every step."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module

    k, shape = len(captions), noise.shape
    steps_noise = iter(np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(np.uint32(seed)), i), shape))
                       for i in range(STEPS))
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa: E731
    monkeypatch.setattr(euler_a_module, "randn_tensor",
                        lambda shp, **kw: to_nchw(next(steps_noise)).expand(shp).clone())
    sched = EulerAncestralDiscreteScheduler(**SCHEDULE)
    sched.set_timesteps(STEPS)
    proc = AuthorsSelfAttention()
    with_processor(model.unet, proc)
    text = model.text([""] * k + list(captions))
    x = to_nchw(noise).repeat(k, 1, 1, 1) * sched.init_noise_sigma
    flags = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            flags.append(k == 2 and p2p > i / (STEPS - 1))
            proc.inject = [flags[-1]] if k == 2 else []
            eps = model.unet(sched.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=text).sample
            uncond, cond = eps.chunk(2)
            x = sched.step(uncond + cfg * (cond - uncond), t, x).prev_sample
        images = (model.vae.decode(x / model.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert next(steps_noise, None) is None
    return images.numpy().transpose(0, 2, 3, 1), flags


def rel_err(a, ref):
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny torch references run ~100x slower with several threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Model(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def sampler(model):
    return PairSampler.from_pretrained(model.folder, dtype="fp32")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from test_metrics_clip import save_tiny_clip

    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    from ip2p_jax.metrics.clip_scores import ClipScorer

    return ClipScorer.from_pretrained(clip_dir)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ 1. prompt-to-prompt in the UNet

def test_injection_is_the_authors_self_attention_copy(model, sampler):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 4)).astype(np.float32)
    t = rng.uniform(0, 999, 8).astype(np.float32)
    ctx = rng.standard_normal((8, 7, 32)).astype(np.float32)
    inject = [True, False]   # pair 0 copies, pair 1 does not
    np.testing.assert_array_equal(self_attn_source(jnp.array(inject)), [0, 0, 2, 2, 4, 5, 6, 7])

    unet = UNet2DConditionModel(sampler.unet_config, attention_impl="xla")
    apply = jax.jit(unet.apply)
    params = {"params": sampler.params["unet"]}   # converted from the saved folder by ip2p_jax.weights
    ours = np.asarray(apply(params, x, t, ctx, self_attn_source(jnp.array(inject))))
    plain = np.asarray(apply(params, x, t, ctx))
    proc = AuthorsSelfAttention()
    with_processor(model.unet, proc)
    proc.inject = inject
    with torch.no_grad():
        ref = model.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                         torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    assert proc.log and all(flags == inject for flags in proc.log)   # every attn1 layer
    assert rel_err(ours, ref) <= 1e-4
    np.testing.assert_allclose(ours[[0, 2, 4, 5, 6, 7]], plain[[0, 2, 4, 5, 6, 7]], rtol=0, atol=1e-5)
    assert rel_err(ours[[1, 3]], plain[[1, 3]]) > 1e-2    # the copy changes img1's rows


def test_injected_steps_is_the_authors_comparison():
    authors = lambda p, n: sum(p > i / (n - 1) for i in range(n))  # noqa: E731
    for p in (0.0, 0.1, 1 / 3, 0.34, 0.5, 0.9, 1.0):
        for n in (2, 4, 25, 100):
            assert injected_steps(p, n) == authors(p, n)
    assert (injected_steps(1 / 3, 4), injected_steps(0.34, 4), injected_steps(1.0, 4)) == (1, 2, 3)
    assert (injected_steps(0.0, 1), injected_steps(0.5, 1)) == (0, 1)


# ------------------------------------------------------------------ 2. the whole sampling of pairs

def test_pair_sampling_matches_the_authors_loop(model, sampler, monkeypatch):
    plan = sampler.plan(STEPS, "euler_a", "diffusers")   # diffusers' sigmas, for its scheduler
    shape = sampler.latent_shape(RES)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((PAIRS,) + shape).astype(np.float32)
    noise[2] = noise[1]
    seeds = np.array([11, 2 ** 32 - 5, 2 ** 32 - 5, 7], np.uint32)
    cfg = np.array([7.5, 12.0, 12.0, 9.0], np.float32)
    p2p = [0.5, 0.0, 1.0, 1 / 3]
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[1], CAPTIONS[0]]
    cond = np.stack([sampler.encode_text(c) for c in captions])
    null = sampler.encode_text([""])[0]
    inject = np.array([injected_steps(p, STEPS) for p in p2p])
    ours = np.asarray(sampler.generate(plan, noise, seeds, cond, null, cfg, inject))
    assert ours.shape == (PAIRS, 2, RES, RES, 3)

    flags = []
    for j in range(PAIRS):
        ref, f = reference_images(model, captions[j], noise[j], int(seeds[j]), float(cfg[j]), p2p[j], monkeypatch)
        assert rel_err(ours[j], ref) <= TOL, j
        flags.append(f)
    assert [sum(f) for f in flags] == list(inject)
    assert flags[2] == [True, True, True, False]    # p = 1: every step but the last (i / (n-1) = 1)
    assert flags[3] == [True, False, False, False]  # p = 1/3 is not above step 1's 1/3

    # p = 0: two independent generations with the same noise
    for k in (0, 1):
        alone, _ = reference_images(model, captions[1][k:k + 1], noise[1], int(seeds[1]), 12.0, 0.0, monkeypatch)
        assert rel_err(ours[1, k], alone[0]) <= TOL
    # img0 never depends on p; img1 does, and the tests above see the count of injected steps
    # (except at the last step, which moves x by only sigma_last * eps: p = 1 is checked by its flags)
    np.testing.assert_allclose(ours[2, 0], ours[1, 0], rtol=0, atol=1e-6)
    assert rel_err(ours[2, 1], ours[1, 1]) > 100 * TOL
    every_step = np.asarray(sampler.generate(plan, noise, seeds, cond, null, cfg, np.full(PAIRS, STEPS)))
    for j in (0, 1, 3):
        assert rel_err(every_step[j, 1], ours[j, 1]) > 10 * TOL, j


# ------------------------------------------------------------------ 3. the CLIP filter

def test_select_is_the_authors_filter():
    f = ClipFilter(image_caption=0.2, direction=0.2, image_image=0.7)
    ok = dict(clip_sim_0=0.2, clip_sim_1=0.25, clip_sim_dir=0.2, clip_sim_image=0.7)   # thresholds pass (>=)
    results = {
        5: ok,
        9: dict(ok, clip_sim_dir=0.5),
        3: dict(ok, clip_sim_dir=0.5),                 # tie with seed 9: larger seed first
        4: dict(ok, clip_sim_dir=0.9, clip_sim_0=0.19),
        6: dict(ok, clip_sim_dir=0.9, clip_sim_1=0.19),
        7: dict(ok, clip_sim_dir=0.19),
        8: dict(ok, clip_sim_dir=0.9, clip_sim_image=0.69),
        2: dict(ok, clip_sim_dir=0.3),
    }
    assert select(results, f, keep=4) == [9, 3, 2, 5]
    assert select(results, f, keep=2) == [9, 3]
    assert select({s: results[s] for s in (4, 6, 7, 8)}, f, keep=4) == []
    assert select(results, None, keep=3) == [5, 9, 3]     # no filter: the first `keep`


def clip_reference(clip_dir, images_0, images_1, captions_0, captions_1):
    """The metrics with transformers' CLIPImageProcessor (PIL backend), tokenizer and CLIPModel."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    proc, tok = CLIPImageProcessorPil.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        def image(ims):
            px = proc(images=[Image.fromarray(a) for a in ims], return_tensors="pt").pixel_values
            return F.normalize(clip.get_image_features(pixel_values=px).pooler_output, dim=-1)

        def text(caps):
            ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)

        i0, i1, t0, t1 = image(images_0), image(images_1), text(captions_0), text(captions_1)
        sims = {"clip_sim_0": F.cosine_similarity(i0, t0), "clip_sim_1": F.cosine_similarity(i1, t1),
                "clip_sim_dir": F.cosine_similarity(i1 - i0, t1 - t0),
                "clip_sim_image": F.cosine_similarity(i0, i1)}
    return [{k: float(v[j]) for k, v in sims.items()} for j in range(len(images_0))]


def regenerate(sampler, prompt, index, settings, n):
    """What generate_pairs samples for a prompt's first n candidates: {seed: (uint8 img0, img1)}."""
    seeds = candidate_seeds(settings.seed, index, n)
    draws = [draw_sample(s, sampler.latent_shape(RES), settings) for s in seeds]
    cond = np.repeat(sampler.encode_text([prompt["input"], prompt["output"]])[None], n, axis=0)
    out = sampler.generate(sampler.plan(STEPS), np.stack([d[2] for d in draws]), seeds, cond,
                           sampler.encode_text([""])[0], [d[1] for d in draws],
                           [injected_steps(d[0], STEPS) for d in draws])
    return dict(zip(seeds, to_uint8(np.asarray(out))))


def luma_gap(image: Image.Image, array: np.ndarray) -> float:
    """Mean absolute difference of the luma of two RGB images."""
    luma = lambda im: np.asarray(im.convert("L"), float)  # noqa: E731
    return float(np.abs(luma(image) - luma(Image.fromarray(array))).mean())


def read_dir(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]


def test_clip_filter_keeps_the_best_passing_pairs(sampler, scorer, clip_dir, tmp_path):
    prompt = PROMPTS[1]
    everything = PairSettings(samples_per_prompt=PAIRS, keep=PAIRS, clip_filter=ClipFilter(-1, -1, -1), **SMALL)
    generate_pairs(sampler, [prompt], tmp_path / "all", everything, scorer=scorer, batch_size=PAIRS, progress=False)
    meta = {m["seed"]: m for m in read_dir(tmp_path / "all" / "0000000")}
    assert sorted(meta) == sorted(candidate_seeds(0, 0, PAIRS))
    # the recorded CLIP numbers are transformers' on the sampled 8-bit images, with the right captions
    images = regenerate(sampler, prompt, 0, everything, PAIRS)
    seeds = list(images)
    ref = clip_reference(clip_dir, [images[s][0] for s in seeds], [images[s][1] for s in seeds],
                         [prompt["input"]] * PAIRS, [prompt["output"]] * PAIRS)
    for s, r in zip(seeds, ref):
        for key, value in r.items():
            assert abs(meta[s][key] - value) < 1e-4, key
        assert 0.1 <= meta[s]["p2p_threshold"] < 0.9 and 7.5 <= meta[s]["cfg_scale"] < 15
    assert list(meta) == sorted(meta, key=lambda s: (meta[s]["clip_sim_dir"], s), reverse=True)

    # a real filter: one candidate fails the image-image threshold; keep the best 2 of the rest
    sim_image = sorted(m["clip_sim_image"] for m in meta.values())
    strict = ClipFilter(image_caption=-1.0, direction=-1.0, image_image=sim_image[1])
    passing = sorted((m["clip_sim_dir"], s) for s, m in meta.items() if m["clip_sim_image"] >= sim_image[1])
    settings = PairSettings(samples_per_prompt=PAIRS, keep=2, clip_filter=strict, **SMALL)
    generate_pairs(sampler, [prompt], tmp_path / "kept", settings, scorer=scorer, batch_size=PAIRS, progress=False)
    kept = read_dir(tmp_path / "kept" / "0000000")
    assert [m["seed"] for m in kept] == [s for _, s in passing[::-1][:2]] and len(passing) == 3
    assert kept == [meta[m["seed"]] for m in kept]


def test_pair_scores_match_transformers(scorer, clip_dir):
    a = [tiny.random_image(16, 16, seed=i) for i in range(PAIRS)]
    b = [tiny.random_image(16, 16, seed=10 + i) for i in range(PAIRS)]
    ours = pair_scores(scorer, a, b, scorer.text_features(list(CAPTIONS[0])))
    ref = clip_reference(clip_dir, a, b, [CAPTIONS[0][0]] * PAIRS, [CAPTIONS[0][1]] * PAIRS)
    for o, r in zip(ours, ref):
        assert o.keys() == r.keys() and max(abs(o[k] - r[k]) for k in r) < 1e-4


# ------------------------------------------------------------------ 4. the written layout

def test_layout_is_the_authors_and_readable(sampler, tmp_path):
    from ip2p_jax.data import builder
    from ip2p_jax.data.sources import AuthorsSource

    out = tmp_path / "pairs"
    settings = PairSettings(samples_per_prompt=7, keep=2, seed=5, **SMALL)   # no CLIP: 2 sampled per prompt
    stats = generate_pairs(sampler, PROMPTS[:2], out, settings, batch_size=PAIRS, progress=False)
    assert (stats.written, stats.skipped, stats.sampled, stats.kept, stats.total_pairs) == (2, 0, 4, 4, 4)
    seeds = json.loads((out / "seeds.json").read_text())
    assert seeds == [[f"{i:07d}", sorted(candidate_seeds(5, i, 2))] for i in range(2)]
    assert sorted(os.listdir(out)) == ["0000000", "0000001", "generation.json", "seeds.json"]
    for i, (name, ss) in enumerate(seeds):
        d = out / name
        assert sorted(os.listdir(d)) == sorted([f"{s}_{k}.jpg" for s in ss for k in (0, 1)]
                                               + ["metadata.jsonl", "prompt.json"])
        assert json.loads((d / "prompt.json").read_text()) == PROMPTS[i]
        meta = read_dir(d)
        assert [m["seed"] for m in meta] == candidate_seeds(5, i, 2)
        assert all(list(m) == ["seed", "p2p_threshold", "cfg_scale"] for m in meta)
        images = regenerate(sampler, PROMPTS[i], i, settings, 2)
        for s in ss:
            for k in (0, 1):
                saved = Image.open(d / f"{s}_{k}.jpg")
                assert saved.size == (RES, RES) and saved.mode == "RGB"
                assert luma_gap(saved, images[s][k]) < 2   # JPEG q100 keeps luma (chroma is subsampled)
            other = images[[x for x in ss if x != s][0]][1]
            assert luma_gap(Image.open(d / f"{s}_1.jpg"), other) > 10

    pairs = list(AuthorsSource(str(out)).scan())
    assert sorted((p.instruction, p.input_image) for p in pairs) == sorted(
        (PROMPTS[i]["edit"], str(out / name / f"{s}_0.jpg")) for i, (name, ss) in enumerate(seeds) for s in ss)
    report = builder.build_dataset("authors", str(out), str(tmp_path / "tfds"), "gen", workers=1, progress=False)
    assert report.total == 4 and report.rejected == 0


def test_a_killed_run_resumes_to_what_one_run_writes(sampler, tmp_path, monkeypatch):
    settings = PairSettings(samples_per_prompt=2, keep=2, **SMALL)
    generate_pairs(sampler, PROMPTS, tmp_path / "once", settings, batch_size=PAIRS, progress=False)

    out = tmp_path / "resumed"
    saves, real_save = [], Image.Image.save

    def dying_save(self, fp, *args, **kwargs):   # the kill lands inside prompt 1's dir
        saves.append(fp)
        if len(saves) == 6:
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(sampler, PROMPTS, out, settings, batch_size=PAIRS, progress=False)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(os.listdir(out)) == ["0000000", "generation.json"]    # nothing half-written counts
    stale = out / ".partial" / "0000002-999999999"                          # a dead writer's leftovers
    stale.mkdir(parents=True)
    (stale / "x.jpg").write_bytes(b"")

    stats = generate_pairs(sampler, PROMPTS, out, settings, batch_size=PAIRS, progress=False)
    assert (stats.written, stats.skipped) == (2, 1) and not (out / ".partial").exists()
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(out) == files(tmp_path / "once")
    for p in files(out):   # the same seeds, draws and metadata; images up to the batch position's rounding
        if p.suffix == ".jpg":
            a, b = (np.asarray(Image.open(root / p)).astype(int) for root in (out, tmp_path / "once"))
            assert np.abs(a - b).max() <= 2, p
        else:
            assert (out / p).read_bytes() == (tmp_path / "once" / p).read_bytes(), p

    with pytest.raises(LayoutError, match="other settings.*steps: 4 there, 5 now"):
        generate_pairs(sampler, PROMPTS, out, PairSettings(samples_per_prompt=2, keep=2, steps=5, resolution=RES),
                       progress=False)
    with pytest.raises(LayoutError, match="holds a different prompt"):
        generate_pairs(sampler, PROMPTS[::-1], out, settings, progress=False)


# ------------------------------------------------------------------ the script and bad input

def test_partitions_are_the_authors_array_split():
    for n, k in [(10, 3), (7, 7), (3, 5), (0, 2), (100, 8)]:
        want = [list(p) for p in np.array_split(np.arange(n), k)]
        assert [list(partition_indices(n, i, k)) for i in range(k)] == want
    assert list(partition_indices(20, 1, 2, start=4, end=9)) == [7, 8]
    with pytest.raises(ValueError, match="partition 2 is not in 0..1"):
        partition_indices(5, 2, 2)


def test_script_generates_and_reports_bad_input(model, sampler, tmp_path, capsys):
    cli = load_script("generate_pairs")
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]) + "\n" + json.dumps(PROMPTS[2]) + "\n")
    out = tmp_path / "out"
    base = ["--model", model.folder, "--prompts", str(src), "--out", str(out), "--no-progress"]
    run = base + ["--steps", str(STEPS), "--resolution", str(RES), "--samples-per-prompt", "9", "--keep", "2",
                  "--batch-size", str(PAIRS), "--dtype", "fp32"]
    assert cli.main(run + ["--num-partitions", "2", "--partition", "0"]) == 0   # prompts 0 and 1
    captured = capsys.readouterr()
    assert "not CLIP-filtered" in captured.err and "2 prompt dirs written (4 pairs kept of 4 sampled)" in captured.out
    assert [n for n, _ in json.loads((out / "seeds.json").read_text())] == ["0000000", "0000001"]
    assert json.loads((out / "generation.json").read_text())["settings"]["steps"] == STEPS

    def fails(args, *messages):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"input": "a", "edit": "b"}) + "\n")
    fails(base[:2] + ["--prompts", str(bad)] + base[4:], f"{bad}:2: a prompt line needs text keys")
    bad.write_text("{not json\n")
    fails(base[:2] + ["--prompts", str(bad)] + base[4:], f"{bad}:1: not JSON")
    fails(base[:2] + ["--prompts", str(tmp_path / "none.jsonl")] + base[4:], "cannot read the prompts file")
    fails(["--model", str(tmp_path / "no_model")] + base[2:], f"{tmp_path / 'no_model'}: no such file or folder")
    fails(base + ["--clip-model", str(tmp_path / "no_clip")], "no such CLIP model folder")
    fails(run + ["--resolution", "18"], "resolution must be a positive multiple of 4")
    fails(base + ["--min-cfg", "9", "--max-cfg", "8"], "cfg_range: minimum 9.0 is above maximum 8.0")
    fails(run + ["--seed", "3"], "other settings", "seed: 0 there, 3 now")
    fails(run + ["--coordinator", "127.0.0.1:1"], "--coordinator, --num_processes and --process_id go together")
    ip2p = tiny.save_pipeline(str(tmp_path / "ip2p"))
    fails(["--model", ip2p] + base[2:], "not an InstructPix2Pix one")
    with pytest.raises(LayoutError, match="prompt 1: needs text keys"):
        generate_pairs(sampler, [PROMPTS[0], {"input": "a"}], tmp_path / "x", PairSettings(**SMALL), progress=False)
    assert read_prompts(src) == PROMPTS and layout.dir_name(12) == "0000012"


PAIR_DEVICES = """
import json, re, sys
import jax
import numpy as np
assert jax.device_count() == 4
from ip2p_jax import sharding
from ip2p_jax.datagen.image_pairs import PairSampler, injected_steps

def run(mesh):
    s = PairSampler.from_pretrained(sys.argv[1], dtype="fp32", mesh=mesh)
    plan, shape = s.plan(4), s.latent_shape(16)
    noise = np.random.default_rng(1).standard_normal((8,) + shape).astype(np.float32)
    cond = np.stack([s.encode_text(["a red circle", "a blue circle"])] * 8)
    args = (plan, noise, np.arange(8, dtype=np.uint32), cond, s.encode_text([""])[0], np.full(8, 7.5, np.float32),
            np.array([injected_steps(p, 4) for p in np.linspace(0, 1, 8)]))
    calls = []
    real = s._generate
    s._generate = lambda *a: calls.append(a) or real(*a)
    out = np.asarray(s.generate(*args))
    compiled = real.lower(*calls[0]).compile()
    cost = compiled.cost_analysis()
    collectives = re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(",
                             compiled.as_text())
    return out, float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]), collectives

four, f4, c4 = run(None)
one, f1, _ = run(sharding.data_mesh(jax.devices()[:1]))
print("RESULT", json.dumps({"ratio": f4 / f1, "max_diff": float(np.abs(four - one).max()),
                            "spread": float(np.abs(one - one[::-1]).max()), "collectives": c4}))
"""


def test_pair_stage_shards_its_batch_over_devices(model, tmp_path):
    """8 pairs on 4 simulated devices: each device does a quarter of the work, with no traffic
    between devices (the injection's row gather once all-gathered every layer's attention
    probabilities), and results equal 1 device (to rounding: 2 vs 8 pairs per device)."""
    import subprocess
    import sys

    from train_helpers import subprocess_env

    script = tmp_path / "pairs4.py"
    script.write_text(PAIR_DEVICES)
    proc = subprocess.run([sys.executable, str(script), model.folder], env=subprocess_env(devices=4),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert 0.2 <= res["ratio"] <= 0.3 and res["collectives"] == [], res
    assert res["max_diff"] <= TOL and res["spread"] > 0.01, res   # equal, and the pairs differ (not vacuous)
