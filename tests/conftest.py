import os
import sys

# Tests run on CPU in fp32; keep XLA from grabbing all threads' memory on small machines.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # `import tiny`
from train_helpers import FAST_XLA  # noqa: E402

# Tests compare numbers, not speed: unoptimised XLA compiles several times faster on CPU.
os.environ.setdefault("XLA_FLAGS", FAST_XLA)
os.environ.setdefault("IP2P_COMPILE_CACHE", "0")   # the CLI's persistent compile cache: off in tests
# one CPU device unless a test asks for more: the CLI's device-per-core setting (ip2p_jax.cpu_devices)
# would otherwise change the device count of whichever test process starts JAX through it first
os.environ.setdefault("IP2P_CPU_DEVICES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _package_logger_restored():
    """cli.main sets the package logger's level (-q: WARNING) and the training loop its propagation;
    put both back so a later test in the same worker still sees the records it expects."""
    pkg = logging.getLogger("ip2p_jax")
    level, propagate, handlers = pkg.level, pkg.propagate, list(pkg.handlers)
    yield
    pkg.setLevel(level)
    pkg.propagate = propagate
    pkg.handlers[:] = handlers
