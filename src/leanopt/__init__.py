"""leanopt: PyTorch optimizers that make LLM training cheaper.

Each optimizer is a functional core over lists of tensors plus a thin
``torch.optim.Optimizer`` subclass; all are built through one registry::

    import leanopt
    opt = leanopt.create_optimizer("adam-mini", model, lr=3e-4, weight_decay=0.1)
"""

from .adam_mini import AdamMini, adam_mini
from .alpha_adam import AdamW, AlphaAdam, CAdamW, alpha_adam
from .lion import Lion, lion
from .partition import PartitionRow, PartitionWarning
from .pma import AdamWPMA, LionPMA
from .registry import OptimizerInfo, create_optimizer, list_optimizers, optimizer_info
from .sgd_sai import SGDSaI, sgd_sai

__version__ = "0.2.0"

__all__ = [
    "AdamMini",
    "SGDSaI",
    "AdamW",
    "AlphaAdam",
    "CAdamW",
    "Lion",
    "AdamWPMA",
    "LionPMA",
    "adam_mini",
    "sgd_sai",
    "alpha_adam",
    "lion",
    "create_optimizer",
    "list_optimizers",
    "optimizer_info",
    "OptimizerInfo",
    "PartitionRow",
    "PartitionWarning",
]
