"""Every fold checked by itself wherever it is, and a run that fails closed (issue 35).

Errors are planted in one fold at a time (tests/planted_errors.kernel_scaled: its emitted kernel
scaled): inside a While body behind a 100-class softmax, inside an If branch, in half-precision
models, in a backward fold whose chain a later forward fold cut. Each run must fail, name that
fold and write nothing; the same models without a plant pass with every fold checked. A fold
that cannot be checked fails the run unless the configuration accepts it, and a check that
breaks is an internal error. The culprit search names a body fold, and a pass.
"""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

import io_models
import keras
import model_zoo
from planted_errors import kernel_scaled
from savedmodel_checks import compare_in_fresh_process
from tf_bnfuse import config as config_lib
from tf_bnfuse import errors
from tf_bnfuse import fold_saved_model
from tf_bnfuse import passes as passes_lib
from tf_bnfuse.report import format_run
from tf_bnfuse.verify import culprit as culprit_lib
from tf_bnfuse.verify import fold_check
from tf_bnfuse.verify import fold_plan


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> the input SavedModel: io_models builders by name, else the Keras 3 model zoo's."""
    root, cache = tmp_path_factory.mktemp("everywhere"), {}

    def get(name):
        if name not in cache:
            if hasattr(io_models, name):
                cache[name] = str(root / name)
                getattr(io_models, name)(cache[name])
            else:
                cache[name], _ = model_zoo.build(keras, name, str(root))
        return cache[name]
    return get


def _config(**verify):
    config = config_lib.load_config(None)
    config["verify"].update(verify)
    return config


def _assert_every_fold_checked(report):
    folds = [f for g in report.signatures.values() if not g.same_as for f in g.folds]
    checks = report.verification.folds
    assert folds and checks.not_checked == {} and checks.ok
    assert sorted(c.node for c in checks.checks) == sorted(f.node for f in folds)
    assert "%d of %d folds checked by themselves" % (len(folds), len(folds)) in format_run(report)
    return folds


def _assert_caught(src, out, monkeypatch, linear_name_end, factor, config=None):
    """Folding src with the fold into linear_name_end's kernel scaled by `factor` fails its own
    check, naming that fold alone, and writes nothing."""
    with kernel_scaled(monkeypatch, linear_name_end, factor) as hit:
        with pytest.raises(errors.VerificationError, match="fails its own check") as raised:
            fold_saved_model(src, out, config=config)
    assert len(set(hit)) == 1, hit
    failed = raised.value.run_report.verification.folds.failures()
    # Named first; any other failed check is one whose chain a later pass cut above the plant.
    assert failed[0].linear_node.endswith(hit[0]), [c.linear_node for c in failed]
    assert all(c.linear_node.endswith(hit[0]) or c.shared for c in failed), [c.linear_node for c in failed]
    assert failed[0].node in str(raised.value) and not os.path.exists(out)
    return failed[0]


@pytest.mark.quick
def test_the_folds_of_a_loop_body_are_checked_by_themselves(built, tmp_path):
    report = fold_saved_model(built("loop_classifier"), str(tmp_path / "out"))
    folds = _assert_every_fold_checked(report)
    assert sum("while_body" in f.node for f in folds) == 2


@pytest.mark.parametrize("linear", ["while/Conv2D", "while/Conv2D_1"])
@pytest.mark.parametrize("factor", [1.01, 1.001])
def test_a_loop_body_fold_off_behind_a_softmax_is_caught_and_named(built, tmp_path, monkeypatch, linear, factor):
    failed = _assert_caught(built("loop_classifier"), str(tmp_path / "out"), monkeypatch, linear, factor)
    assert "while_body" in failed.linear_node and failed.linear_node.endswith(linear)
    assert failed.max_rel_error > 10 * failed.bound


