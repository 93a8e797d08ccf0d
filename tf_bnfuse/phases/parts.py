"""The named parts of a run: what the caller asked for, and what each phase makes.

Each phase function takes the parts it reads and returns the part it makes; api.fold_saved_model
is the sequence of those calls. A part is made by one phase and only read after that: every
part is a frozen dataclass, and a later phase that needs one changed makes a new one
(dataclasses.replace). The RunReport a FoldedMetaGraph carries is the run's record, which
each phase adds to.
"""

import dataclasses
from typing import Callable, Dict, Optional

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.savedmodel import freeze as freeze_lib
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import resources


@dataclasses.dataclass(frozen=True)
class TfliteOptions:
    """--tflite_output and what goes with it (preflight.check_tflite_options)."""
    output: str
    quantize: str = "none"
    io: str = "float"
    calibration_inputs: Optional[str] = None
    max_error: Optional[float] = None
    explorer_data: Optional[str] = None  # Model Explorer node data for the .tflite model, written beside it


@dataclasses.dataclass(frozen=True)
class Options:
    """What the caller asked for, checked before anything loads."""
    saved_model_dir: str
    output_dir: str
    signature_keys: Optional[list]
    config: dict
    verify: bool
    verify_inputs: object  # None, a .npz path, or (the Python API) a dict of arrays or one array
    tflite: Optional[TfliteOptions]  # None without --tflite_output

    @property
    def verify_config(self):
        return self.config.get("verify", {})


@dataclasses.dataclass(frozen=True)
class MetaGraph:
    """One MetaGraph of the input that the output keeps."""
    tags: tuple
    label: Optional[str]  # its tag set ("gpu,serve") for the input's other MetaGraphs; None for the --tags one
    # Whether the passes may shrink the original's folded kernels (WeightStore.releases): not in
    # the MetaGraph the TFLite phase converts, which calls the original after the passes.
    releases: bool


@dataclasses.dataclass(frozen=True)
class Progress:
    """The phase timeline and the caller's checkpoint, called at each phase boundary."""
    timeline: report_lib.Timeline
    checkpoint: Callable[[str], None]
    label: Optional[str] = None  # the MetaGraph whose phases these are, when not the --tags one

    def phase(self, name):
        if self.label:
            name = "%s [%s]" % (name, self.label)
        self.checkpoint(name)
        return self.timeline.phase(name)

    def of(self, metagraph):
        return Progress(self.timeline, self.checkpoint, metagraph.label)


@dataclasses.dataclass(frozen=True)
class LoadedSignatures:
    """The load phase's: the input's loaded object and the signatures to fold."""
    loaded: object  # what tf.saved_model.load gives
    functions: dict  # signature key -> ConcreteFunction
    aliases: dict  # root function name -> [RootAlias] a signature wraps (root_functions.find)
    dropped_functions: dict  # root function name -> why (part of) it is not kept
    pending_traces: dict  # root function name -> [ConcreteFunction] to match by value
    vocabulary: list  # the words of the model's own vocabulary, for string test inputs
    input_specs: dict  # signature -> {input: TensorSpecInfo}
    given: dict  # signature -> {input: array} from --verify_inputs
    checkpoint: object = None  # load.CheckpointKeys of the loaded variables, None for a live object


@dataclasses.dataclass(frozen=True)
class Signatures:
    """What the freeze phase learns of the signatures, besides their frozen graphs (which the
    passes take over)."""
    same_as: Dict[str, str]  # signature -> the same function's first signature, frozen and folded once
    state: list  # the variables the signatures write; the output saves them from the original
    bounds: dict  # signature -> {input: IndexBound}
    shapes: dict  # signature -> {input of unknown rank: shape}
    output_specs: dict  # signature -> {output: TensorSpecInfo}, in the input's order

    def first(self, key):
        return self.same_as.get(key, key)


@dataclasses.dataclass(frozen=True)
class TestInputs:
    """The test-inputs phase's: what every signature runs on, and how it was chosen."""
    arrays: Dict[str, dict]  # signature -> {input: array}
    input_specs: dict
    bounds: dict
    shapes: dict
    given: dict
    vocabulary: list


@dataclasses.dataclass(frozen=True)
class RootFunctions:
    """The root object's functions the output keeps, once those matched by value are known."""
    aliases: Dict[str, list]  # name -> [RootAlias]
    dropped: Dict[str, str]  # name -> why (part of) it is not kept

    @property
    def kept(self):
        return sorted(self.aliases)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference phase's: the original's outputs on the test inputs, before the passes."""
    expected: object  # compare.Expected
    expected_roots: dict  # root_functions.expected_outputs
    # first signature of each function -> its frozen GraphDef as before the passes, each fold's
    # original chain computed from it (prepare.keep_original, verify/fold_check.py)
    originals: dict


@dataclasses.dataclass(frozen=True)
class FoldedSignatures:
    """The passes' result: every signature's folded graph (signatures of one function share it)."""
    signatures: Dict[str, freeze_lib.FrozenSignature]
    precisions: dict  # signature -> {output: half precision computing it}
    reports: Dict[str, report_lib.GraphReport]  # in the input's order


@dataclasses.dataclass(frozen=True)
class FoldedMetaGraph:
    """What the write, the verification and the TFLite phase read of one MetaGraph."""
    metagraph: MetaGraph
    loaded: Optional[LoadedSignatures]  # None once written in a releasing run: the original is let go
    signatures: Signatures
    test_inputs: TestInputs
    roots: RootFunctions
    reference: Optional[Reference]  # None without verification
    folded: Optional[Dict[str, freeze_lib.FrozenSignature]]  # None once written in a releasing run
    precisions: dict  # signature -> {output: half precision computing it}
    initializers: list  # a TF1 model's main op and table initializers (tf1.initializers_to_keep)
    original: "OriginalAgain"
    report: report_lib.RunReport  # this MetaGraph's


class OriginalAgain:
    """(loaded, signature functions) of the input, for what runs it after the passes (a check as
    written, the culprit search): the run's own load, or, where the passes may have released
    folded kernels of it, the input loaded again, once."""

    def __init__(self, options, metagraph, loaded):
        self._options, self._metagraph = options, metagraph
        self._loaded = None if metagraph.releases else (loaded.loaded, loaded.functions)

    def get(self):
        if self._loaded is None:
            loaded = load_lib.load(load_lib.read(self._options.saved_model_dir), self._metagraph.tags)
            functions = freeze_lib.select_signatures(loaded, self._options.signature_keys,
                                                     self._options.saved_model_dir, self._metagraph.label)
            self._loaded = (loaded, functions)
        return self._loaded

    def frozen(self, key):
        """Signature key of the input frozen again, its weights the loaded input's variables."""
        loaded, functions = self.get()
        return freeze_lib.freeze(key, functions[key], resources.resource_owners(loaded), graph_lib.WeightStore(),
                                 freeze_lib.written_handles(functions.values()))

