"""Training: the one optimisation loop (:mod:`.loop`), the progressive trainer of flow blocks built
on it (:mod:`.progressive`: :func:`train` on a data set name, :func:`train_tensors` on tensors), what
a run is given (:mod:`.inputs`: :class:`TrainData`, a user's velocity) and the run configuration
(:mod:`.config`).

Example:
    >>> from iterflow.train import TrainConfig
    >>> TrainConfig(method="fm", steps=10).optim_config().steps
    10
"""

from iterflow.core.store import load_flow
from iterflow.io import RunDir
from iterflow.train.config import (
    DTYPES,
    TrainConfig,
    autocast_dtype,
    build_velocity,
    cpu_has_native_bf16,
    lr_at,
    network_config,
    resolve_device,
    stage_seed,
    standardization,
)
from iterflow.train.inputs import TrainData, VelocitySource, check_labels
from iterflow.train.loop import (
    Checkpoint,
    OptimConfig,
    Reporter,
    ResumeWarning,
    SilentReporter,
    StepBudget,
    cosine_lr,
    optimize,
)
from iterflow.train.progressive import TrainResult, load_run, train, train_tensors

__all__ = [
    "DTYPES",
    "Checkpoint",
    "OptimConfig",
    "Reporter",
    "ResumeWarning",
    "RunDir",
    "SilentReporter",
    "StepBudget",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "VelocitySource",
    "autocast_dtype",
    "build_velocity",
    "check_labels",
    "cosine_lr",
    "cpu_has_native_bf16",
    "load_flow",
    "load_run",
    "lr_at",
    "network_config",
    "optimize",
    "resolve_device",
    "stage_seed",
    "standardization",
    "train",
    "train_tensors",
]
