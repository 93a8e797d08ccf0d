"""Command line: python -m tf_bnfuse --saved_model_dir IN --output_dir OUT.

Exit codes: 0 done; 1 verification failed; 2 bad input or usage; 3 internal error.
Errors are one line on stderr; --verbosity=1 adds the traceback of an internal error.
"""

import json
import os
import sys

# Before TensorFlow loads: keep its C++ start-up chatter off the user's stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tf_bnfuse import errors  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model_dir", None, "SavedModel folder to read (never modified).")
flags.DEFINE_string("output_dir", None, "Folder for the folded SavedModel.")
flags.DEFINE_list("signature_keys", [], "Signatures to fold and keep (default: all).")
flags.DEFINE_list("tags", ["serve"], "MetaGraph tags to load and write.")
flags.DEFINE_string("config", None, "Pipeline/verification config JSON (default: configs/default.json).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
flags.DEFINE_bool("skip_verify", False, "Do not check the output against the input (not recommended).")
flags.DEFINE_string("report_json", None, "Also write the full report as JSON to this file.")
flags.DEFINE_bool("drop_other_metagraphs", False, "Allow an input whose other MetaGraphs (other tag sets) "
                  "the output will not have.")
flags.DEFINE_string("tflite_output", None, "Also convert the folded model to this .tflite file, checked "
                    "against the original's outputs.")


def _fail(message, code):
    sys.stderr.write("tf_bnfuse: error: %s\n" % " ".join(str(message).split()))
    sys.stderr.flush()
    return code


def _silence_native_stderr():
    """Sends TensorFlow's C++ log lines to /dev/null; Python's own output stays.

    TensorFlow 2.21's native logging ignores TF_CPP_MIN_LOG_LEVEL and writes
    start-up INFO lines to file descriptor 2, which would bury the one-line
    error. sys.stderr is re-pointed at a duplicate of the real stderr first.
    """
    sys.stderr.flush()
    real_stderr = os.dup(2)
    sys.stderr = os.fdopen(real_stderr, "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    # absl's handler captured the old sys.stderr object, whose fd is now /dev/null.
    logging.get_absl_handler().python_handler.stream = sys.stderr


def parse_flags(argv):
    """absl's parser, but a usage error is one line and exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(_fail(e, errors.EXIT_BAD_INPUT))


def main(argv):
    if len(argv) > 1:
        return _fail("unexpected arguments: %s" % " ".join(argv[1:]), errors.EXIT_BAD_INPUT)
    for required in ("saved_model_dir", "output_dir"):
        if not FLAGS[required].value:
            return _fail("--%s is required" % required, errors.EXIT_BAD_INPUT)
    if FLAGS["verbosity"].present:
        if FLAGS.verbosity < 1:
            _silence_native_stderr()
    else:
        logging.set_verbosity(logging.WARNING)
        _silence_native_stderr()
    try:
        import tensorflow as tf
        tf.get_logger().setLevel("ERROR")
        from tf_bnfuse import api
        from tf_bnfuse import summary
        report = api.fold_saved_model(
            FLAGS.saved_model_dir, FLAGS.output_dir, signature_keys=FLAGS.signature_keys or None,
            tags=FLAGS.tags, config=FLAGS.config, overwrite=FLAGS.overwrite,
            verify=not FLAGS.skip_verify, tflite_output=FLAGS.tflite_output,
            drop_other_metagraphs=FLAGS.drop_other_metagraphs)
    except errors.BnFuseError as e:
        return _fail(e, e.exit_code)
    except Exception as e:  # the promise is one line, never a traceback
        logging.debug("internal error", exc_info=True)
        return _fail("internal error: %s: %s (run with --verbosity=1 for details)" % (
            type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else ""),
            errors.EXIT_INTERNAL)
    print(summary.format_run(report))
    if FLAGS.skip_verify:
        sys.stderr.write("tf_bnfuse: WARNING: --skip_verify: the folded model ran on test inputs but was NOT "
                         "compared with the input\n")
    if FLAGS.report_json:
        with open(FLAGS.report_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
    return errors.EXIT_OK


def run():
    """Console-script entry point."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
