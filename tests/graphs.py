"""Builders for small hand-made GraphDefs, and a runner that executes one.

Every batch norm gets random, non-trivial statistics so that each fold changes
the kernel.
"""

import numpy as np
import tensorflow as tf

RNG = np.random.default_rng(1234)


def bn_params(channels, rng=RNG, dtype=np.float32):
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.normal(0, 0.5, channels).astype(dtype)
    mean = rng.normal(0, 0.5, channels).astype(dtype)
    variance = rng.uniform(0.2, 2.0, channels).astype(dtype)
    return gamma, beta, mean, variance


def fused_batch_norm(x, channels, name, version="V3", data_format="NHWC", is_training=False,
                     params=None, epsilon=1e-3, param_dtype=np.float32):
    """A FusedBatchNorm{,V2,V3} node on x with constant random parameters."""
    gamma, beta, mean, variance = params or bn_params(channels, dtype=param_dtype)
    consts = [tf.constant(v, name="%s/%s" % (name, n))
              for v, n in zip((gamma, beta, mean, variance), ("gamma", "beta", "mean", "variance"))]
    if is_training:  # training mode takes empty mean/variance
        consts[2] = tf.constant([], dtype=param_dtype, name=name + "/empty_mean")
        consts[3] = tf.constant([], dtype=param_dtype, name=name + "/empty_var")
    op = {"": tf.raw_ops.FusedBatchNorm, "V2": tf.raw_ops.FusedBatchNormV2,
          "V3": tf.raw_ops.FusedBatchNormV3}[version]
    return op(x=x, scale=consts[0], offset=consts[1], mean=consts[2], variance=consts[3],
              epsilon=epsilon, data_format=data_format, is_training=is_training, name=name)


def const(value, name):
    return tf.constant(value, name=name)


def random(shape, dtype=np.float32, rng=RNG):
    return rng.standard_normal(shape).astype(dtype)


def build(fn):
    """Runs fn() in a fresh graph; returns (graph_def, fn's return value)."""
    graph = tf.Graph()
    with graph.as_default():
        result = fn()
    return graph.as_graph_def(), result


def run(graph_def, feeds, fetches, grappler=True):
    """Executes a GraphDef: feeds {placeholder name: array}, fetches [tensor names].

    grappler=False runs TF's kernels on the graph as it is: Grappler rewrites the very
    patterns tf_bnfuse folds (FoldMultiplyIntoConv, the remapper's fusions), so a
    reference that went through it is not independent of them, and on some it fails
    (TF 2.21 aborts on conv -> RealDiv(c) -> Mul(c); a scalar Mul folded into a float16
    kernel overflows to NaN)."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    fetch_tensors = [graph.get_tensor_by_name(f if ":" in f else f + ":0") for f in fetches]
    feed_dict = {graph.get_tensor_by_name(k + ":0"): v for k, v in feeds.items()}
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = not grappler
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        return session.run(fetch_tensors, feed_dict)


def assert_same_outputs(expected, actual, rtol=1e-4):
    """The one rule folded outputs are held to: the same keys, shapes and dtypes; floats within
    rtol of the output's scale (plus 1e-6); everything else equal."""
    assert sorted(expected) == sorted(actual)
    for name in expected:
        e, a = np.asarray(expected[name]), np.asarray(actual[name])
        assert e.shape == a.shape and e.dtype == a.dtype, (name, e.shape, a.shape, e.dtype, a.dtype)
        if not (np.issubdtype(e.dtype, np.floating) or e.dtype.name == "bfloat16"):  # ml_dtypes' bfloat16
            np.testing.assert_array_equal(a, e, err_msg=name)
            continue
        e, a = e.astype(np.float64), a.astype(np.float64)
        scale = np.abs(e).max() if e.size else 0.0
        assert np.abs(a - e).max(initial=0.0) <= rtol * scale + 1e-6, (name, np.abs(a - e).max(), scale)


