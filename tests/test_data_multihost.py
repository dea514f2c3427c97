"""Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives), two CPU devices each:
disjoint host slices covering the split, and the assembled global batch."""
import json
import os
import subprocess
import sys

import data_helpers as dh
import tiny
from train_helpers import free_port
from ip2p_jax.data import builder as B

HOST_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, data, tok, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=120)

from jax.experimental import multihost_utils
from jax.sharding import AxisType, PartitionSpec
from ip2p_jax.data.augment import AugmentConfig
from ip2p_jax.data.builder import open_dataset
from ip2p_jax.data.multihost import to_global
from ip2p_jax.data.pipeline import EditPairPipeline, PipelineConfig
from ip2p_jax.tokenizer import FastTokenizer

tok = FastTokenizer(*json.load(open(tok)))  # no transformers import here
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
cfg = PipelineConfig(global_batch_size=8, num_epochs=1, augment=AugmentConfig(34, 40, 32))
pipe = EditPairPipeline(open_dataset(data), tok, cfg)  # process index / count from jax
local_batches = list(pipe)
glob = to_global(local_batches[0], mesh)
img = glob["input_image"]
shards_ok = all(
    np.array_equal(np.asarray(s.data), local_batches[0]["input_image"][s.index[0].start - 4 * pid:s.index[0].stop - 4 * pid])
    for s in img.addressable_shards)
gathered = multihost_utils.process_allgather(glob["index"], tiled=True)
with open(out, "w") as f:
    json.dump({"pid": jax.process_index(), "count": jax.process_count(), "local_batch": pipe.local_batch_size,
               "indices": [int(i) for b in local_batches for i in b["index"]],
               "first_local": [int(i) for i in local_batches[0]["index"]],
               "global_shape": {k: list(v.shape) for k, v in glob.items()},
               "global_dtype": {k: str(v.dtype) for k, v in glob.items()},
               "spec_ok": img.sharding.spec == PartitionSpec("data"), "shards_ok": bool(shards_ok),
               "n_addressable": len(img.addressable_shards), "gathered": [int(i) for i in gathered]}, f)
jax.distributed.shutdown()
"""



def test_two_processes(tmp_path):
    dh.write_authors(str(tmp_path / "src"), n_prompts=40, seeds=(1, 2))
    report = B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d"), progress=False)
    n_train = report.examples["train"]
    assert n_train % 8 == 0  # so one epoch is whole global batches
    tok = dh.fast_tokenizer_file(tiny.tokenizer(str(tmp_path / "tok")), tmp_path / "tok.json")
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), report.path, tok,
                               str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["pid"] for r in res] == [0, 1] and all(r["count"] == 2 and r["local_batch"] == 4 for r in res)
    a, b = set(res[0]["indices"]), set(res[1]["indices"])
    assert len(a) == len(res[0]["indices"]) == n_train // 2  # one epoch, no repeats within a host
    assert not a & b and a | b == set(range(n_train))  # disjoint, together the whole split
    for r in res:
        assert r["global_shape"] == {"input_image": [8, 32, 32, 3], "edited_image": [8, 32, 32, 3],
                                     "input_ids": [8, 77], "index": [8]}
        dtypes = r["global_dtype"]
        assert dtypes["input_image"] == "float32" and dtypes["input_ids"] == dtypes["index"] == "int32"
        assert r["spec_ok"] and r["n_addressable"] == 2 and r["shards_ok"]
        assert r["gathered"] == res[0]["first_local"] + res[1]["first_local"]  # rows in process order
