"""fold_batch_norm: an inference batch norm -> the linear op before it.

Rooted at each FusedBatchNorm, FusedBatchNormV2, FusedBatchNormV3 and
BatchNormWithGlobalNormalization (grammar.BATCH_NORM_OPS), walking input edges up:

    linear op -> (step | pass-through)* -> batch norm

(steps and pass-throughs as in grammar.STEPS and grammar.PASS_THROUGHS: a bias, Identities,
a dilated conv's BatchToSpaceND, a Dense's Reshape, a mixed-precision Cast, ...). The linear
op reads a new folded kernel Const, the new bias goes right after it (or after a Cast),
and the batch norm node becomes that bias, or an Identity of the last op kept, under its own
name. Every batch norm that does not fold is reported with the reason.
"""

from tf_bnfuse.passes import drivers
from tf_bnfuse.passes import grammar

NAME = "fold_batch_norm"


def run(context, graph_def, outputs):
    return drivers.fold_backward(context, graph_def, outputs, NAME, grammar.BATCH_NORM_OPS, report_every_root=True)
