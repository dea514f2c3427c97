"""Edit-pair datasets (TFDS, array_record, no TensorFlow) and the grain input pipeline.

Heavy dependencies (TFDS, grain, jax) load only when the names below are first used.
"""
import importlib

_EXPORTS = {
    "build_dataset": "builder", "open_dataset": "builder", "BuildError": "builder", "BuildReport": "builder",
    "SourceError": "sources",
    "AugmentConfig": "augment",
    "EditPairPipeline": "pipeline", "PipelineConfig": "pipeline", "PipelineError": "pipeline",
    "make_pipeline": "pipeline",
    "to_global": "multihost", "global_batches": "multihost", "batch_sharding": "multihost",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
