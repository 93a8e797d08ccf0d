"""Checks on SavedModels that the model tests share, independent of tf_bnfuse."""

import atexit
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import convert_to_constants

import graphs
from graphs import assert_same_outputs  # noqa: F401  (the one rule, re-exported)

PLUMBING = {"Const", "Identity", "NoOp", "Placeholder", "StatefulPartitionedCall", "PartitionedCall",
            "ReadVariableOp", "VarHandleOp"}


def serving_graph_def(path, key="serving_default"):
    return tf.saved_model.load(path).signatures[key].graph.as_graph_def()


def data_path_ops(path):
    """Ops the serving signature runs, its functions included, minus plumbing."""
    graph_def = serving_graph_def(path)
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return [n.op for n in nodes if n.op not in PLUMBING]


def output_graph_def(path, key="serving_default"):
    """A folded SavedModel's serving graph, frozen by TensorFlow into one flat GraphDef.

    tf_bnfuse writes weights as variables, so the graph's constants are read
    back through TensorFlow's own freezing, not through tf_bnfuse's.
    """
    loaded = tf.saved_model.load(path)  # kept alive while freezing reads its variables
    graph_def = convert_to_constants.convert_variables_to_constants_v2(
        loaded.signatures[key]).graph.as_graph_def()
    assert all(n.op not in ("Conv2D", "MatMul") for f in graph_def.library.function for n in f.node_def)
    return graph_def


def batch_norm_like_left(path):
    """FusedBatchNorm ops, and Mul/Add by a constant right after a linear op, in a folded model."""
    graph_def = output_graph_def(path)
    fused = [n.name for n in graph_def.node if n.op.startswith("FusedBatchNorm")]
    return fused + graphs.affine_after_linear(graph_def)


def compare_outputs(original, folded, rtol=1e-4, batch=2, seed=11):
    """Runs both serving signatures on the same random input; max error within rtol of the output scale."""
    o = tf.saved_model.load(original).signatures["serving_default"]
    f = tf.saved_model.load(folded).signatures["serving_default"]
    inputs = {}
    rng = np.random.default_rng(seed)
    for key, spec in o.structured_input_signature[1].items():
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        inputs[key] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
    expected, actual = o(**inputs), f(**inputs)
    assert_same_outputs({k: v.numpy() for k, v in expected.items()}, {k: v.numpy() for k, v in actual.items()},
                        rtol)


HERE = os.path.dirname(os.path.abspath(__file__))


