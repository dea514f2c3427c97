"""One InstructPix2Pix train step (train/step.py as is) as a serialisable jax.export.Exported.

    exported = export_train_step(step_fn, state, frozen, batch, platform="tpu")
    blob = exported.serialize()                     # flat: no project types in the artifact
    new_leaves = jax.export.deserialize(blob).call(*jax.tree.leaves((state, frozen, batch)))
    state, metrics = jax.tree.unflatten(out_tree(step_fn, state, frozen, batch), new_leaves)

The artifact takes and returns the leaves of (state, frozen, batch) and (state, metrics), so
TrainState needs no registration for serialisation. A TPU program from another host needs the
models built with attention_impl="pallas".
"""
from __future__ import annotations

from typing import Callable

import jax


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def out_tree(step_fn: Callable, state, frozen, batch):
    """The pytree structure of step_fn's (state, metrics), to unflatten the artifact's outputs."""
    return jax.tree.structure(jax.eval_shape(step_fn, _abstract(state), _abstract(frozen), _abstract(batch)))


def export_train_step(step_fn: Callable, state, frozen, batch, *, platform: str | None = None) -> jax.export.Exported:
    """step_fn(state, frozen, batch) -> (state, metrics) (step.make_train_step) exported for
    `platform` (default the default backend) at the shapes of the given (or abstract) trees."""
    args = _abstract((state, frozen, batch))
    tree = jax.tree.structure(args)

    def flat(*leaves):
        return jax.tree.leaves(step_fn(*jax.tree.unflatten(tree, leaves)))

    return jax.export.export(jax.jit(flat), platforms=[platform or jax.default_backend()])(*jax.tree.leaves(args))
