"""Command line: python -m tf_bnfuse --saved_model_dir IN --output_dir OUT.

Exit codes: 0 done; 1 verification failed; 2 bad input or usage; 3 internal
error; 130 interrupted (Ctrl-C). Errors are one line on stderr; progress goes
to stderr too (--quiet silences it); --verbosity=1 adds TensorFlow's own log
lines and the traceback of an internal error.
"""

import atexit
import contextlib
import ctypes
import json
import logging as std_logging
import os
import platform
import signal
import sys
import time

# Before TensorFlow loads: keep its C++ start-up chatter off the user's stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import tf_bnfuse  # noqa: E402
from tf_bnfuse import config as config_lib  # noqa: E402
from tf_bnfuse import errors  # noqa: E402
from tf_bnfuse import report as report_lib  # noqa: E402
from tf_bnfuse.savedmodel import preflight  # noqa: E402

EXIT_INTERRUPTED = 130
_log = std_logging.getLogger(__name__)
FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model_dir", None, "SavedModel folder to read (never modified).")
flags.DEFINE_string("output_dir", None, "Folder for the folded SavedModel.")
flags.DEFINE_list("signature_keys", [], "Signatures to fold and keep (default: all).")
flags.DEFINE_list("tags", ["serve"], "The MetaGraph that --signature_keys names and --tflite_output converts; "
                  "the others are kept too.")
flags.DEFINE_string("config", None, "Pipeline/verification config JSON (default: configs/default.json).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir (and an existing --tflite_output).")
flags.DEFINE_bool("skip_verify", False, "Do not compare the output with the input; it is still loaded and "
                  "run once (not recommended).")
flags.DEFINE_string("verify_inputs", None, "Verify on these inputs: a .npz with one array per signature input, "
                    "named INPUT (every signature) or SIGNATURE/INPUT.")
flags.DEFINE_string("report_json", None, "Also write a JSON report to this file, on every exit.")
flags.DEFINE_string("tflite_output", None, "Also convert the folded model to this .tflite file, checked "
                    "against the original's outputs.")
flags.DEFINE_bool("drop_other_metagraphs", False, "Write only the --tags MetaGraph; by default every MetaGraph "
                  "of the input is folded and kept under its own tags.")
flags.DEFINE_enum("tflite_quantize", "none", list(preflight.QUANTIZE_MODES), "With --tflite_output: quantize "
                  "the .tflite model (int8: full-integer), measured against the original and the converter alone.")
flags.DEFINE_enum("tflite_io", "float", list(preflight.TFLITE_IO), "With --tflite_quantize int8: the model's input "
                  "and output type.")
flags.DEFINE_string("calibration_inputs", None, "With --tflite_quantize int8: a .npz of calibration samples along "
                    "axis 0, named like --verify_inputs (default: seeded random inputs, not representative).")
flags.DEFINE_float("tflite_max_error", None, "With --tflite_quantize: fail (exit 1, nothing written) when an output's "
                   "relative L2 error against the original is above this.")
flags.DEFINE_string("explorer_data", None, "With --tflite_output: also write Model Explorer node data for the "
                    ".tflite model to this file (each fold coloured by its check's error over its bound, each batch "
                    "norm left alone by why): model-explorer MODEL.tflite --node_data_paths=FILE.")
flags.DEFINE_bool("quiet", False, "No progress lines on stderr; errors and warnings still show.")
OWN_FLAGS = ["saved_model_dir", "output_dir", "signature_keys", "tags", "config", "overwrite", "skip_verify",
             "verify_inputs", "report_json", "tflite_output", "tflite_quantize", "tflite_io", "calibration_inputs",
             "tflite_max_error", "drop_other_metagraphs", "explorer_data", "quiet"]

HELP_EPILOG = """\
  --verbosity=1: also TensorFlow's own log lines, and tracebacks of internal errors
  --version: tf_bnfuse, TensorFlow, Keras and LiteRT versions
  --helpfull: every flag, absl's included

exit codes:
  0    folded and verified (or --skip_verify), output written
  1    verification failed: nothing written
  2    bad input: a path, flag, config or SavedModel that cannot be used; nothing written
  3    internal error: nothing written
  130  interrupted (Ctrl-C): nothing written

example:
  python -m tf_bnfuse --saved_model_dir my_model --output_dir my_model_folded --report_json report.json
"""


