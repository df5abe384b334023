"""Adam-mini's parameter partition: which elements share one second-moment scalar.

Adam-mini (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More",
arXiv:2406.16793) keeps one second-moment value per *block* of a parameter, where a block
is one dense sub-block of the Hessian (the paper's Principle 1). For a transformer that
means (spec §1): one block per token row of an embedding or output head, one per
attention head of a query/key projection, one per output neuron of every other linear
layer, the Q/K/V parts of a fused projection treated separately, plain Adam for biases,
and one block per tensor for norms and everything else.

Every partition is expressed with one small data type, :class:`BlockLayout`: the tensor
is viewed as a 2-D matrix, one axis of which indexes *lanes* (output neurons, token rows,
chunks) and the other is averaged over; consecutive lanes are grouped into blocks by
``segments``. The optimizer step then needs no per-rule code: it reduces ``g²`` over the
averaged axis (one pass over the gradient), sums lanes into blocks, and broadcasts one
scale per lane back.

Three ways to obtain a partition:

* :func:`partition_from_model` reads module types (``nn.Linear``, transformers'
  ``Conv1D``, ``nn.Embedding``, ``nn.MultiheadAttention``, convolutions, norms, LoRA
  adapters, fused mixture-of-experts weights and their routers, ViT tokens and position
  tables, state-space layers) and the head geometry from the modules and the model's
  config; a parameter it has no rule for gets one block and is named in a warning;
* :func:`name_rule` reproduces the substring rules of the released ``adam-mini`` 1.1.1
  package exactly (``AdamMini(..., partition="names")``, or ``dim=``/``n_heads=`` without
  a model);
* :func:`partition_plain` is one block per tensor, when there is no model.

Any rule can be overridden per parameter name (``fnmatch`` patterns) with
``"element"``, ``"neuron"``, ``"whole"`` or ``"head:N"`` (blocks of N output neurons).

The package: :mod:`.layout` (the block algebra), :mod:`.rules` (what a partition says,
overrides, reports), :mod:`.model` (the model walk) and :mod:`.names` (adam-mini's name
rules).
"""

from __future__ import annotations

from .layout import BlockLayout
from .model import HeadGeometry, ModelPartition, partition_from_model
from .names import name_rule
from .rules import UNRECOGNIZED, BlockRule, PartitionRow, PartitionWarning, apply_overrides, format_partition, partition_plain

__all__ = [
    "BlockLayout",
    "BlockRule",
    "PartitionRow",
    "PartitionWarning",
    "HeadGeometry",
    "ModelPartition",
    "UNRECOGNIZED",
    "partition_from_model",
    "name_rule",
    "partition_plain",
    "apply_overrides",
    "format_partition",
]
