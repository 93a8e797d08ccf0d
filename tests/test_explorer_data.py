"""--explorer_data and export(..., explorer_data=...): Model Explorer node data for the written
.tflite model, judged by Model Explorer's own .tflite adapter (ai-edge-model-explorer, the test
extra): every key names a node of the graph the adapter makes of that file, every fold colours
the linear op it went into, and a batch norm left alone colours only its own ops."""

import json

import dacite
import pytest
from model_explorer import builtin_tflite_flatbuffer_adapter
from model_explorer import node_data_builder

import tf_bnfuse
from tf_bnfuse.phases import explorer_data

import model_zoo
from cli_checks import assert_one_line_error, run_cli

LINEAR_OPS = {"conv_2d", "depthwise_conv_2d", "transpose_conv", "fully_connected", "conv_3d"}


def _adapter_graphs(tflite_path):
    """{graph id: {key a node answers to (its id, or one of its output tensor names): node}} as Model
    Explorer's .tflite adapter draws the file."""
    converted = builtin_tflite_flatbuffer_adapter.BuiltinTfliteFlatbufferAdapter().convert(tflite_path, {})
    graphs = {}
    for collection in converted["graphCollections"]:
        for graph in collection.graphs:
            keys = graphs.setdefault(graph["id"], {})
            for node in graph["nodes"]:
                keys[node["id"]] = node
                for output in node["outputsMetadata"]:
                    keys.update((a["value"], node) for a in output["attrs"] if a["key"] == "tensor_name")
    return graphs


def _node_data(path, tflite_path):
    """{graph id: {key: (result, the adapter's node it names)}}; fails on a key that names no node,
    or on a file Model Explorer's own node-data records do not take."""
    with open(path) as f:
        data = json.load(f)
    graphs = _adapter_graphs(tflite_path)
    found = {}
    for graph_id, graph_data in data.items():
        dacite.from_dict(node_data_builder.GraphNodeData, graph_data, config=dacite.Config(check_types=False))
        assert graph_id in graphs, (graph_id, sorted(graphs))
        nodes = graphs[graph_id]
        unnamed = [key for key in graph_data["results"] if key not in nodes]
        assert unnamed == [], unnamed
        found[graph_id] = {key: (result, nodes[key]) for key, result in graph_data["results"].items()}
    return found


def _tensor_names(node):
    return [part for output in node["outputsMetadata"] for a in output["attrs"] if a["key"] == "tensor_name"
            for part in a["value"].split(";")]


def test_every_fold_of_mobilenet_v2_colours_its_linear_op_by_its_check(tmp_path):
    import keras
    model, _ = model_zoo.build_model(keras, "mobilenet_v2_small")
    folded = tf_bnfuse.fold(model)
    tflite, data = str(tmp_path / "model.tflite"), str(tmp_path / "folds.json")
    report = tf_bnfuse.export(folded, tflite, explorer_data=data)
    [results] = _node_data(data, tflite).values()
    folds = [r for r in results.values() if r[0]["value"] >= 0]
    checks = report.verification.folds.checks
    assert len(folds) == len(checks) == len(report.signatures["serve"].folds), (len(folds), len(checks))
    assert sorted(r["value"] for r, _ in folds) == pytest.approx(sorted(c.excess for c in checks))
    assert {node["label"] for _, node in folds} <= LINEAR_OPS
    assert all(0 <= r["value"] <= 1 for r, _ in folds)
    assert report.tflite.explorer_data.drawn == len(checks) and report.tflite.explorer_data.not_drawn == 0


def test_a_training_mode_batch_norm_is_coloured_as_such_and_only_its_own_ops(tmp_path):
    import keras
    model, _ = model_zoo.build_model(keras, "bn_training")
    tflite, data = str(tmp_path / "model.tflite"), str(tmp_path / "folds.json")
    report = tf_bnfuse.export(model, tflite, explorer_data=data)
    [entry] = report.signatures["serve"].left_alone
    [results] = _node_data(data, tflite).values()
    training = dict(explorer_data.LEFT_ALONE_COLOURS)[explorer_data.left_alone.TRAINING_MODE]
    coloured = [node for result, node in results.values() if result.get("bgColor") == training]
    assert coloured, results
    for node in coloured:  # every tensor name of a coloured op is one of the batch norm's own ops
        assert all(name.startswith(entry.name.split("/", 1)[-1]) or name.startswith(entry.name)
                   for name in _tensor_names(node)), _tensor_names(node)
    [fold] = [node for result, node in results.values() if "bgColor" not in result]
    assert fold["label"] == "conv_2d"


def test_the_cli_writes_node_data_beside_the_tflite_model(example_model, tmp_path):
    tflite, data = str(tmp_path / "model.tflite"), str(tmp_path / "folds.json")
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "out"),
                     "--tflite_output", tflite, "--explorer_data", data, "--quiet")
    assert result.returncode == 0, result.stderr
    [results] = _node_data(data, tflite).values()
    # serving_default's three folds, and the batch norm whose conv output has two consumers
    consumers = dict(explorer_data.LEFT_ALONE_COLOURS)["consumers"]
    assert sorted(node["label"] for r, node in results.values() if r["value"] >= 0) == \
        ["conv_2d", "depthwise_conv_2d", "transpose_conv"]
    assert any(r.get("bgColor") == consumers for r, _ in results.values())
    assert "--node_data_paths=%s" % data in result.stdout


@pytest.mark.quick
def test_explorer_data_without_a_tflite_model_is_refused_up_front(example_model, tmp_path):
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "out"),
                     "--explorer_data", str(tmp_path / "folds.json"))
    assert_one_line_error(result, 2, "--explorer_data needs --tflite_output")
    assert not (tmp_path / "out").exists()


@pytest.mark.quick
def test_export_refuses_explorer_data_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match="explorer_data is for format=\"litert\""):
        tf_bnfuse.export(object(), str(tmp_path / "saved_model"), explorer_data=str(tmp_path / "folds.json"))
    path = str(tmp_path / "model.tflite")
    with pytest.raises(ValueError, match="the .tflite model's own path"):
        tf_bnfuse.export(object(), path, explorer_data=path)
