"""fold_affine: per-channel Mul/RealDiv/Add/AddV2/Sub/BiasAdd by constants -> the linear op before them.

This is the batch norm as Keras 3 exports it (and tf-keras for rank-2 inputs): after
constant_folding, `AddV2(Mul(BiasAdd(conv, b), scale), offset)`.

Rooted at each arithmetic step (grammar.ARITHMETIC_OPS), walking input edges up:

    linear op -> (step | pass-through)* -> step

where a step's constant is a scalar or varies only along the channel axis where the chain
has it (Keras lowers Conv1D to ExpandDims -> Conv2D -> Squeeze; a Dense on rank 3 reshapes
around its MatMul). The chain composes into one `x * scale + shift`, folded into the kernel;
the new bias goes right after the linear op, and the root becomes it (or an Identity of the
last op kept) under its own name. A bias written as Add/AddV2/Sub of a constant alone is
rewritten to the canonical BiasAdd; a bias after a non-constant kernel merges all the same.

Left alone, with the reason in the report: a constant that varies along a non-channel axis,
`c - x` and `c / x`, a tensor with another consumer, a scale on a non-constant kernel, and
a Mul or RealDiv after anything that is not a linear op.
"""

from tf_bnfuse.passes import drivers
from tf_bnfuse.passes import grammar

NAME = "fold_affine"


def run(context, graph_def, outputs):
    return drivers.fold_backward(context, graph_def, outputs, NAME, grammar.ARITHMETIC_OPS, report_every_root=False)
