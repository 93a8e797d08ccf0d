"""Property-based: random small graphs, saved as SavedModels, folded by the tool.

For every generated graph: the outputs match the original, no foldable pair is
left, no forbidden fold happened, and the input folder is unchanged. What is
foldable is decided from the generated spec, not by tf_bnfuse.
"""

import tempfile

import numpy as np
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import conftest
import graphs
from savedmodel_checks import compare_outputs, output_graph_def, save_graph_def
from tf_bnfuse import fold_saved_model

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

FORMATS = {"Conv2D": ["NHWC", "NCHW"], "DepthwiseConv2dNative": ["NHWC", "NCHW"], "Conv3D": ["NDHWC", "NCDHW"],
           "Conv2DBackpropInput": ["NHWC", "NCHW"], "MatMul": ["NC"]}


@st.composite
def branch_specs(draw):
    op = draw(st.sampled_from(sorted(FORMATS)))
    data_format = draw(st.sampled_from(FORMATS[op]))
    if op == "MatMul":
        bn_forms = ["mul_add"]  # FusedBatchNorm takes only 4-D or 5-D inputs
    elif op == "Conv3D":
        bn_forms = ["V3", "mul_add", "training"]
    else:
        bn_forms = ["", "V2", "V3", "mul_add", "training"]
    return {
        "op": op, "format": data_format,
        "channels": draw(st.integers(1, 4)),
        "bias": draw(st.sampled_from(["none", "BiasAdd", "AddV2"])),
        "ids_before": draw(st.integers(0, 2)), "ids_after": draw(st.integers(0, 2)),
        "bn": draw(st.sampled_from(bn_forms)),
        "extra_consumer": draw(st.booleans()),
        "twin": draw(st.booleans()),  # a second linear op sharing the kernel, with its own batch norm
        "transpose_b": draw(st.booleans()),
    }


def _input_shape(spec):
    channel_first = spec["format"].startswith("NC") and spec["op"] != "MatMul"
    spatial = {"Conv3D": [3, 4, 4]}.get(spec["op"], [5, 5])
    if spec["op"] == "MatMul":
        return [2, 3]
    return [2, 3] + spatial if channel_first else [2] + spatial + [3]


def _linear(spec, x, kernel, name):
    strides = [1] * len(x.shape)
    cout = spec["channels"]
    if spec["op"] == "MatMul":
        return tf.raw_ops.MatMul(a=x, b=kernel, transpose_b=spec["transpose_b"], name=name)
    if spec["op"] == "Conv2DBackpropInput":
        sizes = list(x.shape)
        sizes[1 if spec["format"] == "NCHW" else 3] = cout
        return tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=kernel, out_backprop=x, strides=strides,
                                              padding="SAME", data_format=spec["format"], name=name)
    return getattr(tf.raw_ops, spec["op"])(input=x, filter=kernel, strides=strides, padding="SAME",
                                          data_format=spec["format"], name=name)


def _kernel_shape(spec):
    cin, cout = 3, spec["channels"]
    return {"Conv2D": (3, 3, cin, cout), "DepthwiseConv2dNative": (3, 3, cin, cout), "Conv3D": (2, 3, 3, cin, cout),
            "Conv2DBackpropInput": (3, 3, cout, cin),
            "MatMul": (cout, cin) if spec["transpose_b"] else (cin, cout)}[spec["op"]]


def _out_channels(spec):
    return 3 * spec["channels"] if spec["op"] == "DepthwiseConv2dNative" else spec["channels"]


