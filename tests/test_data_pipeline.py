"""grain input pipeline: determinism, resume, host slices, one seed per prompt, worker processes."""
import json
import os

import numpy as np
import pytest

import data_helpers as dh
import tiny
from ip2p_jax.data import builder as B
from ip2p_jax.data.augment import AugmentConfig
from ip2p_jax.data.pipeline import EditPairPipeline, PipelineConfig, PipelineError
from ip2p_jax.tokenizer import tokenize

AUG = AugmentConfig(min_resize=34, max_resize=40, crop_size=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    dh.write_authors(str(root / "src"), n_prompts=40, seeds=(1, 2))
    B.build_dataset("authors", str(root / "src"), str(root / "d"), progress=False)
    tok = tiny.tokenizer(str(root / "tok"))
    return B.open_dataset(str(root / "d"), "authors"), tok


def _pipe(data, **kw):
    builder, tok = data
    hosts = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
    hosts = {"process_index": 0, "process_count": 1, **hosts}
    return EditPairPipeline(builder, tok, PipelineConfig(**{"global_batch_size": 8, "augment": AUG, **kw}), **hosts)


def _take(pipe, n):
    return [next(pipe) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_batches_shapes_and_content(data):
    builder, tok = data
    batch = next(_pipe(data))
    assert batch["input_image"].shape == batch["edited_image"].shape == (8, 32, 32, 3)
    assert batch["input_image"].dtype == np.float32 and batch["input_ids"].dtype == np.int32
    assert batch["input_ids"].shape == (8, 77) and batch["index"].shape == (8,) and batch["index"].dtype == np.int32
    assert batch["input_image"].min() >= -1 and batch["input_image"].max() <= 1
    records = dh.read_split(builder, "train")
    want = tokenize(tok, [records[i]["instruction"] for i in batch["index"]])
    np.testing.assert_array_equal(batch["input_ids"], want)
    raw = next(_pipe(data, image_dtype="uint8"))
    assert raw["input_image"].dtype == np.uint8
    np.testing.assert_allclose(raw["input_image"] * (2 / 255) - 1, batch["input_image"], atol=1e-6)


def test_same_seed_same_batches(data):
    a, b, c = _take(_pipe(data), 4), _take(_pipe(data), 4), _take(_pipe(data, seed=1), 4)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not _same(a[0], c[0])


def test_resume_from_saved_state(data):
    run = _pipe(data)
    first = _take(run, 3)
    state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
    rest = _take(run, 6)  # crosses the epoch boundary (9 batches per epoch)
    resumed = _pipe(data)
    resumed.set_state(state)
    assert resumed.step == 3
    assert all(_same(x, y) for x, y in zip(rest, _take(resumed, 6)))
    assert not _same(first[0], rest[0])
    with pytest.raises(PipelineError, match="seed"):
        _pipe(data, seed=5).set_state(state)


def test_state_in_orbax_checkpoint(data, tmp_path):
    """The training loop's way: the state as a JSON item of an orbax checkpoint."""
    import orbax.checkpoint as ocp

    run = _pipe(data)
    _take(run, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(run.get_state())))
        mngr.wait_until_finished()
    want = _take(run, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    resumed = _pipe(data)
    resumed.set_state(restored["data"])
    assert all(_same(x, y) for x, y in zip(want, _take(resumed, 2)))


def test_epochs_cover_split_in_new_orders(data):
    builder, _ = data
    n = builder.info.splits["train"].num_examples
    pipe = _pipe(data, num_epochs=2)
    batches = list(pipe)
    per_epoch = n // 8
    assert len(batches) == 2 * per_epoch == 2 * pipe.steps_per_epoch
    e1 = np.concatenate([b["index"] for b in batches[:per_epoch]])
    e2 = np.concatenate([b["index"] for b in batches[per_epoch:]])
    assert len(set(e1)) == len(e1) == per_epoch * 8 and len(set(e2)) == len(e2)
    assert not np.array_equal(e1, e2)


def test_hosts_split_the_global_batch(data):
    """Two hosts' local batches at step s together are the one-host global batch at step s."""
    one = _take(_pipe(data), 5)
    hosts = [_take(_pipe(data, process_index=i, process_count=2), 5) for i in range(2)]
    for s in range(5):
        parts = [h[s] for h in hosts]
        assert all(p["input_image"].shape[0] == 4 for p in parts)
        assert not set(parts[0]["index"]) & set(parts[1]["index"])
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order_one, order_two = np.argsort(one[s]["index"]), np.argsort(merged["index"])
        for k in merged:  # same examples, same augmentation (randomness follows the stream position)
            np.testing.assert_array_equal(one[s][k][order_one], merged[k][order_two])
    with pytest.raises(PipelineError, match="not divisible"):
        _pipe(data, process_index=0, process_count=3)


def test_one_seed_per_prompt(data):
    builder, _ = data
    records = dh.read_split(builder, "train")
    prompts = {r["prompt_id"] for r in records}
    pipe = _pipe(data, one_seed_per_prompt=True, global_batch_size=4, num_epochs=2)
    assert pipe.num_units == len(prompts) == len(records) // 2
    batches = list(pipe)
    picks = np.concatenate([b["index"] for b in batches]).reshape(2, -1)
    for epoch in picks:
        assert sorted(records[i]["prompt_id"] for i in epoch) == sorted(prompts)  # each prompt once
    seeds = {records[i]["id"] for i in picks.ravel()}
    assert len(seeds) > len(prompts)  # different seeds chosen across epochs


def test_same_image_pair_stays_identical(tmp_path, data):
    """Through the whole pipeline: a pair made of one image twice gives two equal arrays."""
    _, tok = data
    src = tmp_path / "src"
    src.mkdir()
    lines = []
    for i in range(10):
        (src / f"{i}.jpg").write_bytes(dh.image_bytes(i, size=40))
        lines.append(json.dumps({"input_image": f"{i}.jpg", "edited_image": f"{i}.jpg", "instruction": "x",
                                 "prompt_id": "all-train"}))
    (src / "same.jsonl").write_text("\n".join(lines))
    builder = B.open_dataset(B.build_dataset("jsonl", str(src), str(tmp_path / "d"), progress=False).path)
    assert B.src.split_of("all-train") == "train"
    aug = AugmentConfig(34, 40, 32, draft_decode=True)  # also the reduced-scale JPEG decoding path
    pipe = EditPairPipeline(builder, tok, PipelineConfig(global_batch_size=5, augment=aug), process_index=0,
                            process_count=1)
    for batch in _take(pipe, 6):
        np.testing.assert_array_equal(batch["input_image"], batch["edited_image"])


def test_bad_settings(data):
    with pytest.raises(PipelineError, match="split 'nope'"):
        _pipe(data, split="nope")
    with pytest.raises(PipelineError, match="fewer than one global batch"):
        _pipe(data, split="test", global_batch_size=64)


WORKER_SCRIPT = """
import json, sys
import numpy as np
from ip2p_jax.data.builder import open_dataset
from ip2p_jax.data.augment import AugmentConfig
from ip2p_jax.data.pipeline import EditPairPipeline, PipelineConfig
from ip2p_jax.tokenizer import FastTokenizer

def run(workers, steps, state=None):
    cfg = PipelineConfig(global_batch_size=8, augment=AugmentConfig(34, 40, 32), worker_count=workers)
    tok = FastTokenizer(*json.load(open({tok!r})))  # no transformers import in this process
    pipe = EditPairPipeline(open_dataset({data!r}), tok, cfg, process_index=0, process_count=1)
    if state:
        pipe.set_state(state)
    with pipe:
        return [next(pipe) for _ in range(steps)], pipe.get_state()

if __name__ == "__main__":
    inline, state = run(0, 3)
    # two worker processes, resumed at step 1: the same batches as in-process steps 1 and 2
    with_workers, end = run(2, 2, {{**state, "step": 1}})
    same = all(np.array_equal(a[k], b[k]) for a, b in zip(inline[1:], with_workers) for k in a)
    print(json.dumps({{"same": same, "end": end}}))
"""


def test_worker_processes_give_the_same_batches(data, tmp_path):
    import subprocess
    import sys

    builder, tok = data
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT.format(data=str(builder.data_dir),
                                           tok=dh.fast_tokenizer_file(tok, tmp_path / "tok.json")))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["same"] and result["end"]["step"] == 3


def test_sdxl_second_tokenizer_and_crop_time_ids(data, tmp_path):
    """With tokenizer_2 (SDXL) a batch also has the second tokenizer's ids and each example's time ids
    (original size, the crop's top-left from its own augmentation draw, target size)."""
    from ip2p_jax.data import augment as aug

    builder, tok = data
    tok_2 = tiny.tokenizer_2(str(tmp_path / "tok2"))
    pipe = EditPairPipeline(builder, tok, PipelineConfig(global_batch_size=8, augment=AUG), process_index=0,
                            process_count=1, tokenizer_2=tok_2)
    batch = next(pipe)
    records = dh.read_split(builder, "train")
    texts = [records[i]["instruction"] for i in batch["index"]]
    np.testing.assert_array_equal(batch["input_ids_2"], tokenize(tok_2, texts))
    assert not np.array_equal(batch["input_ids_2"], batch["input_ids"])   # "!" padding, not the end token
    assert batch["time_ids"].shape == (8, 6) and batch["time_ids"].dtype == np.float32
    for position, row in enumerate(batch["time_ids"]):
        p = aug.draw_params(AUG, np.random.default_rng([0, position]))
        original = aug.image_size(records[batch["index"][position]]["edited_image"])
        np.testing.assert_array_equal(row, aug.sdxl_time_ids(original, p, AUG.crop_size))
    assert (batch["time_ids"][:, 2:4] > 0).any() and (batch["time_ids"][:, 4:] == 32).all()
    assert "time_ids" not in next(_pipe(data))
