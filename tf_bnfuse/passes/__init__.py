"""The pass registry: name -> run(graph_def, outputs, **options) -> (graph_def, PassReport).

A pass is a module with NAME and run(); registering it is one line here.
"""

from tf_bnfuse.passes import cleanup
from tf_bnfuse.passes import fold_batch_norm

REGISTRY = {
    fold_batch_norm.NAME: fold_batch_norm.run,
    cleanup.NAME: cleanup.run,
}
