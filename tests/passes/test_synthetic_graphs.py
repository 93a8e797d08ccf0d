"""The benchmark's synthetic graphs: every block folds and the folded graph computes the same.

The benchmark times the passes on these graphs up to 100k nodes; its figures
only mean something if every batch norm in them really folds.
"""

import numpy as np

import graphs
import synthetic_graphs  # benchmarks/, on the path from conftest
import pytest
from tf_bnfuse import fold_graph_def

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


def test_every_block_of_a_synthetic_chain_folds_and_outputs_match():
    graph_def, outputs, blocks = synthetic_graphs.chain_graph(300)
    assert blocks >= 20 and len(graph_def.node) >= 300
    folded, report = fold_graph_def(graph_def, outputs)
    assert len(report.folds) == blocks
    assert not [n for n in folded.node if n.op.startswith("FusedBatchNorm") or n.op in ("Mul", "Rsqrt")]
    feeds = {"input": graphs.random((1, 8, 8, synthetic_graphs.CHANNELS))}
    expected, = graphs.run(graph_def, feeds, outputs)
    actual, = graphs.run(folded, feeds, outputs)
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-4 * scale


def test_the_benchmark_prints_its_speed_targets_from_its_own_figures():
    import run_benchmark  # benchmarks/, on the path above
    results = {"models": [{"model": "keras3_ResNet50", "tf_bnfuse": {"passes_share": 0.034},
                           "round_trip_wall_ratio": 0.874, "round_trip_rss_ratio": 1.004},
                          {"model": "keras3_MobileNetV2", "tf_bnfuse": {"passes_share": 0.5},
                           "round_trip_wall_ratio": 0.7, "round_trip_rss_ratio": 0.98}],
               "pass_scaling": [{"nodes": 1000, "us_per_node": 80.0}, {"nodes": 100000, "us_per_node": 116.0}]}
    lines = run_benchmark.targets(results)
    assert lines == ["keras3_ResNet50: 0.87 times the round trip's wall, 1.00 its peak RSS (target: at most 1.0 each)",
                     "keras3_MobileNetV2: 0.70 times the round trip's wall, 0.98 its peak RSS (target: at most 1.0 each)",
                     "keras3_ResNet50: passes 3.4% of the whole CLI (target: under 2%)",
                     "per-node pass time at 100000 nodes / at 1000: 1.45x (target: within 1.5x)"]
