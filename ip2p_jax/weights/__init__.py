"""Reading and writing checkpoints (diffusers folders, single files, hub ids, our own).

Our checkpoints are diffusers folders (see diffusers_folder.py); `load` reads any of the three.
"""

from ip2p_jax.weights.naming import WeightsError, flax_to_torch, torch_to_flax  # noqa: F401
from ip2p_jax.weights.components import Components  # noqa: F401
from ip2p_jax.weights.channels import expand_conv_in  # noqa: F401
from ip2p_jax.weights.diffusers_folder import load_diffusers_folder, save_diffusers_folder  # noqa: F401
from ip2p_jax.weights.single_file import load_single_file, save_single_file  # noqa: F401
from ip2p_jax.weights.loader import load  # noqa: F401
