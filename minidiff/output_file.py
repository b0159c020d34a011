"""Writing a file the user cares about without ever losing one: checked before the work, written to a
temporary file beside the target, and moved into place only when complete.

Without `overwrite`, the move is a hard link, which fails if a file of that name appeared meanwhile (from
another run, or the user): that file is kept and the error says where the new one is not. With `overwrite`
the move is os.replace, atomic on POSIX and Windows: readers see the old file or the new one, never half.
An interrupt (Ctrl-C, a crash) leaves at most the temporary file's removal undone, never a truncated target.
"""
import os
import tempfile

from .errors import OutputFileError


def check_output_path(path, overwrite=False, suffix=None):
    """Errors before any work: `path` is a folder, exists (without overwrite), or its folder is not writable."""
    if not isinstance(path, str) or not path:
        raise OutputFileError(f"output path {path!r} must be a non-empty file name")
    if os.path.isdir(path):
        raise OutputFileError(f"{path} is a folder: name a file inside it, e.g. {os.path.join(path, 'out' + (suffix or ''))}")
    if suffix and not path.lower().endswith(suffix):
        raise OutputFileError(f"{path!r} must end in {suffix}")
    if os.path.lexists(path) and not overwrite:
        raise OutputFileError(f"{path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):  # the folders still to create are created inside the nearest one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputFileError(f"{path}: {existing} is a file, so the folder {folder} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFileError(f"{path}: the folder {existing} is not writable")


def write_new_file(path, write, overwrite=False):
    """Call `write(binary file)` on a temporary file beside `path`, then move it into place (module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputFileError(f"{path} appeared while the image was made; it was kept and nothing was written "
                                  "(pass --overwrite to replace it)") from None
        except OSError:  # a file system without hard links: exclusive create, then copy
            try:
                with open(path, "xb") as out, open(tmp, "rb") as src:
                    out.write(src.read())
            except FileExistsError:
                raise OutputFileError(f"{path} appeared while the image was made; it was kept and nothing was "
                                      "written (pass --overwrite to replace it)") from None
        return path
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
