"""`ip2p train` end to end on the tiny preset, in subprocesses:

run A: 16 steps uninterrupted (loss must fall on the 8 repeated synthetic pairs), export at the end.
run B: killed with SIGKILL while saving step 10 -> the step-10 save is incomplete, step 5 usable;
       restarted -> resumes from 5, stopped with SIGTERM -> saves where it stopped;
       restarted -> resumes, finishes at 16 with the same train state as run A, bit for bit.
The export loads in diffusers and in EditPipeline with the same edits; `ip2p export` rewrites it.
(slow) Sample edits of the validation pairs from the EMA weights reach TensorBoard.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_helpers import CONFIG, HERE, ROOT, run_once, subprocess_env, tokenizer_dir

STEPS, EVERY, KILL_SAVE_AT = 16, 5, 10


def train_args(workdir: str, tok: str, tensorboard: bool = False) -> list[str]:
    return ["train", "--config", CONFIG + ":tiny", "--workdir", workdir,
            f"--config.model.tokenizer={tok}", f"--config.train.num_steps={STEPS}",
            f"--config.checkpoint.every_steps={EVERY}", "--config.log.every_steps", "1",
            "--config.data.num_examples=8", f"--config.log.tensorboard={tensorboard}"]


def wait_for(proc: subprocess.Popen, text: str, timeout: float, log: list) -> bool:
    """Read proc's merged output until a line contains `text` (True) or it exits / times out (False)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.time() + timeout
    while time.time() < end:
        if not sel.select(timeout=1.0):
            if proc.poll() is not None:
                return False
            continue
        line = proc.stdout.readline()
        if not line:
            return False
        log.append(line)
        if text in line:
            return True
    return False


def start(args: list[str], env: dict, slow_save_at: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "slow-save", str(slow_save_at)] if slow_save_at else \
        [sys.executable, "-m", "ip2p_jax.cli"]
    return subprocess.Popen(cmd + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, log: list, timeout: float = 600) -> int:
    out, _ = proc.communicate(timeout=timeout)
    log.append(out)
    return proc.returncode


def steps_on_disk(workdir: str) -> tuple[list[int], list[str]]:
    ck = os.path.join(workdir, "checkpoints")
    names = os.listdir(ck) if os.path.isdir(ck) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


def read_state(workdir: str, step: int) -> dict:
    import warnings

    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as m, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]


def _compute(tmp: str) -> dict:
    tok = tokenizer_dir(tmp)
    env = subprocess_env(cache_dir=os.path.join(tmp, "xla_cache"))
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    logs = {"a": [], "b1": [], "b2": [], "b3": []}
    info = {"tmp": tmp, "tok": tok, "a": a, "b": b, "logs": logs, "env": env}

    rc = finish(start(train_args(a, tok, tensorboard=True), env), logs["a"])
    assert rc == 0, "".join(logs["a"])[-4000:]

    # B1: SIGKILL while orbax is writing step KILL_SAVE_AT (the save is held open by a sleep).
    p = start(train_args(b, tok), env, slow_save_at=KILL_SAVE_AT)
    ok = wait_for(p, "SAVING", 600, logs["b1"])
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert ok, "".join(logs["b1"])[-4000:]
    info["after_kill"] = steps_on_disk(b)

    # B2: resumes; SIGTERM once it has logged step 12 -> checkpoint at the step where it stops.
    p = start(train_args(b, tok), env)
    ok = wait_for(p, f"step 12/{STEPS}", 600, logs["b2"])
    p.send_signal(signal.SIGTERM)
    info["b2_rc"] = finish(p, logs["b2"])
    assert ok, "".join(logs["b2"])[-4000:]
    info["after_term"] = steps_on_disk(b)

    # B3: resumes and finishes.
    rc = finish(start(train_args(b, tok), env), logs["b3"])
    assert rc == 0, "".join(logs["b3"])[-4000:]
    return info


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_once(tmp_path_factory, "resume", _compute)


def test_loss_falls_when_overfitting(runs):
    rows = [json.loads(line) for line in open(os.path.join(runs["a"], "metrics.jsonl"))]
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(runs["a"], "tensorboard")))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.6 * first, losses


def test_kill_during_save_keeps_previous_checkpoint(runs):
    complete, other = runs["after_kill"]
    assert complete == [EVERY], runs["after_kill"]                       # step 10 never completed
    assert any(n.startswith(f"{KILL_SAVE_AT}.") for n in other), other   # ...its temporary folder is left
    assert any(f"resumed from {os.path.join(runs['b'], 'checkpoints')}/{EVERY}" in line for line in runs["logs"]["b2"])


