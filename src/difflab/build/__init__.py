"""The build layer, difflab's Python API: run configs and checkpoints -> objects.

| function | what it gives |
|---|---|
| :func:`build_module` | the DiffusionModule of a train.py run config |
| :func:`build_classifier`, :func:`build_autoencoder` | the modules of train_classifier.py and train_vae.py |
| :func:`training_config` | a run config with what the data decides (classes, the VAE's fingerprint) filled in |
| :func:`load_checkpoint` | a trained DiffusionModule from a checkpoint (or run dir) alone |
| :func:`load_classifier` | a trained noise-aware or feature classifier |
| :func:`read_checkpoint`, :func:`resolve_checkpoint` | a checkpoint's contents and run config, read without running code |
| :func:`instantiate_node` | Hydra's ``instantiate`` with errors naming the config group |

Everything above it (tasks, callbacks, metrics, bench scripts) builds through here; it imports nothing above it.
"""

from difflab.build.checkpoints import (
    load_checkpoint,
    load_classifier,
    module_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)
from difflab.build.config import config_error, instantiate_node, root_cause, upgrade_run_config
from difflab.build.objects import (
    build_autoencoder,
    build_classifier,
    build_module,
    text_conditioned,
    training_config,
    with_captions,
    with_classes,
)

__all__ = [
    "build_autoencoder", "build_classifier", "build_module", "config_error", "instantiate_node", "load_checkpoint",
    "load_classifier", "module_from_checkpoint", "read_checkpoint", "resolve_checkpoint", "root_cause",
    "text_conditioned", "training_config", "upgrade_run_config", "with_captions", "with_classes",
]
