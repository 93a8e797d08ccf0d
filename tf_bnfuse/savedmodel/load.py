"""Reading the input SavedModel: saved_model.pb parsed once, its tag sets, and the loaded object."""

import dataclasses
import os
import sys

import tensorflow as tf
from google.protobuf import message
from google.protobuf import text_format

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import tf1
from tf_bnfuse.savedmodel.preflight import check_saved_model_dir


@dataclasses.dataclass
class SavedModelFile:
    """A SavedModel folder and its saved_model.pb (or .pbtxt), parsed once for the whole run.

    load() prunes proto's function library in place: read anything else off it first.
    """
    path: str
    proto: object  # a SavedModel proto

    @property
    def tag_sets(self):
        return [sorted(m.meta_info_def.tags) for m in self.proto.meta_graphs]

    def other_tag_sets(self, tags):
        """The tag sets of the MetaGraphs besides the one for `tags`, each in its stored order."""
        return [list(m.meta_info_def.tags) for m in self.proto.meta_graphs
                if sorted(m.meta_info_def.tags) != sorted(tags)]

    def stored_tags(self, tags):
        """`tags` in the order the MetaGraph for them stores them (the output keeps it)."""
        return next(tuple(m.meta_info_def.tags) for m in self.proto.meta_graphs
                    if sorted(m.meta_info_def.tags) == sorted(tags))

    def close(self):
        """Lets go of the parsed proto: nothing reads it once every MetaGraph is loaded."""
        self.proto = None

    def check_tags(self, tags):
        if tags and sorted(tags) not in self.tag_sets:
            raise errors.BadInputError("SavedModel %s has no MetaGraph with tags %s; available tag sets: %s" % (
                self.path, ",".join(tags), "; ".join(",".join(t) or "(none)" for t in self.tag_sets)))


def read(path):
    """The SavedModelFile of a folder; BadInputError if it is no SavedModel or does not parse."""
    check_saved_model_dir(path)
    pb_path = os.path.join(path, "saved_model.pb")
    proto = tf_internal.SavedModelProto()
    try:
        if os.path.isfile(pb_path):
            with open(pb_path, "rb") as f:
                proto.ParseFromString(f.read())
        else:
            with open(os.path.join(path, "saved_model.pbtxt")) as f:
                text_format.Parse(f.read(), proto)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        raise errors.BadInputError("%s: saved_model.pb is corrupt or truncated (%s)" % (path, errors.first_line(e)))
    if not proto.meta_graphs:
        raise errors.BadInputError("%s: saved_model.pb holds no MetaGraph" % path)
    return SavedModelFile(path, proto)


@dataclasses.dataclass(frozen=True)
class CheckpointKeys:
    """Where the loaded variables' values are in the input's own checkpoint: a variable the passes
    released is read again from there by a fold check (graph/weights.py)."""
    prefix: str
    by_variable: dict  # id(tf.Variable) -> checkpoint key, for as long as the loaded object lives
    # A TF1 model's: variable node name -> checkpoint key. TensorFlow's freezing turns a reference
    # variable (VariableV2) into a Const of its name, which a fold check can read back too.
    by_name: dict = dataclasses.field(default_factory=dict)

    def source(self, variable):
        """(checkpoint prefix, key) of a loaded variable, or None."""
        key = self.by_variable.get(id(variable))
        return None if key is None else (self.prefix, key)

    def sources_by_name(self):
        """{variable node name: (checkpoint prefix, key)} of a TF1 model's restored variables."""
        return {name: (self.prefix, key) for name, key in self.by_name.items()}


def load(model, tags):
    """The loaded object of a SavedModelFile's MetaGraph for `tags`, as tf.saved_model.load gives it."""
    return load_with_checkpoint_keys(model, tags)[0]


def load_with_checkpoint_keys(model, tags):
    """(load(model, tags), its variables' CheckpointKeys, or None where none is known)."""
    model.check_tags(tags)
    tf1_keys = _tf1_checkpoint_keys(model, tags)  # before the load: it may refuse the model
    try:
        try:
            loaded = _load_without_unreferenced_functions(model, tags)
        except Exception:  # pylint: disable=broad-except
            loaded = None  # TF's own load below gives the error, or the object, as the user would get it
        if loaded is not None:
            return loaded
        loaded = tf.saved_model.load(model.path, tags=list(tags) if tags else None)
    except Exception as e:  # TF raises many types here; all mean the same to the user.
        raise errors.BadInputError("cannot load SavedModel %s with tags %s: %s" % (
            model.path, ",".join(tags or []), errors.first_line(e)))
    if not tf1_keys:
        return loaded, None
    by_variable = {id(v): tf1_keys[v.name.rsplit(":", 1)[0]] for v in getattr(loaded, "variables", ())
                   if v.name.rsplit(":", 1)[0] in tf1_keys}
    return loaded, CheckpointKeys(tf_internal.checkpoint_prefix(model.path), by_variable, tf1_keys)