def test_sigterm_saves_and_stops(runs):
    assert runs["b2_rc"] == 0, "".join(runs["logs"]["b2"])[-3000:]
    complete, other = runs["after_term"]
    stopped = max(complete)
    assert 12 < stopped < STEPS and not other, runs["after_term"]      # tmp folder of step 10 cleaned up
    assert any("stop requested" in line for line in runs["logs"]["b2"])
    assert any(f"checkpoints/{stopped}" in line for line in runs["logs"]["b3"])


@pytest.mark.slow   # an EditPipeline compile in one more training process; `make test-slow`
def test_sample_edits_logged(runs, tmp_path):
    """Continue run A by two steps with sample edits of the validation pairs from the EMA weights."""
    import shutil

    work = str(tmp_path / "a")
    shutil.copytree(runs["a"], work)
    log = []
    args = train_args(work, runs["tok"], tensorboard=True)
    args = [a for a in args if not a.startswith("--config.train.num_steps")]
    rc = finish(start(args + [f"--config.train.num_steps={STEPS + 2}", "--config.log.sample_every_steps=1"],
                      runs["env"]), log)
    assert rc == 0, "".join(log)[-4000:]
    folder = os.path.join(work, "tensorboard")
    events = b"".join(open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder))
    assert b"samples/0" in events and b"samples/1" in events


def test_resumed_run_equals_uninterrupted(runs):
    import jax

    a, b = read_state(runs["a"], STEPS), read_state(runs["b"], STEPS)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert int(np.asarray(a["step"])) == STEPS
    data = [json.load(open(os.path.join(w, "checkpoints", str(STEPS), "data", "process_0-of-1.json")))
            for w in (runs["a"], runs["b"])]
    assert data[0] == data[1] == {"json": {"next_batch": STEPS}}


def test_export_command_rewrites_the_same_weights(runs, tmp_path):
    from safetensors.numpy import load_file

    from ip2p_jax import cli

    out = str(tmp_path / "exported")
    assert cli.main(["export", "--workdir", runs["b"], "--out", out]) == 0
    for sub, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        x = load_file(os.path.join(out, sub, name + ".safetensors"))
        y = load_file(os.path.join(runs["a"], "export", sub, name + ".safetensors"))
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert cli.main(["export", "--workdir", str(tmp_path / "nothing"), "--out", out + "2"]) == 2


def test_export_loads_in_diffusers_and_editpipeline(runs):
    out = os.path.join(runs["tmp"], "export_check.json")
    proc = subprocess.run([sys.executable, __file__, "export-check", os.path.join(runs["a"], "export"), str(out)],
                          env=runs["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        r = json.load(f)
    assert r["shape"] == [16, 16, 3]
    assert r["max_abs"] < 1e-2 and r["mean_abs"] < 1e-3, r
    assert r["changed"] > 0.01, r   # the edit did something


# ----------------------------------------------------------------------------- subprocess modes

def slow_save_main(step: int, argv: list[str]) -> int:
    """`ip2p` with the data-state save of checkpoint `step` held open (prints SAVING, then sleeps)."""
    from ip2p_jax.train import checkpoint

    original = checkpoint.ProcessStateHandler.save

    def save(self, directory, args):
        original(self, directory, args)
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            print(f"SAVING {directory}", flush=True)
            time.sleep(600)

    checkpoint.ProcessStateHandler.save = save
    from ip2p_jax import cli

    return cli.main(argv)


def export_check(folder: str, out: str) -> None:
    """Edit one image with the exported folder in diffusers and in EditPipeline (DDIM, same noise)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    import tiny
    from ip2p_jax.pipeline import EditPipeline

    image = Image.fromarray(tiny.random_image(16, 16, seed=5))
    noise = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)
    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None,
                                                                 feature_extractor=None,
                                                                 requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    with torch.no_grad():
        want = ref("make the square red", image=image, num_inference_steps=3, guidance_scale=7.5,
                   image_guidance_scale=1.5, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                   output_type="np").images[0]
    pipe = EditPipeline.from_pretrained(folder, dtype="fp32")
    got = pipe.edit(image, "make the square red", steps=3, sampler="ddim", schedule="diffusers", latents=noise,
                    text_scale=7.5, image_scale=1.5, resize="keep", progress=False).arrays[0]
    d = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    with open(out, "w") as f:
        json.dump({"shape": list(got.shape), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
                   "changed": float(np.abs(got - np.asarray(image) / 255.0).mean())}, f)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    if sys.argv[1] == "slow-save":
        sys.exit(slow_save_main(int(sys.argv[2]), sys.argv[3:]))
    if sys.argv[1] == "export-check":
        export_check(sys.argv[2], sys.argv[3])