def test_a_fold_inside_an_if_branch_is_checked_and_a_wrong_one_named(built, tmp_path, monkeypatch):
    report = fold_saved_model(built("branch_conv_bn"), str(tmp_path / "honest"))
    [fold] = _assert_every_fold_checked(report)
    assert "cond_true" in fold.node or "cond_false" in fold.node
    linear = fold.linear_node.split("/", 1)[1]
    _assert_caught(built("branch_conv_bn"), str(tmp_path / "out"), monkeypatch, linear, 1.001)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_half_precision_fold_1e_2_off_is_caught_and_named(built, tmp_path, monkeypatch, policy):
    """The honest folds pass well within their bounds; a kernel 1% off fails (float16: by its max
    rel error or its slope; bfloat16, whose own rounding is 0.4%: by its slope)."""
    src = built(policy + "_conv_bn_blocks")
    report = fold_saved_model(src, str(tmp_path / "honest"))
    folds = _assert_every_fold_checked(report)
    assert all(c.slope_bound is not None and c.excess < 0.5 for c in report.verification.folds.checks)
    failed = _assert_caught(src, str(tmp_path / "out"), monkeypatch, folds[1].linear_node, 1.01)
    assert failed.slope > failed.slope_bound


def test_a_backward_fold_whose_input_a_forward_fold_removed_is_checked(built, tmp_path, monkeypatch):
    """pool -> batch norm -> VALID conv -> batch norm: the second batch norm folds backward into
    the conv, reading the first's output, which the forward fold of the first then removes. Its
    check starts above the first batch norm instead."""
    src = built("pool_bn_conv_bn")
    report = fold_saved_model(src, str(tmp_path / "honest"))
    _assert_every_fold_checked(report)
    passes = {p.pass_name: p.folds for p in report.signatures["serve"].passes}
    [forward] = passes["fold_forward"]
    [backward] = [f for f in passes["fold_affine"] + passes["fold_batch_norm"] if f.linear_node == forward.linear_node]
    _assert_caught(src, str(tmp_path / "out"), monkeypatch, backward.linear_node, 1.001)


def test_a_fold_whose_output_a_second_fold_into_the_same_linear_op_took_is_checked_below_it(
        built, tmp_path, monkeypatch):
    """conv -> batch norm -> scale: the batch norm folds into the conv, then the scale into the
    same conv. The batch norm's check runs its chain down to the scale's output, where the conv
    now holds both (it was compared at the conv, and failed the run); a planted error is caught."""
    src = built("bn_then_scale")
    out = str(tmp_path / "honest")
    report = fold_saved_model(src, out)
    folds = _assert_every_fold_checked(report)
    assert len(folds) == 2 and len({f.linear_node for f in folds}) == 1
    [bn_check] = [c for c in report.verification.folds.checks if "FusedBatchNorm" in c.node]
    [scale_check] = [c for c in report.verification.folds.checks if c is not bn_check]
    assert bn_check.output == scale_check.output and bn_check.shared
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
    compare_in_fresh_process(src, out, {"serving_default": [{"x": x}]})
    _assert_caught(src, str(tmp_path / "out"), monkeypatch, folds[0].linear_node, 1.001)


@pytest.mark.parametrize("factor", [None, 1.01])
def test_a_fold_whose_bias_a_forward_fold_took_is_checked_where_its_bias_was(built, tmp_path, monkeypatch, factor):
    """mixed_float16: conv -> batch norm -> Cast -> 1x1 VALID conv: the batch norm folds backward,
    and its bias forward into the next conv. It is checked where its bias was added, against its
    original chain less that chain at zeros; 1% off, it is caught there."""
    src = built("mixed_float16_project_expand")
    report = fold_saved_model(src, str(tmp_path / "honest"))
    folds = _assert_every_fold_checked(report)
    [forward] = [f for p in report.signatures["serve"].passes if p.pass_name == "fold_forward" for f in p.folds]
    [taken] = [f for f in folds if f.node == forward.node and f is not forward]
    [check] = [c for c in report.verification.folds.checks
               if (c.node, c.linear_node) == (taken.node, taken.linear_node)]
    assert check.output == taken.check.unbiased and check.output != taken.check.output
    if factor:
        _assert_caught(src, str(tmp_path / "out"), monkeypatch, taken.linear_node, factor)


def test_promoted_float16_chains_read_their_inputs_cast_back_and_are_checked(built, tmp_path):
    """promote_float16 at the end of a pipeline makes the folded graph float32 where the original
    chain reads float16: the chain reads the folded tensors cast back to float16."""
    config = _config()
    config["pipeline"] = ["constant_folding", "fold_batch_norm", "fold_affine", "prune_identities",
                          "promote_float16", "cleanup"]
    report = fold_saved_model(built("mixed_float16_conv_bn"), str(tmp_path / "out"), config=config)
    _assert_every_fold_checked(report)