def run_in_fresh_process(calls, grappler=True):
    """[(path, tags, signature key, inputs)] -> [outputs], each call run in order in a new Python process
    (grappler=False: with TensorFlow's graph optimizer off, each graph computed as written)."""
    env = dict(os.environ)
    if not grappler:
        env["TF_BNFUSE_TEST_GRAPPLER_OFF"] = "1"
    with tempfile.TemporaryDirectory() as scratch:
        calls_path, results_path = os.path.join(scratch, "calls.pkl"), os.path.join(scratch, "results.pkl")
        with open(calls_path, "wb") as f:
            pickle.dump(calls, f)
        result = subprocess.run([sys.executable, os.path.join(HERE, "run_signatures.py"), calls_path,
                                 results_path], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(results_path, "rb") as f:
            return pickle.load(f)


def compare_in_fresh_process(original, folded, inputs_by_signature, tags=None, rtol=1e-4):
    """Loads both SavedModels in a fresh process, makes each signature's calls on both, in order.

    inputs_by_signature: {key: [inputs, ...]}; a stateful signature's later
    calls see its earlier ones. Every signature of `original` must be listed;
    a key "root.NAME" calls the root object's function NAME (run_signatures.py).
    Returns the folded model's outputs {key: [outputs, ...]}.
    """
    signatures = [k for k in inputs_by_signature if not k.startswith("root.")]
    assert sorted(signatures) == signature_keys(original, tags)
    calls = [(path, tags, key, inputs) for path in (original, folded)
             for key in sorted(inputs_by_signature) for inputs in inputs_by_signature[key]]
    results = run_in_fresh_process(calls)
    half = len(results) // 2
    for expected, actual in zip(results[:half], results[half:]):
        assert_same_outputs(expected, actual, rtol)
    keyed = [(key, i) for key in sorted(inputs_by_signature) for i in range(len(inputs_by_signature[key]))]
    out = {}
    for (key, _), outputs in zip(keyed, results[half:]):
        out.setdefault(key, []).append(outputs)
    return out


def _metagraph(path, tags=None):
    """The MetaGraphDef with `tags` (None: the only one, or "serve"), read from saved_model.pb:
    loading the model only to read its SignatureDefs takes seconds."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    metagraphs = list(proto.meta_graphs)
    if tags is not None or len(metagraphs) > 1:
        metagraphs = [m for m in metagraphs if sorted(m.meta_info_def.tags) == sorted(tags or ["serve"])]
    [metagraph] = metagraphs
    return metagraph


def signature_keys(path, tags=None):
    """The sorted keys of the SignatureDefs a server sees in the MetaGraph with `tags`."""
    # __saved_model_init_op is how a TF2 SavedModel runs its initializers, not a signature to serve.
    return sorted(k for k in _metagraph(path, tags).signature_def if not k.startswith("__"))


def signature_input_names(path, key="serving_default", tags=None):
    """The sorted input names of a SignatureDef, as a server is called with them."""
    return sorted(_metagraph(path, tags).signature_def[key].inputs)


_SHOWN = {}  # (folder, saved_model.pb's inode, size and mtime) -> what `saved_model_cli show --all` printed
_TAG_SET = r"^MetaGraphDef with tag-set: '([^']*)' contains the following SignatureDefs:$"


# `saved_model_cli show --all` as the tool prints it, for one folder a line of JSON in and out.
# Private (saved_model_cli._show_all): the tool's one API is its command line, whose process
# imports TensorFlow (4-5 s a folder, twice a test); this process does that once a session.
# Apart from the tests' process: the tool's module defines absl flags the tf_bnfuse CLI defines too.
_SHOW_ALL_SERVER = """
import contextlib, io, json, sys, traceback
from tensorflow.python.tools import saved_model_cli
for line in sys.stdin:
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            saved_model_cli._show_all(json.loads(line))
        answer = {"printed": printed.getvalue()}
    except Exception:
        answer = {"error": traceback.format_exc()}
    sys.stdout.write(json.dumps(answer) + "\\n")
    sys.stdout.flush()
"""
_SHOW_ALL_PROCESS = []


def _show_all(path):
    """What `saved_model_cli show --all` prints of a SavedModel, once per folder as it is on disk
    (its set of ops in an order hashing decides)."""
    stat = os.stat(os.path.join(path, "saved_model.pb"))
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _SHOWN:
        if not _SHOW_ALL_PROCESS:
            _SHOW_ALL_PROCESS.append(subprocess.Popen([sys.executable, "-c", _SHOW_ALL_SERVER], stdin=subprocess.PIPE,
                                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
            atexit.register(_end_show_all_process)
        process = _SHOW_ALL_PROCESS[0]
        process.stdin.write(json.dumps(path) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        assert line, "saved_model_cli's process ended (exit code %s)" % process.poll()
        answer = json.loads(line)
        assert "error" not in answer, answer.get("error")
        _SHOWN[key] = answer["printed"]
    return _SHOWN[key]


def _end_show_all_process():
    """Ends the tool's process as it ends by itself (its input closed), and waits for it."""
    process = _SHOW_ALL_PROCESS.pop()
    process.stdin.close()
    process.wait(timeout=60)
    process.stdout.close()


def tag_sets(path):
    """The tag sets `saved_model_cli show` lists, sorted ("gpu, serve" is its spelling; `show --all`
    gives each in its stored order)."""
    return sorted(", ".join(sorted(tags.split(", "))) for tags in re.findall(_TAG_SET, _show_all(path), re.MULTILINE))


def signature_defs(path, tag_set="serve"):
    """What `saved_model_cli show --all` says of each SignatureDef of the MetaGraph with tag_set,
    minus graph tensor names.

    The tensor names are the graph's own; keys, dtypes, shapes and method
    names are the SignatureDef a server sees.
    """
    sections = re.split(_TAG_SET, _show_all(path), flags=re.MULTILINE)
    wanted = set(tag_set.replace(" ", "").split(","))
    [section] = [body for tags, body in zip(sections[1::2], sections[2::2]) if set(tags.split(", ")) == wanted]
    blocks = re.findall(r"signature_def\['([^']+)'\]:\n(.*?Method name is: \S*)", section, re.DOTALL)
    # __saved_model_init_op is how a TF2 SavedModel runs its initializers, not a signature to serve.
    return {key: re.sub(r"\n\s*name: \S+", "", body) for key, body in blocks if not key.startswith("__")}


def data_path_op_counts(path, key="serving_default", tags=None):
    """{op: count} of the nodes on a path from a signature input to an output, after TF's own
    freezing (which inlines every call). The plumbing a user's runtime will execute."""
    import collections
    loaded = tf.saved_model.load(path, tags=tags)
    frozen = convert_to_constants.convert_variables_to_constants_v2(loaded.signatures[key])
    graph_def = frozen.graph.as_graph_def()
    nodes = {n.name: n for n in graph_def.node}
    consumers = collections.defaultdict(list)
    for node in graph_def.node:
        for i in node.input:
            consumers[i.lstrip("^").split(":")[0]].append(node.name)

    def reach(start, step):
        seen, stack = set(), list(start)
        while stack:
            name = stack.pop()
            if name not in seen and name in nodes:
                seen.add(name)
                stack.extend(step(name))
        return seen

    forward = reach([n.name for n in graph_def.node if n.op == "Placeholder"], lambda n: consumers[n])
    backward = reach([t.op.name for t in frozen.outputs],
                     lambda n: [i.lstrip("^").split(":")[0] for i in nodes[n].input])
    return collections.Counter(nodes[n].op for n in forward & backward)


def xla_functions_with(path, op, key="serving_default"):
    """Names of the functions of a signature marked _XlaMustCompile that hold an `op` node."""
    graph_def = tf.saved_model.load(path).signatures[key].graph.as_graph_def()
    return [f.signature.name for f in graph_def.library.function
            if f.attr["_XlaMustCompile"].b and any(n.op == op for n in f.node_def)]


def save_graph_def(graph_def, inputs, outputs, path):
    """Writes a GraphDef as a TF1 SavedModel (Builder) with one serving_default signature."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def(
                {n: graph.get_tensor_by_name(n + ":0") for n in inputs},
                {n: graph.get_tensor_by_name(n + ":0") for n in outputs})
            builder = tf.compat.v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
            builder.save()
