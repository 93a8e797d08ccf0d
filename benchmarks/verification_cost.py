"""What verification costs, side by side with an earlier tree: the benchmark's models, each folded
by the CLI of both trees in turn, in fresh processes.

    .venv/bin/python benchmarks/verification_cost.py --baseline 16eb6a8 [--rounds 2]

The baseline is checked out with `git worktree` into build/bench/baseline_<rev> and run from
there with this venv (PYTHONPATH puts its package first). Verification's share of a run is the
phases that exist only to check: the original's reference outputs (with this tree, also the
values each fold is checked at), each fold's own check, and the verification of the written
model. Prints a markdown table of medians and the ratio new / baseline.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import run_benchmark  # noqa: E402

VERIFICATION_PHASES = ("reference", "check", "verify")  # "reference outputs", "check folds", "verify"


def baseline_tree(rev):
    path = os.path.join(ROOT, "build", "bench", "baseline_%s" % rev)
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, rev], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run(tree, model, out, report):
    """(wall, verification seconds, peak RSS MB) of the CLI of `tree` on one model. Run from the
    tree: `python -m` puts the working folder first on sys.path, before PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=tree)
    wall, rss, _ = run_benchmark.measured_run_rss(
        [sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", model, "--output_dir", out, "--overwrite",
         "--report_json", report], env=env, cwd=tree)
    with open(report) as f:
        phases = json.load(f)["phases"]
    # This tree checks folds (a run that did not was not this tree's).
    assert tree != ROOT or any(p["name"].startswith("check folds") for p in phases), (tree, phases)
    verification = sum(p["seconds"] for p in phases if p["name"].split(" ")[0] in VERIFICATION_PHASES)
    return wall, verification, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=run_benchmark.MODELS)
    parser.add_argument("--flavours", nargs="+", default=run_benchmark.FLAVOURS)
    parser.add_argument("--input_size", type=int, default=224)
    args = parser.parse_args()
    work = os.path.join(ROOT, "build", "bench")
    models_dir = os.path.join(work, "models" if args.input_size == 224 else "models_%d" % args.input_size)
    run_benchmark.build_models(models_dir, args.flavours, args.models, args.input_size)
    trees = {"baseline": baseline_tree(args.baseline), "this tree": ROOT}
    print("| model | verification, %s | verification, this tree | ratio | run wall, %s | run wall, this tree "
          "| peak RSS, %s | peak RSS, this tree |" % (args.baseline, args.baseline, args.baseline))
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for flavour in args.flavours:
        for model in args.models:
            path = os.path.join(models_dir, "%s_%s" % (flavour, model))
            measured = {name: [] for name in trees}
            for _ in range(args.rounds):  # in turn, so that a busy moment hits both
                for name, tree in trees.items():
                    measured[name].append(run(tree, path, os.path.join(work, "verification_cost_out"),
                                              os.path.join(work, "verification_cost.json")))
            base = statistics.median(v for _, v, _ in measured["baseline"])
            new = statistics.median(v for _, v, _ in measured["this tree"])
            ratios.append(new / base)
            print("| %s %s | %.2f s | %.2f s | %.2f | %.1f s | %.1f s | %.0f MB | %.0f MB |" % (
                flavour, model, base, new, new / base, statistics.median(w for w, _, _ in measured["baseline"]),
                statistics.median(w for w, _, _ in measured["this tree"]),
                statistics.median(r for _, _, r in measured["baseline"]),
                statistics.median(r for _, _, r in measured["this tree"])), flush=True)
    print("\nlargest ratio: %.2f" % max(ratios))


if __name__ == "__main__":
    main()
