"""fold_forward: a batch norm (or per-channel Mul/Add) -> the linear op AFTER it.

Rooted at each linear op of grammar.LINEAR_OPS, walking input edges up from its data input:

    x -> (step | pass-through)* -> linear op

This is what the other passes cannot reach: a batch norm that follows a pool, a concat or
the model input, feeding a convolution directly. By linearity,
`conv(x * s + t, W) = conv(x, W * s) + conv(t, W)` (fold_math.fold_affine_into_next_linear),
where conv(t, W) is a per-channel constant only if the op reads no zero padding (VALID,
EXPLICIT of zero width, a one-cell kernel: LinearOpSpec.shift_blocked), or if there
is no shift at all. The linear op then reads x (through the pass-throughs, which stay) with a
new kernel, and conv(t, W) is added by a BiasAdd after it: merged into the BiasAdd already
there, or a new one that takes over the linear op's name (the op is renamed).

Left alone, with the reason: padding that would change, another consumer, a non-constant or
non-per-channel parameter. A bias alone (Add/Sub) right after another linear op is not a
source: it belongs to that op.
"""

from tf_bnfuse.passes import drivers

NAME = "fold_forward"


def run(context, graph_def, outputs):
    return drivers.fold_forward(context, graph_def, outputs, NAME)