@pytest.mark.quick
def test_a_fold_not_checked_fails_the_run_unless_the_configuration_accepts_it(built, tmp_path, monkeypatch):
    monkeypatch.setattr(fold_plan, "CHAIN_MAX_NODES", 0)  # no chain fits: no fold can be checked
    src, out = built("conv_bn_blocks"), str(tmp_path / "out")
    with pytest.raises(errors.VerificationError, match="3 of 3 folds not checked by themselves") as raised:
        fold_saved_model(src, out)
    assert "verify.accept_unchecked_folds" in str(raised.value) and not os.path.exists(out)
    report = fold_saved_model(src, out, config=_config(accept_unchecked_folds=True))
    assert len(report.verification.folds.not_checked) == 3 and report.verification.folds.checks == []
    assert "0 of 3 folds checked by themselves" in format_run(report) and os.path.isdir(out)


@pytest.mark.quick
def test_a_check_that_breaks_is_an_internal_error(built, tmp_path, monkeypatch):
    def broken_probe(*args):
        raise tf.errors.InvalidArgumentError(None, None, "planted: the probe does not run")
    monkeypatch.setattr(fold_check, "probe", broken_probe)
    out = str(tmp_path / "out")
    with pytest.raises(errors.BnFuseError) as raised:
        fold_saved_model(built("conv_bn_blocks"), out)
    assert type(raised.value) is errors.BnFuseError and raised.value.exit_code == errors.EXIT_INTERNAL
    assert "planted: the probe does not run" in str(raised.value) and "\n" not in str(raised.value)
    assert not os.path.exists(out)


def test_the_culprit_search_names_a_loop_body_fold(built, tmp_path, monkeypatch):
    """The folds' own checks loosened out of the way, the output check fails and the search,
    freezing the model again (its body gets another name), finds the body fold."""
    config = _config(fold_rounding_multiple=1e9)
    with kernel_scaled(monkeypatch, "while/Conv2D_1", 1.05) as hit:
        with pytest.raises(errors.VerificationError) as raised:
            fold_saved_model(built("loop_classifier"), str(tmp_path / "out"), config=config)
    assert hit
    culprit = raised.value.run_report.verification.culprit
    [fold] = culprit.folds
    assert "while_body" in fold["node"] and fold["linear_node"].endswith("while/Conv2D_1")
    assert culprit.error_without < culprit.error_before


def test_the_culprit_search_names_the_pass_where_no_fold_is_to_blame(built, tmp_path, monkeypatch):
    """A pass that wrongly turns a ReLU into an ELU: leaving every fold out does not help, and
    cutting the pipeline short finds the pass."""
    real = passes_lib.REGISTRY["simplify_arithmetic"]

    def wrong_simplify_arithmetic(context, graph_def, outputs, **options):
        result, report = real(context, graph_def, outputs, **options)
        result = type(result)()
        result.CopyFrom(graph_def)
        relu = next(n for n in result.node if n.op == "Relu")
        relu.op = "Elu"
        return result, dataclasses.replace(report, note="planted")
    monkeypatch.setitem(passes_lib.REGISTRY, "simplify_arithmetic", wrong_simplify_arithmetic)
    with pytest.raises(errors.VerificationError) as raised:
        fold_saved_model(built("conv_bn_blocks"), str(tmp_path / "out"))
    culprit = raised.value.run_report.verification.culprit
    assert culprit.folds == [] and culprit.pass_name == "simplify_arithmetic"
    assert "caused by pass simplify_arithmetic" in str(raised.value)


def test_first_failing_finds_the_first_of_a_lasting_failure():
    for count in (1, 2, 9):
        for first in range(1, count + 1):
            calls = []

            def fails(k, first=first):
                calls.append(k)
                return k >= first
            assert culprit_lib.first_failing(count, fails) == (first, len(calls))
            assert len(calls) <= 2 + int(np.ceil(np.log2(count)))
    assert culprit_lib.first_failing(5, lambda k: False) == (None, 1)
