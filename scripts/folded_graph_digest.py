"""Prints a sha256 of each signature's folded graph, as fold_saved_model hands it to the writer.

    .venv/bin/python scripts/folded_graph_digest.py SAVED_MODEL_DIR

A restructuring of the run must print the same digests before and after: the GraphDef with
its stored weights put back (tf_bnfuse's own weight keys dropped), serialized deterministically.
The fold runs with verification off and writes into a temporary folder.
"""

import hashlib
import sys
import tempfile
from unittest import mock

from tf_bnfuse import api
from tf_bnfuse.graph import weights as weights_lib
from tf_bnfuse.savedmodel import write as write_lib


def digest(signature):
    graph_def = type(signature.graph_def)()
    graph_def.CopyFrom(signature.graph_def)
    for node in graph_def.node:
        if weights_lib.WEIGHT_KEY_ATTR in node.attr:
            array = signature.weights.array(node)
            node.attr["value"].tensor.tensor_content = array.tobytes()
            del node.attr[weights_lib.WEIGHT_KEY_ATTR]
    return hashlib.sha256(graph_def.SerializeToString(deterministic=True)).hexdigest()


def main(saved_model_dir):
    digests = {}
    real_write = write_lib.write

    def write(metagraphs, *args, **kwargs):
        for metagraph in metagraphs:
            for key, signature in metagraph.signatures.items():
                digests["%s %s" % (",".join(metagraph.tags), key)] = digest(signature)
        return real_write(metagraphs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as scratch, mock.patch.object(write_lib, "write", write):
        api.fold_saved_model(saved_model_dir, scratch + "/out", verify=False)
    for name, value in sorted(digests.items()):
        print(value, name)


if __name__ == "__main__":
    main(sys.argv[1])
