"""Checks of every path a run is given, before TensorFlow is imported.

Importing TensorFlow takes seconds; a typo in a path should not. The CLI runs
these first; fold_saved_model runs them too, so API users get the same errors.
"""

import os
import zipfile

from tf_bnfuse import errors


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
            raise errors.BadInputError("output folder %s exists and is not empty; pass --overwrite "
                                       "to replace it" % output_dir)
    _check_parent(output_dir, "output folder %s" % output_dir)


def _check_file_target(path, flag, saved_model_dir, output_dir, overwrite=True):
    target = os.path.realpath(path)
    for folder in (saved_model_dir, output_dir):
        folder = os.path.realpath(folder)
        if target == folder or target.startswith(folder + os.sep):
            raise errors.BadInputError("%s %s is inside %s" % (flag, path, folder))
    if os.path.isdir(path):
        raise errors.BadInputError("%s %s is a folder, not a file" % (flag, path))
    if os.path.exists(path) and not overwrite:
        raise errors.BadInputError("%s %s exists; pass --overwrite to replace it" % (flag, path))
    _check_parent(path, "%s %s" % (flag, path))


def check_tflite_output(path, saved_model_dir, output_dir, overwrite):
    _check_file_target(path, "--tflite_output", saved_model_dir, output_dir, overwrite)


def check_report_json(path, saved_model_dir, output_dir):
    _check_file_target(path, "--report_json", saved_model_dir, output_dir)


def check_verify_inputs(path):
    """The file exists and is a .npz archive (its arrays are checked against the signatures later)."""
    if not os.path.isfile(path):
        raise errors.BadInputError("--verify_inputs %s %s" % (
            path, "is a folder, not a file" if os.path.isdir(path) else "does not exist"))
    if not zipfile.is_zipfile(path):
        raise errors.BadInputError("--verify_inputs %s is not a .npz file (numpy.savez)" % path)


def check_all(saved_model_dir, output_dir, overwrite=False, tflite_output=None, report_json=None,
              verify_inputs=None):
    check_saved_model_dir(saved_model_dir)
    check_output_dir(saved_model_dir, output_dir, overwrite)
    if tflite_output:
        check_tflite_output(tflite_output, saved_model_dir, output_dir, overwrite)
    if report_json:
        check_report_json(report_json, saved_model_dir, output_dir)
    if verify_inputs:
        check_verify_inputs(verify_inputs)
