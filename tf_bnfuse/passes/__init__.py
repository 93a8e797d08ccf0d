"""The pass registry: name -> run(graph_def, outputs, **options) -> (graph_def, PassReport).

A pass is a module with NAME and run(); registering it is one line here.
"""

from tf_bnfuse.passes import cleanup
from tf_bnfuse.passes import constant_folding
from tf_bnfuse.passes import fold_affine
from tf_bnfuse.passes import fold_batch_norm
from tf_bnfuse.passes import fold_forward
from tf_bnfuse.passes import promote_float16

REGISTRY = {
    constant_folding.NAME: constant_folding.run,
    fold_affine.NAME: fold_affine.run,
    fold_batch_norm.NAME: fold_batch_norm.run,
    fold_forward.NAME: fold_forward.run,
    promote_float16.NAME: promote_float16.run,  # not in the default pipeline: the TFLite path uses it
    cleanup.NAME: cleanup.run,
}