def _fail(message, code):
    if isinstance(message, errors.BnFuseError):
        message.caller = errors.CLI  # its options named as flags
    sys.stderr.write("tf_bnfuse: error: %s\n" % " ".join(str(message).split()))
    sys.stderr.flush()
    return code


def help_text():
    lines = ["usage: python -m tf_bnfuse --saved_model_dir IN --output_dir OUT [flags]",
             "", "Folds inference batch normalization into the convolutions and matmuls of a SavedModel,",
             "writes a new SavedModel with the same signatures, and verifies it against the input.", "",
             "flags:"]
    for name in OWN_FLAGS:
        flag = FLAGS[name]
        default = flag.default_as_str if flag.default not in (None, [], False) else ""
        lines.append("  --%s%s" % (name, "" if isinstance(flag.default, bool) else "=..."))
        lines.append("      %s%s" % (flag.help, " (default: %s)" % default if default else ""))
    return "\n".join(lines) + "\n" + HELP_EPILOG


def versions():
    """{package: version} without importing TensorFlow (which takes seconds)."""
    from importlib import metadata
    result = {"tf_bnfuse": tf_bnfuse.__version__, "python": platform.python_version()}
    for package, name in (("tensorflow", "tensorflow"), ("keras", "keras"), ("tf-keras", "tf_keras"),
                          ("ai-edge-litert", "ai_edge_litert")):
        try:
            result[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            result[name] = None
    return result


def parse_flags(argv):
    """absl's parser, but --help/-h list this tool's own flags (exit 0), and a usage error is
    one line and exit code 2."""
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        sys.stdout.write(help_text())
        sys.exit(errors.EXIT_OK)
    if "--version" in argv[1:]:
        sys.stdout.write("".join("%s %s\n" % (k, v) for k, v in versions().items() if v))
        sys.exit(errors.EXIT_OK)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(_fail(e, errors.EXIT_BAD_INPUT))


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


@contextlib.contextmanager
def _logging_set_up(started):
    """Within, tf_bnfuse's progress lines on stderr, timed from `started` (none with --quiet);
    TensorFlow's own lines only with --verbosity=1, in their own format. The tf_bnfuse logger is
    as it was afterwards (main() may run in a caller's process: the tests)."""
    verbose = FLAGS["verbosity"].present and FLAGS.verbosity >= 1
    if not verbose:
        _silence_native_stderr()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # absl's, which TensorFlow's Python side logs through
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(report_lib.ProgressFormatter(started))
    logger = std_logging.getLogger(report_lib.PACKAGE_LOGGER)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(std_logging.WARNING if FLAGS.quiet else std_logging.INFO)
    logger.propagate = False  # not again through absl's handler on the root logger
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally` blocks remove the scratch folder."""


# Set in a test to pause the run at a phase boundary until a signal arrives (see _Signals.checkpoint).
PAUSE_ENV = "TF_BNFUSE_TEST_PAUSE_AT"


class _Signals:
    """SIGINT and SIGTERM during a run, recorded so that they cannot be lost.

    The handler raises KeyboardInterrupt or _Terminated at once for the first signal, as
    Python does, and records it: TensorFlow code that runs Python callbacks can swallow the exception,
    and the run's next phase boundary (checkpoint) raises it again from the record. Once the
    move into place begins, a signal is only recorded: the output is then complete, and the
    run finishes with exit 0 and says so.
    """

    def __init__(self):
        self.received = None  # the first signal number, once one arrived
        self.output_in_place = False
        self.swallowing = False  # the test hook's pause: record, raise nothing

    def handle(self, signum, frame):  # pylint: disable=unused-argument
        if self.received is not None:
            return  # the run is ending already: a second Ctrl-C must not cut its clean-up short
        self.received = signum
        if not (self.output_in_place or self.swallowing):
            raise self._exception(signum)

    @staticmethod
    def _exception(signum):
        return KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()

    def checkpoint(self, boundary):
        """Called by the run at each phase boundary ("load", ..., "move into place", "moved into place")."""
        if boundary.startswith(os.environ.get(PAUSE_ENV) or "\0"):
            self._pause(boundary)
        if self.received is not None and not self.output_in_place:
            raise self._exception(self.received)
        if boundary == "move into place":
            self.output_in_place = True  # from here on the output is complete: signals are only recorded

    def _pause(self, boundary):
        """Waits for SIGINT or SIGTERM and records it with its exception swallowed, as TensorFlow
        code may swallow it: only the record can end the run then. (Polled: the signal may be
        delivered to one of TensorFlow's threads, and Python runs its handler in the main
        thread only between bytecodes.)"""
        self.swallowing = True
        try:
            sys.stderr.write("tf_bnfuse: paused at %s (%s)\n" % (boundary, PAUSE_ENV))
            sys.stderr.flush()
            while self.received is None:
                time.sleep(0.05)
        finally:
            self.swallowing = False


def _flags_dict():
    return {name: FLAGS[name].value for name in OWN_FLAGS}


def _write_report(path, status, code, message, config, run_report):
    report = {"status": status, "exit_code": code, "message": message, "versions": versions(),
              "flags": _flags_dict(), "config": config}
    if run_report is not None:
        report.update(run_report.to_dict())
    try:
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)
    except OSError as e:
        sys.stderr.write("tf_bnfuse: error: cannot write --report_json %s: %s\n" % (path, e.strerror or e))


def _closing_line(report, seconds):
    folds = sum(len(g.folds) for g in report.signatures.values() if not g.same_as)
    skips = sum(len(g.left_alone) for g in report.signatures.values() if not g.same_as)
    verification = report.verification
    if verification is None:
        checked = "NOT compared with the input (--skip_verify)"
    else:
        checked = "verified on %d device%s" % (len(verification.devices), "" if len(verification.devices) == 1
                                               else "s")
    return "wrote %s: %d folded, %d left alone, %s, %.1f s" % (report.output_dir, folds, skips, checked, seconds)


def main(argv):
    try:
        return _main(argv)
    except KeyboardInterrupt:  # outside the run (before TF, or printing): still one line
        return _fail("interrupted; nothing written", EXIT_INTERRUPTED)


def _freed_weights_back_to_the_os():
    """glibc: every allocation of 8 MiB or more by mmap, so that a big buffer freed (a pass's
    GraphDef copy, the frozen graph) goes back to the OS at once. By default glibc raises its
    mmap threshold after the first big free and keeps later ones in its heap, where
    TensorFlow's own allocations do not reuse them: a lower peak RSS at the same wall time,
    measured side by side when this was added (a smaller threshold makes every weight an
    mmap, and the run slower).
    Only the CLI's own process; the Python API leaves malloc alone."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_mmap_threshold = -3  # malloc.h's M_MMAP_THRESHOLD; setting it turns the raising off
    libc.mallopt(m_mmap_threshold, 8 << 20)


def _main(argv):
    started = time.monotonic()
    config, failure = _preflight(argv)
    if failure is not None:
        return failure
    _freed_weights_back_to_the_os()
    signals = _Signals()
    previous = {s: signal.signal(s, signals.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _logging_set_up(started):
            return _fold_and_report(config, signals, started)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _fold_and_report(config, signals, started):
    run_report, code, message = _fold(config, signals)
    if "error log" in message:  # TF refers to its own log, which is silenced by default
        message += " (TensorFlow's log lines show with --verbosity=1)"
    if FLAGS.report_json:
        _write_report(FLAGS.report_json, "ok" if code == errors.EXIT_OK else "failed", code, message, config,
                      run_report)
    if code != errors.EXIT_OK:
        return _fail(message, code)
    print(report_lib.format_run(run_report))
    print(_closing_line(run_report, time.monotonic() - started))
    if FLAGS.skip_verify:
        sys.stderr.write("tf_bnfuse: WARNING: --skip_verify: the folded model ran on test inputs but was NOT "
                         "compared with the input\n")
    return errors.EXIT_OK


def _preflight(argv):
    """(config, None), or (config or None, the exit code of a failure already reported): every
    flag, path and the config, checked before TensorFlow is imported."""
    if len(argv) > 1:
        return None, _fail("unexpected arguments: %s" % " ".join(argv[1:]), errors.EXIT_BAD_INPUT)
    for required in ("saved_model_dir", "output_dir"):
        if not FLAGS[required].value:
            return None, _fail("--%s is required" % required, errors.EXIT_BAD_INPUT)
    try:  # the report's own path first: every later failure is reported there
        if FLAGS.report_json:
            preflight.check_report_json(FLAGS.report_json, FLAGS.saved_model_dir, FLAGS.output_dir)
    except errors.BnFuseError as e:
        return None, _fail(e, e.exit_code)
    config = None
    try:
        config = config_lib.load_config(FLAGS.config)
        preflight.check_all(FLAGS.saved_model_dir, FLAGS.output_dir, FLAGS.overwrite, FLAGS.tflite_output,
                            verify_inputs=FLAGS.verify_inputs)
        preflight.check_tflite_options(FLAGS.tflite_output, FLAGS.tflite_quantize, FLAGS.tflite_io,
                                       FLAGS.calibration_inputs, FLAGS.tflite_max_error)
        if FLAGS.explorer_data:
            preflight.check_explorer_data(FLAGS.explorer_data, FLAGS.tflite_output, FLAGS.saved_model_dir,
                                          FLAGS.output_dir, FLAGS.overwrite)
    except errors.BnFuseError as e:
        if FLAGS.report_json:
            e.caller = errors.CLI
            _write_report(FLAGS.report_json, "failed", e.exit_code, str(e), config, None)
        return config, _fail(e, e.exit_code)
    return config, None


def _fold(config, signals):
    """(RunReport or None, exit code, message) of the run; SIGTERM ends it as SIGTERM means."""
    run_report, code, message = None, errors.EXIT_OK, ""
    try:
        _log.info("importing TensorFlow ...")
        import tensorflow as tf
        tf.get_logger().setLevel("ERROR")
        from tf_bnfuse import api
        run_report = api.fold_saved_model(
            FLAGS.saved_model_dir, FLAGS.output_dir, signature_keys=FLAGS.signature_keys or None,
            tags=FLAGS.tags, config=FLAGS.config, overwrite=FLAGS.overwrite, verify=not FLAGS.skip_verify,
            tflite_output=FLAGS.tflite_output, drop_other_metagraphs=FLAGS.drop_other_metagraphs,
            verify_inputs=FLAGS.verify_inputs, checkpoint=signals.checkpoint, tflite_quantize=FLAGS.tflite_quantize,
            tflite_io=FLAGS.tflite_io, calibration_inputs=FLAGS.calibration_inputs,
            tflite_max_error=FLAGS.tflite_max_error, explorer_data=FLAGS.explorer_data)
        if signals.received is not None:
            run_report.interrupted_after_output = signal.Signals(signals.received).name
    except errors.BnFuseError as e:
        e.caller = errors.CLI
        run_report, code, message = getattr(e, "run_report", None), e.exit_code, str(e)
    except KeyboardInterrupt as e:
        run_report, code, message = getattr(e, "run_report", None), EXIT_INTERRUPTED, "interrupted; nothing written"
    except _Terminated as e:
        if FLAGS.report_json:
            _write_report(FLAGS.report_json, "terminated", 128 + signal.SIGTERM, "terminated (SIGTERM)", config,
                          getattr(e, "run_report", None))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # scratch is gone: now die as SIGTERM means
        os.kill(os.getpid(), signal.SIGTERM)
    except Exception as e:  # the promise is one line, never a traceback
        logging.debug("internal error", exc_info=True)
        run_report, code = getattr(e, "run_report", None), errors.EXIT_INTERNAL
        message = "internal error: %s: %s (run with --verbosity=1 for details)" % (
            type(e).__name__, errors.most_specific_line(e))
    return run_report, code, message


def run():
    """Console-script entry point."""
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as e:
        _exit_without_teardown(e.code)


def _exit_without_teardown(code):
    """Exits with `code` once everything is written, skipping the interpreter's teardown.

    Tearing down a process that has loaded TensorFlow and two SavedModels
    (freeing every Python object, then TF's C++ destructors) is a noticeable
    part of a run, and comes after the output is in place.
    atexit handlers still run (absl and logging flush there) and both streams
    are flushed; then os._exit. Only for the CLI's own process, and only once
    TensorFlow is loaded: --help and errors before it exit as usual.
    """
    if "tensorflow" not in sys.modules:
        sys.exit(code)
    if code is None:
        code = errors.EXIT_OK
    elif not isinstance(code, int):  # sys.exit("message") semantics
        sys.stderr.write("%s\n" % code)
        code = 1
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say on it
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