def _tf1_checkpoint_keys(model, tags):
    """{variable name: checkpoint key} of a TF1 MetaGraph's variables as its saver restores them
    (tf1.checkpoint_keys), {} for another MetaGraph or where none is found. BadInputError where
    its init op writes one of them: the output would keep the value written and write it again."""
    meta_graphs = [m for m in model.proto.meta_graphs if not m.HasField("object_graph_def")
                   and (sorted(m.meta_info_def.tags) == sorted(tags) if tags else len(model.proto.meta_graphs) == 1)]
    if len(meta_graphs) != 1:
        return {}
    try:
        keys = tf1.checkpoint_keys(meta_graphs[0], tf.train.load_checkpoint(tf_internal.checkpoint_prefix(model.path)))
    except (tf.errors.OpError, ValueError):  # no checkpoint to read back from: the weights stay held
        return {}
    rewritten = sorted(tf1.written_at_load(meta_graphs[0]) & set(keys))
    if rewritten:
        raise errors.BadInputError(
            "SavedModel %s: its init op (main_op or legacy_init_op) writes %s after the saver restores %s, each "
            "time the model loads; tf_bnfuse cannot keep that (the output would hold the value written and write "
            "it again)" % (model.path, ("variable " if len(rewritten) == 1 else "variables ") + ", ".join(rewritten),
                           "it" if len(rewritten) == 1 else "them"))
    return keys


def _functions_the_object_graph_calls(meta_graph):
    """Names of the library functions the object graph's concrete functions call, directly or
    through calls inside them (by op type or func attr), with every gradient function and
    every function with an api_implements attr (Grappler's implementation selector calls
    those by that attr: tf-keras' cuDNN LSTM and GRU)."""
    library = graph_lib.functions_by_name(meta_graph.graph_def)
    roots = list(meta_graph.object_graph_def.concrete_functions)
    roots += [name for name, f in library.items() if "api_implements" in f.attr]
    roots += [g.gradient_func for g in meta_graph.graph_def.library.gradient]
    roots += [g.gradient_func for g in meta_graph.graph_def.library.registered_gradients]
    return graph_lib.function_closure(library, roots)


def _load_without_unreferenced_functions(model, tags):
    """(tf.saved_model.load of a TF2 SavedModel, minus the library functions no object calls, and
    its variables' CheckpointKeys), or None.

    tf.saved_model.save writes its checkpoint's save and restore functions
    (__inference__traced_save/_restore, one op per variable) into the library,
    where only the MetaGraph's saver nodes call them; TF's loader imports every
    library function into a graph all the same, and restores the variables
    from the checkpoint without them. On Keras 3 MobileNetV2 they are most of
    the library's nodes, and a large part of its load time. Uses TF's own Loader
    on the pruned proto (what load_partial does);
    None where that does not apply (a TF1 model).
    """
    if sys.byteorder != "little":  # TF byte-swaps function constants first; left to TF's load
        return None
    proto = model.proto
    if len(proto.meta_graphs) != 1 or not proto.meta_graphs[0].HasField("object_graph_def"):
        return None
    meta_graph = proto.meta_graphs[0]
    if tags and set(tags) != set(meta_graph.meta_info_def.tags):
        return None
    called = _functions_the_object_graph_calls(meta_graph)
    library = meta_graph.graph_def.library.function
    if len(called) < len(library):
        kept = [f for f in library if f.signature.name in called]
        del library[:]
        library.extend(kept)
    root, keys = tf_internal.load_object_graph(proto, meta_graph, model.path, tf_internal.read_debug_info(model.path))
    root.tensorflow_version = meta_graph.meta_info_def.tensorflow_version
    root.tensorflow_git_version = meta_graph.meta_info_def.tensorflow_git_version
    return root, CheckpointKeys(tf_internal.checkpoint_prefix(model.path), keys)
