"""The folded model as a Python object: what tf_bnfuse.fold returns and the writer saves."""

import tensorflow as tf

from tf_bnfuse.graph import tf_internal


def keyword_input_specs(function):
    """{input name: TensorSpec} of a signature function: a loaded or traced one's keyword inputs,
    or the positional ones (named) of a function _signature_function wrapped."""
    args, kwargs = function.structured_input_signature
    return dict(kwargs) if kwargs else {spec.name: spec for spec in args}


class FoldedModel(tf.Module):
    """The folded model as an object: what tf_bnfuse.fold returns, and what the output SavedModel
    is written from. It owns the weights its signature functions read (`weights`), keeps the
    input's tables and written variables (`kept_resources`) and the root functions the output
    keeps, under their own names. `signatures`: {key: ConcreteFunction}, like a loaded
    SavedModel's; calling the object calls its serving_default signature (a dict of outputs, or
    one tensor where the Keras model or tf.function it came from returns one: attach_run).
    `report`: the RunReport of the run that made it (None until that run sets it)."""

    def __init__(self, signatures):
        super().__init__(name="tf_bnfuse_folded")
        # Not tracked: tf.saved_model.save takes signatures as its argument, and a tracked
        # attribute named "signatures" is reserved for the loaded objects' signature map.
        self.__dict__["_signature_functions"] = dict(signatures)
        self.__dict__["report"] = None
        self.__dict__["_returns_tensor"] = False
        self.__dict__["_input_order"] = {}

    @property
    def signatures(self):
        return dict(self._signature_functions)

    @property
    def in_memory_run(self):
        """What tf_bnfuse.export needs of the fold that made this object (None for a written one)."""
        return self.__dict__.get("_in_memory_run")

    def attach_run(self, report, run, returns_tensor, input_order=None):
        """Records the in-memory run that made this object; returns_tensor: calling it returns its
        serving signature's one output as a tensor, as the object it was folded from does;
        input_order: {signature key: its input names in the order the folded object took them
        by position} (a Keras model's own input order)."""
        self.__dict__["report"] = report
        self.__dict__["_in_memory_run"] = run
        self.__dict__["_returns_tensor"] = returns_tensor
        self.__dict__["_input_order"] = dict(input_order or {})
        if len(self._signature_functions) == 1 or "serving_default" in self._signature_functions:
            # tf.saved_model.save(this, path) with no signatures= then writes this one
            tf_internal.set_default_save_signature(self, self.signatures.get("serving_default") or
                                                   next(iter(self._signature_functions.values())))

    def __call__(self, *args, **kwargs):
        if len(self._signature_functions) == 1:
            [(key, function)] = self._signature_functions.items()
        elif "serving_default" in self._signature_functions:
            key, function = "serving_default", self._signature_functions["serving_default"]
        else:
            raise TypeError("this folded model has no serving_default signature: call one of .signatures "
                            "(%s)" % ", ".join(sorted(self._signature_functions)))
        # By position, in the order the folded object took its inputs (a SavedModel's keyword
        # inputs have none: more than one of them is taken by name only).
        names = self._input_order.get(key) or sorted(keyword_input_specs(function))
        if len(args) == 1 and isinstance(args[0], dict):
            kwargs = dict(args[0], **kwargs)
        elif args and len(names) > 1 and key not in self._input_order:
            raise TypeError("the folded model's inputs (%s) have no order of their own: call it with a dict "
                            "of them by name" % ", ".join(names))
        elif len(args) == 1 and isinstance(args[0], (list, tuple)) and len(names) > 1:
            kwargs = dict(zip(names, args[0]), **kwargs)  # a list of inputs, as a Keras model takes it
        elif args:
            if len(args) > len(names):
                raise TypeError("the folded model takes %d inputs (%s), got %d positional arguments" % (
                    len(names), ", ".join(names), len(args)))
            kwargs = dict(zip(names, args), **kwargs)
        outputs = function(**{k: tf.convert_to_tensor(v) for k, v in kwargs.items()})
        return next(iter(outputs.values())) if self._returns_tensor else outputs
