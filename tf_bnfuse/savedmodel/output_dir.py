"""Putting the output folder in place in one step, and cleaning up after crashes.

The output is built in a scratch folder `.tf_bnfuse-*` beside the output
folder (so on the same filesystem), then renamed into place. Replacing an
existing output uses renameat2(RENAME_EXCHANGE) where the kernel offers it,
so at every instant the output path holds either the old or the new
SavedModel; elsewhere it falls back to two renames.
"""

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile

SCRATCH_PREFIX = ".tf_bnfuse-"
OWNER_FILE = "owner.pid"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def exchange(path_a, path_b):
    """Atomically swaps two existing paths; False when the system cannot."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(path_a), _AT_FDCWD, os.fsencode(path_b), _RENAME_EXCHANGE)
    if result != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise OSError(err, os.strerror(err), path_a)
    return True


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(parent):
    """Removes scratch folders whose owning process is gone (a crash or a kill)."""
    for name in os.listdir(parent):
        folder = os.path.join(parent, name)
        if not name.startswith(SCRATCH_PREFIX) or not os.path.isdir(folder):
            continue
        try:
            with open(os.path.join(folder, OWNER_FILE)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue  # not ours to judge: no readable owner
        if not _pid_alive(pid):
            remove_scratch(folder)


def remove_scratch(folder):
    """Removes a scratch folder, its owner file last: a kill part-way through leaves a
    folder that still names its (dead) owner, which the next run then removes."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name == OWNER_FILE:
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
    shutil.rmtree(folder, ignore_errors=True)


def make_scratch(parent):
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
    with open(os.path.join(scratch, OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    return scratch


def move_into_place(built, output_dir, scratch):
    """Renames `built` to output_dir, swapping out an existing output_dir in one step."""
    if not os.path.exists(output_dir):
        os.rename(built, output_dir)
    elif not exchange(built, output_dir):
        os.rename(output_dir, os.path.join(scratch, "replaced"))
        os.rename(built, output_dir)
    # After an exchange, `built` holds the old output; the scratch folder goes with it.


def write_file_atomically(path, content):
    """Writes bytes to path through a file beside it renamed into place: a reader never sees half
    a file, and a failed write leaves path as it was."""
    scratch = "%s.tf_bnfuse-%d.tmp" % (path, os.getpid())
    try:
        with open(scratch, "wb") as f:
            f.write(content)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
