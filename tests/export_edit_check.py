"""Run by test_export in a fresh process with XLA's default optimisation (the tests' unoptimised
XLA compiles even a jit wrapper of the same program to other bits): edit() on the tiny model, then
the exported edit reloaded from bytes on the same inputs; prints the max abs difference."""
import sys

import jax
import numpy as np

import edit_fixtures as fx
from ip2p_jax.pipeline import EditPipeline, export_plan
from ip2p_jax.weights import load


def main(model_dir: str) -> None:
    pipe = EditPipeline(load(model_dir, dtype=np.float32), dtype="fp32")
    fed, real = [], pipe._edit_jit
    pipe._edit_jit = lambda *a: fed.append(a) or real(*a)
    want = np.stack(pipe.edit(fx.sample_images(2), fx.INSTRUCTION, steps=fx.STEPS, sampler="euler_a", seed=3,
                              resize="keep", batch_size=fx.BATCH, progress=False).arrays)
    params, _plan, *inputs = fed[0]
    exported = pipe.export(platform="cpu", batch=fx.BATCH, size=(fx.H, fx.W), steps=fx.STEPS, sampler="euler_a")
    reloaded = jax.export.deserialize(exported.serialize())
    got = np.asarray(reloaded.call(params, export_plan(pipe.plan("euler_a", fx.STEPS)), *inputs))[:2]
    other = np.asarray(reloaded.call(params, export_plan(pipe.plan("ddim", fx.STEPS)), *inputs))[:2]
    print(f"RESULT {np.max(np.abs(got - want))} {np.max(np.abs(other - want))}")


if __name__ == "__main__":
    main(sys.argv[1])
