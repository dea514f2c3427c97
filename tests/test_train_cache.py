"""Latent cache: the cached path (VAE moments + text embeddings from an array_record file) gives the
same loss as the live path for the same examples and noise; the reader resumes; a run's data factory
serves it.
Runs in a subprocess (fast XLA:CPU compile flags)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # ~40 s of CPU (three compiles); `make test-slow`

from train_helpers import ROOT, run_once, tiny_config, tokenizer_dir, worker_result


def worker(tmp: str, tok: str, out: str) -> None:
    import jax

    from ip2p_jax.data.latent_cache import LatentCacheError, LatentCacheReader
    from ip2p_jax.train import latent_cache as lc, step as sp
    from ip2p_jax.train.build import build
    from ip2p_jax.train.data import make_train_data, model_inputs

    c = tiny_config(tok, model__train_text_encoder=False, log__tensorboard=False, export__at_end=False)
    built = build(c)
    cache = os.path.join(tmp, "cache")
    info = lc.build_cache(c, cache, max_examples=16)

    live = make_train_data(c, built.tokenizer, validation=True, process=(0, 1))   # what build_cache encoded
    reader = LatentCacheReader(cache, global_batch_size=8, shuffle=False)
    loss_fn = jax.jit(sp.make_loss_fn(built.models, built.step_config))
    key = jax.random.key(7)
    ids = np.arange(8, dtype=np.int32)
    results = {"info": info, "live": [], "cached": []}
    for _ in range(2):
        a = dict(model_inputs(next(live)), example_id=ids)
        b = dict(model_inputs(next(reader)), example_id=ids)
        results["live"].append(float(loss_fn(built.params, built.frozen, a, key)))
        results["cached"].append(float(loss_fn(built.params, built.frozen, b, key)))
        ids = ids + 8

    shuffled = LatentCacheReader(cache, global_batch_size=8, seed=3)
    next(shuffled)
    state = shuffled.get_state()
    want = next(shuffled)["text_embedding"]
    again = LatentCacheReader(cache, global_batch_size=8, seed=3)
    again.set_state(state)
    results["resume_equal"] = bool(np.array_equal(next(again)["text_embedding"], want))
    try:
        LatentCacheReader(cache, global_batch_size=4, seed=3).set_state(state)
        results["mismatch_error"] = ""
    except LatentCacheError as e:
        results["mismatch_error"] = str(e)

    # the run's data factory serves the cache when config.data.source says so
    c.data.source, c.data.path = "latent_cache", cache
    batch = next(make_train_data(c, built.tokenizer))
    results["factory_keys"] = sorted(model_inputs(batch))
    with open(out, "w") as f:
        json.dump(results, f)


def _compute(tmp: str) -> dict:
    out = os.path.join(tmp, "out.json")
    return worker_result(__file__, [tmp, tokenizer_dir(tmp), out], out, timeout=600)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_once(tmp_path_factory, "cache", _compute)


def test_cached_loss_equals_live_loss(result):
    assert result["info"]["num_examples"] == 16
    assert result["info"]["shapes"]["input_moments"] == [16, 16, 8]
    np.testing.assert_allclose(result["cached"], result["live"], rtol=1e-5)
    assert result["live"][0] != result["live"][1]


def test_cache_reader_resumes_and_checks_settings(result):
    assert result["resume_equal"]
    assert "global_batch_size" in result["mismatch_error"]


def test_run_reads_the_cache(result):
    assert result["factory_keys"] == ["edited_moments", "input_moments", "text_embedding"]


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    worker(*sys.argv[1:4])