def fold_and_compare(graph_def, feeds, outputs, pipeline, rtol=1e-5):
    """Folds graph_def with `pipeline` (a config dict), checks the folded graph against TF
    running the unfolded one (assert_same_outputs; both without Grappler, see run), and
    that the argument is untouched;
    returns (folded GraphDef, GraphReport)."""
    from tf_bnfuse import fold_graph_def

    before = graph_def.SerializeToString(deterministic=True)
    folded, report = fold_graph_def(graph_def, outputs, pipeline)
    assert graph_def.SerializeToString(deterministic=True) == before, "argument was modified"
    expected, actual = run(graph_def, feeds, outputs, grappler=False), run(folded, feeds, outputs, grappler=False)
    assert_same_outputs(dict(zip(outputs, expected)), dict(zip(outputs, actual)), rtol)
    return folded, report


def op_counts(graph_def):
    counts = {}
    for node in graph_def.node:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def batch_norm_nodes(graph_def):
    return [n.name for n in graph_def.node if n.op.startswith("FusedBatchNorm")]


LINEAR_OPS = {"Conv2D", "DepthwiseConv2dNative", "Conv3D", "Conv2DBackpropInput", "Conv3DBackpropInputV2",
              "MatMul"}
AFFINE_OPS = {"Mul", "RealDiv", "Add", "AddV2", "Sub"}


def affine_after_linear(graph_def, outputs=()):
    """Mul/Add/Sub/RealDiv nodes by a constant that directly follow a linear op.

    Written independently of the passes: from each linear op, follow a lone
    consumer through Identity, BiasAdd and Squeeze; report the first affine op
    with a Const (or Identity-of-Const) operand. Tensors with several
    consumers, or that are outputs, end the walk (folding there is forbidden).
    """
    nodes = {n.name: n for n in graph_def.node}
    consumers = {}
    for n in graph_def.node:
        for i in n.input:
            if not i.startswith("^"):
                consumers.setdefault(i.split(":")[0] if not i.split(":")[-1].isdigit() else i.rsplit(":", 1)[0],
                                     []).append(n)

    def is_const(input_name):
        node = nodes.get(input_name.lstrip("^").split(":")[0])
        while node is not None and node.op == "Identity":
            node = nodes.get(node.input[0].split(":")[0])
        return node is not None and node.op == "Const"

    found = []
    for node in graph_def.node:
        if node.op not in LINEAR_OPS:
            continue
        current = node
        while len(consumers.get(current.name, [])) == 1 and current.name not in outputs:
            nxt = consumers[current.name][0]
            if nxt.op in AFFINE_OPS and any(is_const(i) for i in nxt.input):
                found.append(nxt.name)
                break
            if nxt.op not in ("Identity", "BiasAdd", "Squeeze"):
                break
            current = nxt
    return found


def data_path_op_count(graph_def):
    return sum(1 for n in graph_def.node if n.op not in ("Const", "Identity", "NoOp", "Placeholder"))


def batch_norm_after_linear(graph_def):
    """Inference FusedBatchNorm nodes that a linear op feeds through a lone-consumer
    chain of Identity and bias ops (written independently of the passes)."""
    nodes = {n.name: n for n in graph_def.node}
    consumers = {}
    for n in graph_def.node:
        for i in n.input:
            if not i.startswith("^"):
                consumers.setdefault(i.rsplit(":", 1)[0] if i.rsplit(":", 1)[-1].isdigit() else i, []).append(n)
    found = []
    for node in graph_def.node:
        if node.op not in LINEAR_OPS:
            continue
        current = node
        while len(consumers.get(current.name, [])) == 1:
            nxt = consumers[current.name][0]
            if nxt.op.startswith("FusedBatchNorm"):
                if "is_training" in nxt.attr and not nxt.attr["is_training"].b:
                    found.append(nxt.name)
                break
            if nxt.op not in ("Identity", "BiasAdd", "Add", "AddV2"):
                break
            current = nxt
    del nodes
    return found
