"""The pass registry: name -> run(context, graph_def, outputs, **options) -> (graph_def, PassReport).

A pass is a module with NAME and run(); registering it is one line here. context is
the run's PassContext (passes/context.py). The modules load on first use, so that a
config can be checked against the pass names before TensorFlow is imported.
"""

import importlib
import inspect

from tf_bnfuse import errors

_MODULES = {
    "constant_folding": "tf_bnfuse.passes.constant_folding",
    "simplify_arithmetic": "tf_bnfuse.passes.simplify_arithmetic",
    "fold_in_functions": "tf_bnfuse.passes.fold_in_functions",
    "fold_batch_norm": "tf_bnfuse.passes.fold_batch_norm",
    "fold_affine": "tf_bnfuse.passes.fold_affine",
    "fold_forward": "tf_bnfuse.passes.fold_forward",
    "lower_batch_norm": "tf_bnfuse.passes.lower_batch_norm",
    "promote_float16": "tf_bnfuse.passes.promote_float16",  # not in the default pipeline: the TFLite path uses it
    "prune_identities": "tf_bnfuse.passes.prune_identities",
    "cleanup": "tf_bnfuse.passes.cleanup",
}


class _Registry(dict):
    """A dict of run functions that imports a registered pass's module when it is first looked up.

    Tests may add entries (monkeypatch.setitem); `name in REGISTRY` and
    iteration see registered names without importing anything.
    """

    def __missing__(self, name):
        if name not in _MODULES:
            raise KeyError(name)
        run = importlib.import_module(_MODULES[name]).run
        self[name] = run
        return run

    def __contains__(self, name):
        return name in _MODULES or dict.__contains__(self, name)

    def __iter__(self):
        return iter(sorted(set(_MODULES) | set(dict.keys(self))))


REGISTRY = _Registry()


def pass_entries(pipeline):
    """Normalizes pipeline entries ("name" or {"pass": name, **options}) to (name, options)."""
    entries = []
    for entry in pipeline:
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("pass"), str):
            options = dict(entry)
            name = options.pop("pass")
        else:
            raise errors.BadInputError("pipeline entry %r is neither a pass name nor "
                                       "{\"pass\": name, ...}" % (entry,))
        if name not in REGISTRY:
            raise errors.BadInputError("unknown pass %r; known passes: %s" % (name, ", ".join(REGISTRY)))
        entries.append((name, options))
    return entries


def option_names(name):
    """The keyword options a pass's run() takes besides (context, graph_def, outputs); None for **kwargs."""
    parameters = list(inspect.signature(REGISTRY[name]).parameters.values())[3:]
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
