"""SavedModels that carry more than weights come out working (tables, assets, state, control flow).

Each output is judged from outside: saved_model_cli lists the same
SignatureDefs, and a fresh process loads both models and gets the same
outputs from every signature on valid inputs (real vocabulary words).
"""

import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

import io_models
from savedmodel_checks import compare_in_fresh_process, data_path_op_counts, signature_defs, tag_sets, \
    xla_functions_with
from tf_bnfuse import errors
from tf_bnfuse import fold_saved_model
from tf_bnfuse.report import format_run

import conftest


def _moved(src):
    """Moves the input away, so that an output still reading the input's assets fails."""
    moved = src + "_moved"
    shutil.move(src, moved)
    return moved


def _fold(builder, tmp_path, **kwargs):
    """Builds and folds a model; returns (the input, moved away after folding, output, inputs, report)."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    inputs = builder(src)
    before = conftest.tree_digest(src)
    report = fold_saved_model(src, out, **kwargs)
    assert conftest.tree_digest(src) == before, "input SavedModel was modified"
    return _moved(src), out, inputs, report


def _ops(path, key):
    """Ops of a written signature, its functions included."""
    graph_def = tf.saved_model.load(path).signatures[key].graph.as_graph_def()
    return [n.op for n in graph_def.node] + [n.op for f in graph_def.library.function for n in f.node_def]


def test_static_hash_table_from_asset(tmp_path):
    src, out, inputs, report = _fold(io_models.static_hash_table, tmp_path)
    assert os.listdir(os.path.join(out, "assets")) == ["vocabulary.txt"]
    assert signature_defs(out) == signature_defs(src)
    outputs = compare_in_fresh_process(src, out, inputs)
    ids = outputs["serving_default"][0]["ids"]
    assert set(ids.tolist()) - {0} and 0 in ids, "test words must hit the table and miss it"
    assert [f.op for f in report.signatures["serving_default"].folds] == ["AddV2"]
    assert "Mul" not in _ops(out, "serving_default")


@pytest.mark.parametrize("initializer,dtype", [("key_value", tf.int64), ("key_value", tf.int32),
                                               ("text_file", tf.int64)])
def test_integer_tables_come_through_and_serve_the_same_ids(tmp_path, initializer, dtype):
    src, out, inputs, report = _fold(lambda path: io_models.integer_table(path, initializer, dtype), tmp_path)
    assert signature_defs(out) == signature_defs(src)
    outputs = compare_in_fresh_process(src, out, inputs)
    mapped = outputs["serving_default"][0]["mapped"]
    assert set(mapped.ravel().tolist()) - {-1} and -1 in mapped, "test ids must hit the table and miss it"
    assert report.signatures["serving_default"].folds


@pytest.mark.parametrize("verify", [True, False])
def test_an_id_table_classifier_serves_the_same_ids_and_labels(tmp_path, verify):
    """Issue 26's model: int64 ids through a table, an embedding, MatMul + batch norm, and an
    int64 -> string table naming the argmax. The output must load and serve, also unverified."""
    src, out, inputs, report = _fold(io_models.table_lookup_classifier, tmp_path, verify=verify)
    assert signature_defs(out) == signature_defs(src)
    outputs = compare_in_fresh_process(src, out, inputs)
    labels = outputs["serving_default"][0]["label"]
    assert labels.dtype == object and {label.decode()[0] for label in labels.ravel()} <= {"c", "?"}
    assert [f.linear_op for f in report.signatures["serving_default"].folds] == ["MatMul"]


def test_written_variable_stays_a_variable(tmp_path):
    src, out, inputs, report = _fold(io_models.counter, tmp_path)
    # `loaded.serve`, the function the signature wraps, is kept: it runs the folded signature
    # and shares its counter. Calls run in key order: root.serve first, then the signature twice.
    outputs = compare_in_fresh_process(src, out, {"serving_default": inputs["serving_default"],
                                                  "root.serve": inputs["serving_default"][:1]})
    assert [o["calls"] for o in outputs["serving_default"]] == [2.0, 3.0]
    assert outputs["root.serve"][0]["0"] == 1.0  # its outputs flatten as calls, y
    assert report.kept_functions == ["serve"] and report.dropped_functions == {}
    assert "kept, running the folded signatures that compute them: serve" in format_run(report)
    assert report.signatures["serving_default"].folds
    assert "AssignAddVariableOp" in _ops(out, "serving_default")


def test_root_function_a_signature_wraps_is_kept_with_its_argument_order(tmp_path):
    src, out, inputs, report = _fold(io_models.two_input_functions, tmp_path)
    assert report.kept_functions == ["serve"]
    assert list(report.dropped_functions) == ["scale_only"]
    assert report.dropped_functions["scale_only"] == "scale_only(tensor): no folded signature computes it"
    assert "function scale_only of the input's root object NOT KEPT" in format_run(report)
    feeds = inputs["serving_default"][0]
    positional = {"0": feeds["z"], "1": feeds["a"]}  # serve(z, a): run_signatures passes them in key order
    outputs = compare_in_fresh_process(src, out, {"serving_default": [feeds], "root.serve": [positional]})
    # serve's outputs flatten as y, y_only
    assert outputs["root.serve"][0]["0"].shape == (2, 8, 8, 4)
    assert not hasattr(tf.saved_model.load(out), "scale_only")
    assert report.signatures["serving_default"].folds


def test_a_root_function_no_signature_calls_is_kept_only_when_it_computes_the_same(tmp_path):
    """`same_again` computes serve's outputs in a graph of its own (as tf-keras' __call__ does beside
    its serving_default): kept, by value. `doubled` takes the same input and differs: not kept."""
    src, out, inputs, report = _fold(io_models.lookalike_functions, tmp_path)
    assert report.kept_functions == ["same_again", "serve"]
    assert report.dropped_functions == {"doubled": "doubled(tensor): no folded signature computes it"}
    feeds = inputs["serving_default"]
    outputs = compare_in_fresh_process(src, out, {"serving_default": feeds, "root.same_again": feeds})
    assert sorted(outputs["root.same_again"][0]) == ["0"]
    assert not hasattr(tf.saved_model.load(out), "doubled")


@pytest.mark.quick
def test_a_kept_root_function_that_computes_otherwise_fails_the_run(tmp_path, monkeypatch):
    """The wiring of a kept root function is checked before anything is written, even unverified."""
    from tf_bnfuse.savedmodel import root_functions
    original_find = root_functions.find

    def miswired(loaded, signatures):
        aliases, dropped, pending = original_find(loaded, signatures)
        for group in aliases.values():
            for alias in group:
                alias.output_keys.reverse()  # y and y_only swapped
        return aliases, dropped, pending
    monkeypatch.setattr(root_functions, "find", miswired)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    io_models.two_input_functions(src)
    with pytest.raises(errors.VerificationError, match=r"serve\(tensor, tensor\) output 0 differs"):
        fold_saved_model(src, out)
    assert not os.path.exists(out)


def test_while_and_cond_stay_functional(tmp_path):
    src, out, inputs, report = _fold(io_models.while_and_cond, tmp_path)
    assert signature_defs(out) == signature_defs(src)
    compare_in_fresh_process(src, out, inputs)
    ops = _ops(out, "serving_default")
    assert "While" in ops or "StatelessWhile" in ops
    assert not {"Enter", "Exit", "Switch", "Merge", "NextIteration"} & set(ops), "control flow was lowered"
    # The conv + batch norm after the loop folds, and so does the one inside the loop body,
    # whose kernel and statistics are loop-invariant arguments (fold_in_functions).
    graph = report.signatures["serving_default"]
    assert [f.linear_op for f in graph.folds] == ["Conv2D", "Conv2D"] and graph.skips == []
    [inside] = [f for f in graph.folds if f.linear_node.split("/")[0] != "StatefulPartitionedCall"]
    assert "while_body" in inside.linear_node.split("/")[0]
    # Both folds are checked by themselves, the one in the body on the body's first iteration.
    checks = report.verification.folds
    assert sorted(c.node for c in checks.checks) == sorted(f.node for f in graph.folds) and checks.ok
    assert checks.not_checked == {}
    written = tf.saved_model.load(out).signatures["serving_default"].graph.as_graph_def()
    bodies = [f for f in written.library.function if "while_body" in f.signature.name]
    assert bodies and all("Conv2D" in {n.op for n in f.node_def} for f in bodies)
    assert not {"Rsqrt", "Mul"} & {n.op for f in bodies for n in f.node_def}, "the body still computes a batch norm"


def test_tf1_builder_with_asset_table_and_main_op(tmp_path):
    src = str(tmp_path / "src")
    inputs = io_models.tf1_builder(src)
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    src = _moved(src)
    # Every MetaGraph is kept, under its own tags and with its own SignatureDefs.
    assert tag_sets(out) == tag_sets(src) == ["gpu, serve", "serve"]
    for tags, by_signature in inputs.items():
        assert signature_defs(out, tags) == signature_defs(src, tags) and len(signature_defs(out, tags)) == len(
            by_signature)
        outputs = compare_in_fresh_process(src, out, by_signature, tags=tags.split(","))
        assert set(outputs["serving_default"][0]["ids"].tolist()) - {-1}
    assert report.dropped_metagraphs == [] and list(report.other_metagraphs) == ["gpu,serve"]
    gpu = report.other_metagraphs["gpu,serve"]
    assert sorted(gpu.signatures) == ["features", "serving_default"] and gpu.verification.ok
    assert [f.op for f in gpu.signatures["features"].folds] == ["FusedBatchNormV3"]
    # The second logical CPU has no initialized copy of a TF1 table: said, not hidden.
    assert list(report.verification.not_run) == ["serving_default on /device:CPU:1"]
    assert [f.op for f in report.signatures["serving_default"].folds] == ["FusedBatchNormV3"]

    # --drop_other_metagraphs keeps the --tags one alone; --signature_keys names signatures in every MetaGraph.
    dropped = str(tmp_path / "dropped")
    report = fold_saved_model(src, dropped, drop_other_metagraphs=True)
    assert report.dropped_metagraphs == ["gpu,serve"] and tag_sets(dropped) == ["serve"]
    named = str(tmp_path / "named")
    fold_saved_model(src, named, signature_keys=["serving_default"])
    assert [sorted(signature_defs(named, tags)) for tags in tag_sets(named)] == [["serving_default"]] * 2
    with pytest.raises(errors.BadInputError, match=r"MetaGraph serve\).*features.*drop_other_metagraphs=True"):
        fold_saved_model(src, str(tmp_path / "refused"), tags=["gpu", "serve"], signature_keys=["features"])
    assert not os.path.exists(tmp_path / "refused")

@pytest.mark.parametrize("read", [True, False], ids=["read", "unread"])
def test_tf1_main_op_initializing_a_local_variable(tmp_path, read):
    """The main op initializes a local variable: the output keeps it with the main op (it was an
    internal error at the write: the kept init function captured a variable the output did not
    hold), and a scale it holds folds into the conv after the batch norm."""
    src, out, inputs, report = _fold(lambda path: io_models.tf1_local_variable(path, read), tmp_path)
    assert len(report.signatures["serving_default"].folds) == (2 if read else 1) and report.verification.ok
    compare_in_fresh_process(src, out, inputs)


def test_keras3_string_lookup_embedding_conv1d_bn(tmp_path):
    src, out, inputs, report = _fold(io_models.keras3_string_lookup, tmp_path)
    assert signature_defs(out) == signature_defs(src)
    compare_in_fresh_process(src, out, inputs)
    assert len(report.signatures["serve"].folds) == 1


@pytest.mark.parametrize("layer", ["LSTM", "GRU"])
def test_keras3_recurrent_then_dense_bn(tmp_path, layer):
    src, out, inputs, report = _fold(lambda p: io_models.keras3_recurrent(p, layer), tmp_path)
    assert signature_defs(out) == signature_defs(src)
    compare_in_fresh_process(src, out, inputs)
    # The Dense + batch norm; inside the loop body, a GRU cell's MatMul + AddV2(bias) may become
    # MatMul + BiasAdd (fold_in_functions), which is not a batch norm.
    folds = report.signatures["serve"].folds
    assert [f.linear_op for f in folds if "while_body" not in f.node] == ["MatMul"]
    assert all(f.op == "AddV2" for f in folds if "while_body" in f.node)


def test_keras3_training_mode_batch_norm_stays_and_updates(tmp_path):
    src, out, inputs, report = _fold(io_models.keras3_training_batch_norm, tmp_path)
    compare_in_fresh_process(src, out, inputs)
    graph = report.signatures["serve"]
    assert len(graph.folds) == 1, "the inference-mode batch norm folds"
    # Keras 3 writes the training-mode batch norm as Mul/Add by batch moments: reported, left in place.
    assert "/inference_bn" in graph.folds[0].node, graph.folds
    assert any(s.op == "Mul" and "/training_bn" in s.node for s in graph.skips), graph.skips
    assert "Rsqrt" in _ops(out, "serve"), "the batch statistics are still computed"
    assert any(op.startswith("AssignVariableOp") or op == "AssignSubVariableOp" for op in _ops(out, "serve"))


@pytest.mark.quick
def test_skip_verify_still_refuses_a_model_that_cannot_run(tmp_path, monkeypatch):
    """A pass that breaks the graph: unverified, the output is still run, and nothing is written."""
    from tf_bnfuse import passes

    def break_graph(context, graph_def, outputs):
        """Makes the first output wait for an Assert that always fails: it imports, and cannot run."""
        broken = tf.compat.v1.GraphDef()
        broken.CopyFrom(graph_def)
        never = broken.node.add(name="never", op="Const")
        never.attr["dtype"].type = tf.bool.as_datatype_enum
        never.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(False))
        check = broken.node.add(name="always_fails", op="Assert", input=["never", "never"])
        check.attr["T"].list.type.append(tf.bool.as_datatype_enum)
        output_node = outputs[0].split(":")[0]
        next(n for n in broken.node if n.name == output_node).input.append("^always_fails")
        return broken, passes.REGISTRY["cleanup"](context, broken, outputs)[1]

    monkeypatch.setitem(passes.REGISTRY, "break_graph", break_graph)
    src = str(tmp_path / "src")
    io_models.counter(src)
    config = {"pipeline": ["break_graph"]}
    with pytest.raises(errors.VerificationError, match="cannot run"):
        fold_saved_model(src, str(tmp_path / "out"), config=config, verify=False)
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tf_bnfuse")]


PLUMBING = ("Identity", "IdentityN", "NoOp")


@pytest.mark.parametrize("builder", [io_models.keras3_one_conv_bn, io_models.keras3_string_lookup, io_models.static_hash_table,
                                     io_models.while_and_cond])
def test_no_more_plumbing_or_compute_on_the_data_path(tmp_path, builder):
    src, out, _, _ = _fold(builder, tmp_path)
    key = "serving_default"
    before, after = data_path_op_counts(src, key), data_path_op_counts(out, key)
    plumbing = lambda counts: sum(counts[op] for op in PLUMBING)  # noqa: E731
    assert plumbing(after) <= plumbing(before), (before, after)
    compute = lambda counts: sum(v for op, v in counts.items() if op not in PLUMBING + ("Placeholder",))  # noqa
    assert compute(after) <= compute(before), (before, after)


def test_keras3_grouped_conv_folds_across_its_xla_call_and_stays_compiled(tmp_path):
    src, out, inputs, report = _fold(io_models.keras3_grouped_conv_bn, tmp_path)
    [fold] = report.signatures["serve"].folds
    assert fold.linear_op == "Conv2D in StatefulPartitionedCall"
    compare_in_fresh_process(src, out, inputs)
    assert xla_functions_with(out, "Conv2D") and xla_functions_with(src, "Conv2D")
    top_level = [n.op for n in tf.saved_model.load(out).signatures["serving_default"].graph.as_graph_def().node]
    assert "Rsqrt" not in _ops(out, "serving_default") and "Mul" not in _ops(out, "serving_default"), top_level


def _custom_gradient_module(path):
    """A tf.function whose op has a tf.custom_gradient (a registered gradient in the library)."""

    @tf.custom_gradient
    def clipped_identity(x):
        return tf.identity(x), lambda dy: tf.clip_by_value(dy, -1.0, 1.0)

    class CustomGradient(tf.Module):
        def __init__(self):
            self.scale = tf.Variable([0.5, 2.0, 3.0])

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def serve(self, x):
            return {"y": clipped_identity(x) * self.scale}

    module = CustomGradient()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve},
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=True))
    return {"serving_default": [{"x": io_models.RNG.standard_normal((2, 3)).astype(np.float32)}]}


def _alternative_implementations_module(path):
    """Two tf.functions implementing one interface, as tf-keras' LSTM declares its standard and
    cuDNN versions: the graph calls one, Grappler's implementation selector may swap in the other."""
    attributes = {"api_implements": "scale_%s" % io_models.RNG.integers(1 << 30)}
    cpu = tf.function(lambda x: x * 2.0, experimental_attributes=dict(attributes, api_preferred_device="CPU"),
                      autograph=False)
    gpu = tf.function(lambda x: x + x, experimental_attributes=dict(attributes, api_preferred_device="GPU"),
                      autograph=False)

    class Alternatives(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def serve(self, x):
            gpu.get_concrete_function(x).add_to_graph()  # in the library, called by nothing (as tf-keras does)
            return {"y": cpu(x)}

    module = Alternatives()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"x": io_models.RNG.standard_normal((2, 3)).astype(np.float32)}]}


