"""Property-based: random chains of the grammar's steps and pass-throughs, folded.

Each generated chain is a conv followed (backward) or preceded (forward) by a random mix of
steps (Mul, RealDiv, AddV2, Sub, FusedBatchNormV3, BatchNormWithGlobalNormalization) and
pass-throughs (Identity, AvgPool, MaxPool, Transpose between NHWC and NCHW). What must
fold is decided from the generated values, not by tf_bnfuse: everything, unless a MaxPool
sees a scale that is not positive in every channel. The reference is TF running the
unfolded graph.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import graphs

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

PIPELINE = {"pipeline": ["fold_batch_norm", "fold_affine", "fold_forward", "cleanup"]}
STEP_OPS = {"Mul", "RealDiv", "AddV2", "Sub", "FusedBatchNormV3", "BatchNormWithGlobalNormalization"}
CHANNELS = 3
ELEMENTS = ["Mul", "RealDiv", "AddV2", "Sub", "FusedBatchNormV3", "BatchNormWithGlobalNormalization",
            "Identity", "AvgPool", "MaxPool", "Transpose"]


@st.composite
def chains(draw):
    elements = draw(st.lists(st.sampled_from(ELEMENTS), min_size=1, max_size=5))
    if not STEP_OPS & set(elements):
        elements.append(draw(st.sampled_from(sorted(STEP_OPS))))
    return {"elements": elements, "forward": draw(st.booleans()),
            "negative": draw(st.lists(st.booleans(), min_size=len(elements), max_size=len(elements)))}


def _vector(rng, negative):
    values = rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32)
    if negative:
        values[1] = -values[1]
    return values


def build_chain(spec, seed):
    """(graph_def, whether it must fold); BatchNormWithGlobalNormalization nodes are written
    as stand-ins and patched in (the op exists only in GraphDefs of producer version < 9)."""
    rng = np.random.default_rng(seed)
    scales, pools, stand_ins = [], [], {}  # scales and MaxPools in data-flow order: (position, ...)

    def chain(y):
        channel_first = False
        for position, (op, negative) in enumerate(zip(spec["elements"], spec["negative"])):
            shape = [CHANNELS, 1, 1] if channel_first else [CHANNELS]
            if op in ("Mul", "RealDiv"):
                values = _vector(rng, negative)
                scales.append((position, values if op == "Mul" else 1 / values))
                y = getattr(tf.raw_ops, op)(x=y, y=values.reshape(shape))
            elif op in ("AddV2", "Sub"):
                y = getattr(tf.raw_ops, op)(x=y, y=rng.normal(0, 1, CHANNELS).astype(np.float32).reshape(shape))
            elif op == "FusedBatchNormV3" or (op.startswith("BatchNorm") and channel_first):
                params = list(graphs.bn_params(CHANNELS, rng))
                params[0] = _vector(rng, negative)
                scales.append((position, params[0]))
                y = graphs.fused_batch_norm(y, CHANNELS, "bn_%d" % position, params=params,
                                            data_format="NCHW" if channel_first else "NHWC")[0]
            elif op.startswith("BatchNorm"):
                gamma, beta, mean, variance = graphs.bn_params(CHANNELS, rng)
                gamma = _vector(rng, negative)
                scales.append((position, gamma))
                names = [graphs.const(v, "g%d_%s" % (position, k)).op.name
                         for k, v in zip("mvbg", (mean, variance, beta, gamma))]
                y = tf.identity(y, name="global_%d" % position)
                stand_ins[y.op.name] = names
            elif op == "Identity":
                y = tf.identity(y)
            elif op == "Transpose":
                y = tf.transpose(y, [0, 2, 3, 1] if channel_first else [0, 3, 1, 2])
                channel_first = not channel_first
            elif not channel_first:  # TF's CPU pools are NHWC only
                y = (tf.nn.max_pool2d if op == "MaxPool" else tf.nn.avg_pool2d)(y, 3, 1, "SAME")
                if op == "MaxPool":
                    pools.append(position)
        if channel_first:
            y = tf.transpose(y, [0, 2, 3, 1])
        return y

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, CHANNELS], name="x")
        kernel = graphs.const(rng.standard_normal((3, 3, CHANNELS, CHANNELS)).astype(np.float32), "w")
        if spec["forward"]:
            y = tf.nn.conv2d(chain(tf.nn.relu(x)), kernel, 1, "VALID", name="conv")
        else:
            y = chain(tf.nn.conv2d(x, kernel, 1, "SAME", name="conv"))
        tf.identity(y, name="out")

    graph_def, _ = graphs.build(build)
    for node in graph_def.node:
        if node.name in stand_ins:
            node.op = "BatchNormWithGlobalNormalization"
            node.input.extend(stand_ins[node.name])
            node.attr["variance_epsilon"].f = 1e-3
            node.attr["scale_after_normalization"].b = True
    graph_def.versions.producer = 8

    def crossing_positive(pool):
        crossing = [s for p, s in scales if (p < pool if spec["forward"] else p > pool)]
        return not crossing or np.all(np.prod(crossing, axis=0) > 0)

    return graph_def, all(crossing_positive(pool) for pool in pools)


@settings(max_examples=100)  # about 20 ms each
@given(chains(), st.integers(0, 2 ** 16))
def test_random_chains_fold_exactly_what_the_grammar_allows(spec, seed):
    graph_def, must_fold = build_chain(spec, seed)
    folded, report = graphs.fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, CHANNELS))}, ["out"],
                                             PIPELINE, rtol=1e-4)
    steps_left = [n.op for n in folded.node if n.op in STEP_OPS]
    if must_fold:
        assert steps_left == [], (spec, report.skips)
    else:
        assert steps_left, spec
        assert any("positive scale" in s.reason for s in report.skips), report.skips