def _affine_chain(spec, y, name):
    """Bias, Identity runs and the batch norm after a linear op output y."""
    channels, rank = _out_channels(spec), len(y.shape)
    channel_first = spec["format"].startswith("NC") and spec["op"] != "MatMul"
    vector_shape = [channels] + [1] * (rank - 2) if channel_first else [channels]
    for _ in range(spec["ids_before"]):
        y = tf.identity(y)
    if spec["bias"] == "BiasAdd":
        y = tf.nn.bias_add(y, graphs.random(channels), data_format="NCHW" if channel_first else "NHWC")
    elif spec["bias"] == "AddV2":
        y = tf.raw_ops.AddV2(x=y, y=graphs.random(vector_shape))
    for _ in range(spec["ids_after"]):
        y = tf.identity(y)
    bn_format = {4: "NCHW", 5: "NCDHW"}.get(rank) if channel_first else {4: "NHWC", 5: "NDHWC"}.get(rank)
    if spec["bn"] == "mul_add":
        gamma, beta, mean, var = [tf.constant(v) for v in graphs.bn_params(channels)]
        scale = tf.reshape(tf.math.rsqrt(var + 1e-3) * gamma, vector_shape)
        offset = tf.reshape(beta, vector_shape) - tf.reshape(mean, vector_shape) * scale
        return y * scale + offset
    version = "V3" if spec["bn"] == "training" else spec["bn"]
    return graphs.fused_batch_norm(y, channels, name, version=version, data_format=bn_format,
                                   is_training=spec["bn"] == "training")[0]


def build_graph(specs):
    """Returns (graph_def, input names, output names, {linear node: foldable?})."""
    expectations = {}

    def build():
        inputs, outputs = [], []
        for k, spec in enumerate(specs):
            x = tf.compat.v1.placeholder(tf.float32, _input_shape(spec), name="in_%d" % k)
            inputs.append(x.op.name)
            kernel = tf.identity(graphs.const(graphs.random(_kernel_shape(spec)), "kernel_%d" % k))
            copies = ["lin_%d" % k] + (["lin_%d_twin" % k] if spec["twin"] else [])
            for name in copies:
                y = _linear(spec, x, kernel, name)
                out = _affine_chain(spec, y, name + "_bn")
                outputs.append(tf.identity(out, name="out_" + name).op.name)
                extra = spec["extra_consumer"] and name == copies[0]
                if extra:
                    outputs.append(tf.identity(tf.nn.relu(y), name="side_" + name).op.name)
                expectations[name] = spec["bn"] != "training" and not extra
        return inputs, outputs

    graph_def, (inputs, outputs) = graphs.build(build)
    return graph_def, inputs, outputs, expectations


def kernel_value(graph_def, linear_name):
    nodes = {n.name: n for n in graph_def.node}
    # Freezing a written SavedModel inlines its function call, which prefixes the names.
    [linear] = [n for n in nodes if n == linear_name or n.endswith("/" + linear_name)]
    name = nodes[linear].input[1]
    node = nodes[name.split(":")[0]]
    while node.op == "Identity":
        node = nodes[node.input[0].split(":")[0]]
    return tf.make_ndarray(node.attr["value"].tensor)


@given(st.lists(branch_specs(), min_size=1, max_size=3))
def test_random_graphs_fold_exactly_what_is_allowed(specs):
    graph_def, inputs, outputs, expectations = build_graph(specs)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = tmp + "/src", tmp + "/out"
        save_graph_def(graph_def, inputs, outputs, src)
        before = conftest.tree_digest(src)
        report = fold_saved_model(src, out)
        assert conftest.tree_digest(src) == before, "input changed"
        assert report.verification.ok
        compare_outputs(src, out)

        folded_graph = output_graph_def(out)
        foldable = {name for name, ok in expectations.items() if ok}
        # Every batch norm fold scales the kernel (random statistics), so exactly
        # the foldable branches have a new kernel. (A bias written as AddV2 may
        # also be rewritten to BiasAdd, which is reported but keeps the kernel.)
        changed = {name for name in expectations
                   if not np.array_equal(kernel_value(folded_graph, name), kernel_value(graph_def, name))}
        assert changed == foldable
        assert {f.linear_node for f in report.signatures["serving_default"].folds} >= foldable
        # Independently of the report: nothing foldable is left after a linear op...
        left = graphs.affine_after_linear(folded_graph) + graphs.batch_norm_after_linear(folded_graph)
        assert left == []
        # ...and what must not fold did not.
        training = [n for n in folded_graph.node if n.op.startswith("FusedBatchNorm") and n.attr["is_training"].b]
        assert len(training) == sum(1 for k, s in enumerate(specs) if s["bn"] == "training"
                                    for _ in range(1 + s["twin"]))