@pytest.mark.quick
@pytest.mark.parametrize("build", [io_models.static_hash_table, io_models.counter, io_models.two_input_functions,
                                   _custom_gradient_module, _alternative_implementations_module],
                         ids=lambda b: b.__name__)
def test_load_leaves_out_only_the_checkpoint_functions_and_loads_the_same_model(build, tmp_path):
    from tf_bnfuse.savedmodel import load as load_lib

    path = str(tmp_path / "model")
    inputs = build(path)
    meta_graph = load_lib.read(path).proto.meta_graphs[0]
    library = {f.signature.name for f in meta_graph.graph_def.library.function}
    left_out = library - load_lib._functions_the_object_graph_calls(meta_graph)
    assert sorted(re.sub(r"_\d+$", "", name) for name in left_out) == [
        "__inference__traced_restore", "__inference__traced_save"]

    ours, theirs = load_lib.load(load_lib.read(path), ["serve"]), tf.saved_model.load(path)
    assert sorted(ours.signatures) == sorted(theirs.signatures)
    for key, calls in inputs.items():
        for feeds in calls:  # the counter's second call sees the state its first call left
            expected = theirs.signatures[key](**{k: tf.constant(v) for k, v in feeds.items()})
            actual = ours.signatures[key](**{k: tf.constant(v) for k, v in feeds.items()})
            for output in expected:
                np.testing.assert_array_equal(actual[output].numpy(), expected[output].numpy())
    if build is io_models.two_input_functions:
        x = tf.constant(io_models.RNG.standard_normal((2, 4)).astype(np.float32))
        np.testing.assert_array_equal(ours.scale_only(x).numpy(), theirs.scale_only(x).numpy())


@pytest.mark.quick
def test_load_falls_back_to_tensorflows_own_when_the_pruned_load_fails(tmp_path, monkeypatch):
    from tf_bnfuse.savedmodel import load as load_lib

    path = str(tmp_path / "model")
    feeds = io_models.two_input_functions(path)["serving_default"][0]

    def changed_proto(meta_graph):
        raise AttributeError("a TensorFlow whose SavedModel proto changed")

    monkeypatch.setattr(load_lib, "_functions_the_object_graph_calls", changed_proto)
    loaded = load_lib.load(load_lib.read(path), ["serve"])
    assert hasattr(loaded, "scale_only")
    outputs = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in feeds.items()})
    expected = tf.saved_model.load(path).signatures["serving_default"](**{k: tf.constant(v) for k, v in feeds.items()})
    np.testing.assert_array_equal(outputs["y"].numpy(), expected["y"].numpy())
