"""Checks of every path a run is given, before TensorFlow is imported.

Importing TensorFlow takes seconds; a typo in a path should not. The CLI runs
these first; fold_saved_model runs them too, so API users get the same errors.
"""

import os
import zipfile

from tf_bnfuse import errors

QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")  # --tflite_quantize
TFLITE_IO = ("float", "int8")  # --tflite_io: the int8 model's input and output type


def _folder_problem(path, what):
    """Why `path` is not an existing folder, or None."""
    if not os.path.exists(path):
        return "%s %s does not exist" % (what, path)
    if not os.path.isdir(path):
        return "%s %s is a file, not a folder" % (what, path)
    return None


def check_saved_model_dir(path):
    problem = _folder_problem(path, "SavedModel folder")
    if problem:
        raise errors.BadInputError(problem)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        raise errors.BadInputError("%s has no saved_model.pb: it is not a SavedModel" % path)
    if not os.path.isdir(os.path.join(path, "variables")):
        raise errors.BadInputError("SavedModel %s has no variables/ folder (an incomplete copy?)" % path)


def _check_parent(path, what):
    parent = os.path.dirname(os.path.realpath(path))
    problem = _folder_problem(parent, "parent folder of %s" % what)
    if problem:
        raise errors.BadInputError(problem)
    if not os.access(parent, os.W_OK):
        raise errors.BadInputError("parent folder %s of %s is not writable" % (parent, what))


def check_output_dir(saved_model_dir, output_dir, overwrite):
    source = os.path.realpath(saved_model_dir)
    target = os.path.realpath(output_dir)
    if target == source or target.startswith(source + os.sep):
        raise errors.BadInputError("output folder %s is the input folder or inside it" % output_dir)
    if source.startswith(target + os.sep):
        raise errors.BadInputError("output folder %s contains the input folder" % output_dir)
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise errors.BadInputError("output path %s is a file, not a folder" % output_dir)
        if os.listdir(output_dir) and not overwrite:
            raise errors.BadInputError("output folder %s exists and is not empty; pass {--overwrite} "
                                       "to replace it" % output_dir)
    _check_parent(output_dir, "output folder %s" % output_dir)


def _check_file_target(path, flag, saved_model_dir, output_dir, overwrite=True):
    target = os.path.realpath(path)
    for folder in (f for f in (saved_model_dir, output_dir) if f is not None):  # None: a Python export's
        folder = os.path.realpath(folder)
        if target == folder or target.startswith(folder + os.sep):
            raise errors.BadInputError("%s %s is inside %s" % (flag, path, folder))
    if os.path.isdir(path):
        raise errors.BadInputError("%s %s is a folder, not a file" % (flag, path))
    if os.path.exists(path) and not overwrite:
        raise errors.BadInputError("%s %s exists; pass {--overwrite} to replace it" % (flag, path))
    _check_parent(path, "%s %s" % (flag, path))


def check_tflite_output(path, saved_model_dir, output_dir, overwrite):
    _check_file_target(path, "{--tflite_output}", saved_model_dir, output_dir, overwrite)


def check_explorer_data(path, tflite_output, saved_model_dir, output_dir, overwrite):
    """--explorer_data: a file to write, beside a .tflite model to draw it on."""
    if not tflite_output:
        raise errors.BadInputError("{--explorer_data} needs {--tflite_output}: the node data is drawn on the .tflite "
                                   "model (Model Explorer numbers a SavedModel's nodes by position)")
    if os.path.realpath(path) == os.path.realpath(tflite_output):
        raise errors.BadInputError("{--explorer_data} %s is the .tflite model's own path" % path)
    _check_file_target(path, "{--explorer_data}", saved_model_dir, output_dir, overwrite)


def check_report_json(path, saved_model_dir, output_dir):
    _check_file_target(path, "{--report_json}", saved_model_dir, output_dir)


def check_npz(path, flag="{--verify_inputs}"):
    """The file exists and is a .npz archive (its arrays are checked against the signatures later)."""
    if not os.path.isfile(path):
        raise errors.BadInputError("%s %s %s" % (
            flag, path, "is a folder, not a file" if os.path.isdir(path) else "does not exist"))
    if not zipfile.is_zipfile(path):
        raise errors.BadInputError("%s %s is not a .npz file (numpy.savez)" % (flag, path))


def check_tflite_options(tflite_output, quantize, io, calibration_inputs, max_error):
    """The quantization flags only with --tflite_output, and with each other where they need it."""
    if quantize not in QUANTIZE_MODES:
        raise errors.BadInputError("{--tflite_quantize} %s: one of %s" % (quantize, ", ".join(QUANTIZE_MODES)))
    if io not in TFLITE_IO:
        raise errors.BadInputError("{--tflite_io} %s: one of %s" % (io, ", ".join(TFLITE_IO)))
    given = [flag for flag, value in (("{--tflite_quantize}", quantize != "none"), ("{--tflite_io}", io != "float"),
                                      ("{--calibration_inputs}", calibration_inputs),
                                      ("{--tflite_max_error}", max_error is not None)) if value]
    if given and not tflite_output:
        raise errors.BadInputError("%s need {--tflite_output}" % ", ".join(given))
    if max_error is not None and quantize == "none":
        raise errors.BadInputError("{--tflite_max_error} is for {--tflite_quantize} float16, dynamic or int8 (a float "
                                   ".tflite model is checked within tolerance of the original)")
    if (io != "float" or calibration_inputs) and quantize != "int8":
        raise errors.BadInputError("{--tflite_io} and {--calibration_inputs} are for {--tflite_quantize} int8")
    if max_error is not None and not max_error > 0:
        raise errors.BadInputError("{--tflite_max_error} %s: a relative L2 error above 0" % max_error)
    if calibration_inputs:
        check_npz(calibration_inputs, "{--calibration_inputs}")


def check_all(saved_model_dir, output_dir, overwrite=False, tflite_output=None, report_json=None,
              verify_inputs=None):
    check_saved_model_dir(saved_model_dir)
    check_output_dir(saved_model_dir, output_dir, overwrite)
    if tflite_output:
        check_tflite_output(tflite_output, saved_model_dir, output_dir, overwrite)
    if report_json:
        check_report_json(report_json, saved_model_dir, output_dir)
    if verify_inputs:
        check_npz(verify_inputs)
