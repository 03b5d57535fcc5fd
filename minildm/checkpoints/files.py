"""Writing files so that a final name never holds a partial file: every output minildm writes (PNGs,
traces, checkpoints, pipeline folders, downloads) goes through here.

- `write_file(path, write)`: `write(temporary)` writes the whole file under a hidden temporary name
  in the same folder (so the rename stays on one file system); only then does it take `path`'s
  name, with `os.replace`, which is atomic on POSIX and Windows. A failed write (a full disk, an
  error, Ctrl-C) removes the temporary file and leaves `path` as it was.
- `claim_files(write_all, names_for_run)`: the same for a set of files that must not replace
  anyone's: each final name is created exclusively (a hard link, which fails if the name exists),
  so two runs writing into one folder at once never take the same name; when a name is taken, the
  set moves on to the next run's names.
- `check_writable_folder(folder, option)`: a file made and removed, before any heavy work.
"""

import errno
import os
import secrets
import tempfile
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this write, with the same suffix (PIL picks the
    format from it): .NAME.RANDOM.partial.png"""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")


def write_file(path, write) -> Path:
    """`write(temporary_path)` writes the file; it then replaces `path` in one step."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise failed_write(error, [path]) from error
    finally:
        temporary.unlink(missing_ok=True)  # only left when the write failed
    return path


def failed_write(error: OSError, paths: list) -> OSError:
    """The error of a failed write, naming the file the user asked for (not the temporary)."""
    reason = error.strerror or str(error)
    named = ", ".join(str(path) for path in paths)
    return OSError(error.errno, f"could not write {named} ({reason}); no partial file was left")


def write_text(path, text: str) -> Path:
    return write_file(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def claim(temporary: Path, path: Path) -> bool:
    """Give the written `temporary` the name `path` unless that name exists. -> whether it did."""
    try:
        os.link(temporary, path)  # atomic and exclusive: fails when `path` exists
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    # a file system without hard links: reserve the name exclusively, then fill it at once
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    os.replace(temporary, path)
    return True


def claim_files(write_all, names_for_run, first_run: int = 1) -> list:
    """Write a set of files under names nobody else holds.

    `write_all(temporaries)` writes one file to each temporary path; `names_for_run(k)` gives the
    final names of run k (k = first_run, first_run + 1, ...). The set takes the first run whose
    names are all free, created exclusively, so a concurrent writer never gets the same ones.
    -> the final paths."""
    planned = [Path(name) for name in names_for_run(first_run)]
    temporaries = [temporary_name(path) for path in planned]
    try:
        try:
            write_all(temporaries)
        except OSError as error:
            raise failed_write(error, planned) from error
        run = first_run
        while True:
            names = [Path(name) for name in names_for_run(run)]
            taken = []
            for temporary, name in zip(temporaries, names):
                if not claim(temporary, name):
                    break
                taken.append(name)
            if len(taken) == len(names):
                return names
            for name in taken:  # ours, claimed a moment ago: give them back, try the next run
                name.unlink()
            run += 1
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def check_writable_folder(folder, option: str):
    """Make `folder` (and its parents) and write a file into it, so that an unwritable destination
    fails before the work, not after. `option` names the destination in the message (--out)."""
    folder = Path(folder)
    for path in [folder, *folder.parents]:
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"{option} {folder}: {path} is a file, not a folder; choose another {option}"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"{option} {folder}: cannot create the folder ({error.strerror})"
        ) from None
    # a file made and removed: os.access alone says yes to root, even on a read-only file system
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"{option} {folder}: cannot write into the folder ({error.strerror}); choose another "
            f"{option}"
        ) from None


def check_writable_file(path, option: str):
    """`path` is to be written as a file: not a folder, in an existing folder we can write into."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{option} {path} is a folder; give a file name, such as {path / 'trace.safetensors'}"
        )
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {path.parent} does not exist")
    check_writable_folder(path.parent, option)
