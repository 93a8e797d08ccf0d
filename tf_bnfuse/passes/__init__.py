"""The pass registry: name -> run(graph_def, outputs, **options) -> (graph_def, PassReport).

A pass is a module with NAME and run(); registering it is one line here.
"""

from tf_bnfuse.passes import cleanup
from tf_bnfuse.passes import constant_folding
from tf_bnfuse.passes import fold_affine
from tf_bnfuse.passes import fold_batch_norm
from tf_bnfuse.passes import fold_forward

REGISTRY = {
    constant_folding.NAME: constant_folding.run,
    fold_affine.NAME: fold_affine.run,
    fold_batch_norm.NAME: fold_batch_norm.run,
    fold_forward.NAME: fold_forward.run,
    cleanup.NAME: cleanup.run,
}
