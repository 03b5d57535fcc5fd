"""Downloading the official weight files, and checking that they are exactly the official files.

    python -m minildm download stable-diffusion-v1-4                    every file of a system
    python -m minildm download stable-diffusion-v1-4/unet/config.json   one file
    python -m minildm download vq-diffusion-ithq --dir weights          files go to DIR/SYSTEM/PATH

`weights_manifest.txt` (at the top of the repository, and inside the installed package) lists
each official file: its system name, hub repository, pinned commit, path, size in bytes and
sha256. A downloaded system folder has the hub's layout, so it can be given to minildm's loaders
like any other local pipeline folder.

Why the care: the files are gigabytes, connections drop, and a half-written or wrong file fails
much later, deep inside loading, with an error that says nothing about the download.
- Bytes go to `TARGET.part` first. After a dropped connection (or Ctrl-C) the same command resumes
  with an HTTP Range request, so nothing already received is fetched again.
- The `.part` file gets its real name (an atomic `os.replace`) only after its size and sha256 match
  the manifest. A file under its real name is therefore always complete and official.
- A file that fails its sha256 check is deleted (it is corrupt, and resuming it would keep it
  corrupt); a file that is only short is kept, so that a rerun resumes it.
- Nothing is overwritten: a file already in place is checked and skipped, or, if it differs from the
  manifest, the command stops and asks you to delete it.
- A server that stays silent for TIMEOUT seconds ends the transfer (the .part is kept, a rerun
  resumes); one that sends more bytes than the manifest's size is cut off there; an HTTP error
  stops the command with what it means and what to do.
- Revisions are pinned commits (all but ldm-text2im-large-256, read at `main`), and sizes and
  hashes pin the bytes: what you get is the file minildm was checked against, not whatever the
  repository holds today.
- HF_HUB_OFFLINE is respected, as by the Hugging Face libraries.
Rows with `-` for size or sha256 are downloaded too, and the output says that they could not be
checked on that column. Only the standard library is used (urllib, hashlib); no threads.
"""

import hashlib
import http.client
import importlib.resources
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# minildm/weights_manifest.txt is a link to the repository's top-level file; `pip install .` copies
# the file itself into the package, so the installed command finds it without the repository.
MANIFEST = importlib.resources.files("minildm") / "weights_manifest.txt"
HUB_URL = "https://huggingface.co"
CHUNK = 1 << 20  # bytes read, hashed and written at a time
# Seconds the server may stay silent (before answering, or in the middle of the file) before we give
# up, keeping the .part file. Read at each request, so tests set it lower to see a stall end.
TIMEOUT = 60
REPORT_EVERY = 2.0  # seconds between two progress lines of one file
USER_AGENT = "minildm-download (Python urllib)"


class DownloadError(RuntimeError):
    """A file could not be fetched, or is not the file the manifest describes. The message says why
    and what to do."""


@dataclass(frozen=True)
class ManifestEntry:
    """One row of weights_manifest.txt."""

    system: str  # the name given to `python -m minildm download`
    repo: str  # hub repository, "owner/name"
    revision: str  # the commit (or branch) the row describes
    path: str  # the file inside the repository
    size: int | None  # exact size in bytes; None where unknown
    sha256: str | None  # lowercase hex; None where unknown

    def url(self, base_url: str = HUB_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.path}"


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def read_manifest(path=None) -> list[ManifestEntry]:
    """The rows of the manifest (by default the repository's weights_manifest.txt). Columns:
    system repo revision path bytes sha256, separated by spaces; `-` where unknown; `#` comments."""
    path = Path(path) if path is not None else MANIFEST
    entries = []
    first_seen = {}  # (system, path) -> the line that listed it
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        fields = line.split()
        if len(fields) != 6:
            raise ValueError(
                f"{where}: expected 6 columns "
                "(system repo revision path bytes sha256, `-` where unknown), "
                f"found {len(fields)}: {line.strip()!r}"
            )
        system, repo, revision, file, size, sha256 = fields
        if "/" in system:
            raise ValueError(
                f"{where}: the system name {system!r} contains '/'; "
                "it must not, because SYSTEM/PATH names one file"
            )
        if not re.fullmatch(r"[^/]+/[^/]+", repo):
            raise ValueError(f"{where}: expected a repository as owner/name, found {repo!r}")
        if file.startswith("/") or "\\" in file or ".." in file.split("/"):
            raise ValueError(
                f"{where}: the path {file!r} must stay inside the repository "
                "(relative, '/'-separated, no '..')"
            )
        if size != "-" and not re.fullmatch(r"[0-9]+", size):
            raise ValueError(
                f"{where}: expected the size as a whole number of bytes or '-', found {size!r}"
            )
        if sha256 != "-" and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(
                f"{where}: expected the sha256 as 64 lowercase hex digits or '-', found {sha256!r}"
            )
        if (system, file) in first_seen:
            raise ValueError(
                f"{where}: {system}/{file} is already listed on line {first_seen[system, file]}"
            )
        first_seen[system, file] = number
        entries.append(
            ManifestEntry(
                system,
                repo,
                revision,
                file,
                None if size == "-" else int(size),
                None if sha256 == "-" else sha256,
            )
        )
    return entries


def select(entries: list[ManifestEntry], name: str) -> list[ManifestEntry]:
    """The rows NAME stands for: all files of a system ("stable-diffusion-v1-4"), or one file
    ("stable-diffusion-v1-4/unet/config.json")."""
    systems = list(dict.fromkeys(e.system for e in entries))  # in manifest order
    system, _, file = name.partition("/")
    if system not in systems:
        raise DownloadError(
            f"unknown name {name!r}: expected one of the systems in the manifest "
            f"({', '.join(systems)}), or SYSTEM/PATH for one of its files"
        )
    files = [e for e in entries if e.system == system]
    if not file:
        return files
    chosen = [e for e in files if e.path == file]
    if not chosen:
        raise DownloadError(
            f"{system} has no file {file!r} in the manifest; its files are:\n  "
            + "\n  ".join(e.path for e in files)
        )
    return chosen


# The manifest's folder of each system's official pipeline
OFFICIAL_FOLDERS = {
    "sd": "stable-diffusion-v1-4",
    "ldm": "ldm-text2im-large-256",
    "ldm-uncond": "ldm-celebahq-256",
    "vq-diffusion": "vq-diffusion-ithq",
}


def official_or_tiny(system: str, weights="../weights") -> tuple[Path, bool]:
    """The folder the lessons read `system` from -> (folder, tiny): the official pipeline if
    `python -m minildm download NAME --dir weights`, run from the repository root, put it in
    `weights` (a lesson runs in notebooks/, hence ../weights), else the embedded tiny model."""
    if system not in OFFICIAL_FOLDERS:
        raise ValueError(
            f"unknown system {system!r}: expected one of {', '.join(OFFICIAL_FOLDERS)}"
        )
    official = Path(weights) / OFFICIAL_FOLDERS[system]
    if official.is_dir():
        return official, False
    from minildm import TINY_MODELS

    return TINY_MODELS[system], True


# ---------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------


def download(
    name: str,
    directory,
    base_url: str = HUB_URL,
    progress=print,
    manifest=None,
) -> list[Path]:
    """Fetch the files NAME stands for (see `select`) into DIRECTORY/SYSTEM/PATH, verify them, and
    return their paths. Files already in place and verified are skipped. `progress` receives one
    line of text at a time; `manifest` is the manifest file (default: the repository's)."""
    entries = select(read_manifest(manifest), name)
    directory = Path(directory)
    targets = [directory / e.system / e.path for e in entries]

    # First look at what is already there: this needs no network, and refuses a wrong file early.
    missing = [(e, t) for e, t in zip(entries, targets) if not already_in_place(e, t, progress)]

    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if missing and offline.strip().lower() not in ("", "0", "false", "no"):
        raise DownloadError(
            f"HF_HUB_OFFLINE={offline} forbids network access, "
            f"and these files are not in {directory}:\n  "
            + "\n  ".join(f"{e.system}/{e.path}" for e, _ in missing)
            + "\nUnset HF_HUB_OFFLINE (or set it to 0) to download them, "
            "or copy them there yourself."
        )

    for folder in sorted({target.parent for _, target in missing}):
        check_destination(folder)  # before the first byte is fetched
    for number, (entry, target) in enumerate(missing, start=1):
        size = "size unknown" if entry.size is None else format_bytes(entry.size)
        label = f"{entry.system}/{entry.path}"
        progress(f"[{number}/{len(missing)}] {label} ({size}) from {entry.url(base_url)}")
        fetch(entry, target, base_url, progress)
    return targets


def check_destination(folder: Path):
    """Make the folder and write a file into it (os.access says yes to root even on a read-only
    disk), so that an unwritable destination fails before the transfer, not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        raise DownloadError(
            f"cannot create the folder {folder}: {e}. "
            "Choose a folder you can write to with --dir, or remove what is in the way."
        ) from e
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DownloadError(
            f"cannot write into the folder {folder}: {e}. "
            "Choose a folder you can write to with --dir."
        ) from e


def already_in_place(entry: ManifestEntry, target: Path, progress) -> bool:
    """True if TARGET is there and matches the manifest, False if it is absent. A different file is
    never overwritten: it raises, asking the user to delete it."""
    if not target.exists():
        return False
    label = f"{entry.system}/{entry.path}"
    size = target.stat().st_size
    if entry.size is not None and size != entry.size:
        raise DownloadError(
            f"{target} exists with {size} bytes, but the manifest expects {entry.size}: "
            "it is not the official file (another version, or a copy cut short). "
            "minildm does not overwrite files: delete it and run again."
        )
    if entry.sha256 is None:
        progress(f"{label}: present, unverified (the manifest has no sha256 for it); left as it is")
        return True
    progress(f"{label}: present, checking its sha256")
    sha256 = hash_file(target).hexdigest()
    if sha256 != entry.sha256:
        raise DownloadError(
            f"{target} exists, but its sha256 is {sha256}, expected {entry.sha256}: "
            "it is not the official file (corrupt, or another version). "
            "minildm does not overwrite files: delete it and run again."
        )
    progress(f"{label}: already verified, skipped")
    return True


def fetch(entry: ManifestEntry, target: Path, base_url: str, progress) -> None:
    """Download one file to TARGET.part (resuming what an earlier run left there), verify it, and
    only then give it its real name."""
    url = entry.url(base_url)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if entry.size is not None and have > entry.size:
        progress(
            f"  {part} has {have} bytes, more than the {entry.size} of the file: "
            "deleting it and starting over"
        )
        part.unlink()
        have = 0
    if entry.size is not None and have == entry.size:
        progress(f"  {part.name} is complete from an earlier run: checking it")
        received = have
        sha256 = hash_file(part).hexdigest()
    else:
        received, sha256 = receive(url, part, have, entry.size, progress)

    if entry.size is not None and received != entry.size:  # only a misbehaving server gets here
        part.unlink()
        raise DownloadError(
            f"{url} gave {received} bytes, the manifest expects {entry.size}; "
            "the download was deleted."
        )
    if entry.sha256 is not None and sha256 != entry.sha256:
        part.unlink()  # resuming a corrupt file would keep it corrupt
        raise DownloadError(
            f"{url} is not the expected file: its sha256 is {sha256}, "
            f"expected {entry.sha256} ({received} bytes). "
            "The download was deleted; run again to fetch it anew. "
            "If this repeats, the server's file differs from the one the manifest pins."
        )
    os.replace(part, target)  # atomic: the real name never holds a partial file
    if entry.sha256 is None:
        progress(
            f"  {target}: unverified, the manifest has no sha256 for it "
            f"(this file's sha256 is {sha256})"
        )
    else:
        progress(f"  {target}: verified ({received} bytes, sha256 as in the manifest)")


def receive(url: str, part: Path, have: int, size: int | None, progress) -> tuple[int, str]:
    """Append the file's bytes after the HAVE already in PART, asking the server to resume there.
    Returns the size of PART and its sha256. Raises DownloadError, keeping PART, if the transfer
    stops early."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"  # "send from byte HAVE to the end"
    kept = f" The {have} bytes received before are kept in {part}." if have else ""
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT
        )
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(http_error_message(e, url, part, have, size)) from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # no answer, or not HTTP. urllib wraps errors of the connection and the request in
        # URLError, but lets a timeout while waiting for the answer's headers through as it is.
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise DownloadError(
                f"{url} did not answer within {TIMEOUT} s: the server is overloaded or "
                f"unreachable. Check the network connection and run again.{kept}"
            ) from e
        raise DownloadError(
            f"could not reach {url}: {reason}. Check the network connection and run again.{kept}"
        ) from e

    with response:
        if have and response.status == 206:  # 206 Partial Content: the server resumes
            start = content_range_start(response)
            if start != have:
                raise DownloadError(
                    f"asked {url} to resume at byte {have}, but it sent bytes from {start}; "
                    f"{part} was left unchanged. Delete {part} to start over."
                )
            already = format_bytes(have)
            progress(f"  resuming after the {already} already in {part.name} (hashing them first)")
            mode = "ab"
        else:
            if have:
                progress(
                    "  the server ignored the request to resume "
                    f"(it answered {response.status}, not 206): starting over from byte 0"
                )
            have = 0
            mode = "wb"
        announced = announced_size(response, have)
        if size is not None and announced is not None and announced != size:
            raise DownloadError(
                f"{url} has {announced} bytes, but the manifest expects {size}: "
                "the server holds another file than the manifest describes. Nothing was written."
            )
        total = size if size is not None else announced
        free = shutil.disk_usage(part.parent).free
        if total is not None and total - have > free:
            raise DownloadError(
                f"{part.parent} has {format_bytes(free)} free, "
                f"the rest of {url} needs {format_bytes(total - have)}. "
                "Free some space (or choose another folder with --dir) and run again."
            )

        hasher = hashlib.sha256()
        if mode == "ab":
            hash_file(part, hasher)  # the sha256 covers the whole file, the kept bytes included
        received = have
        stopped = None  # the error that ended the transfer early, if one did
        too_long = False  # the server sent more than the manifest's size
        started = last_report = time.monotonic()
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        # read1 returns what has arrived (up to CHUNK), so every byte received
                        # is written at once; read(CHUNK) waits for a full chunk, and a server
                        # going silent meanwhile would take the bytes already received with it.
                        chunk = response.read1(CHUNK)
                    except (OSError, http.client.HTTPException) as e:  # a timeout, a reset
                        stopped = e
                        break
                    if not chunk:
                        break
                    if size is not None and received + len(chunk) > size:
                        # Only a body without Content-Length gets here (with one, the length
                        # was checked above and the reads stop there): stop reading, or a
                        # server that never ends would fill the disk.
                        too_long = True
                        break
                    f.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    if time.monotonic() - last_report >= REPORT_EVERY:
                        last_report = time.monotonic()
                        progress(
                            progress_line(received, total, received - have, last_report - started)
                        )
        except OSError as e:  # from open, write or close: the disk, not the network
            # a failed write may have stored part of its chunk: the file itself says how much
            on_disk = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"could not write {part} (it holds {on_disk} bytes now): {e}. "
                "Free some space (or choose another folder with --dir), then run the same "
                f"command again to resume from the bytes kept in {part}."
            ) from e
        progress(progress_line(received, total, received - have, time.monotonic() - started))
    if too_long:
        part.unlink()
        raise DownloadError(
            f"{url} sent more than the {size} bytes the manifest expects (it announced no "
            "length): the server holds another file than the manifest describes. "
            "The download was deleted."
        )
    if stopped is not None or (total is not None and received < total):
        if stopped is None:
            why = f"the connection to {url} ended after {received} of {total} bytes."
        elif isinstance(stopped, TimeoutError):
            why = f"{url} sent nothing for {TIMEOUT} s after {received} bytes."
        else:
            why = (
                f"the transfer of {url} stopped after {received} bytes "
                f"({type(stopped).__name__}: {stopped})."
            )
        if received == 0:  # an empty .part helps no resume
            part.unlink()
            raise DownloadError(f"{why} Nothing was received: run the same command again.")
        raise DownloadError(
            f"{why} The {received} bytes are kept in {part}: run the same command again to resume."
        )
    return received, hasher.hexdigest()


def http_error_message(
    e: urllib.error.HTTPError, url: str, part: Path, have: int, size: int | None
) -> str:
    """What an HTTP error answer means for a download, and what to do about it."""
    target = part.with_name(part.name.removesuffix(".part"))
    kept = (
        f"The {have} bytes received before are kept in {part}." if have else "Nothing was written."
    )
    if e.code in (401, 403):
        return (
            f"{url} answered HTTP {e.code} ({e.reason}): the repository may be gated "
            "(it asks you to log in and accept its license), and minildm sends no credentials. "
            f"Download the file in a browser and put it at {target}; a rerun then verifies it."
        )
    if e.code == 404:
        return (
            f"{url} answered HTTP 404 (not found): "
            "the repository, revision or path in the manifest is wrong, "
            f"or the file was removed from the hub. {kept} Compare the manifest's row for "
            "this file with the repository's files on the hub."
        )
    if e.code == 416:  # Range Not Satisfiable: there is nothing after byte HAVE
        if size is not None and have < size:
            return (
                f"{url} has no bytes after byte {have}, but the manifest expects {size}: "
                "the server holds another file than the manifest describes. "
                f"{part} was left unchanged. Compare the manifest's row for this file with "
                "the repository's files on the hub."
            )
        return (
            f"{url} has no bytes after byte {have}: {part} may already hold the whole file, "
            "but the manifest has no size to check that. Delete it and run again."
        )
    if 500 <= e.code < 600:
        return (
            f"{url} answered HTTP {e.code} ({e.reason}), a fault on the server's side that "
            f"often passes: run again later. {kept}"
        )
    return (
        f"{url} answered HTTP {e.code} ({e.reason}), which minildm cannot act on. {kept} "
        f"If a browser can fetch the file, put it at {target}; a rerun then verifies it."
    )


def content_range_start(response) -> int:
    """The first byte of a 206 answer, from its header `Content-Range: bytes START-END/TOTAL`."""
    value = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if match is None:
        raise DownloadError(
            "the server answered 206 (partial content) "
            f"with an unreadable Content-Range header {value!r}"
        )
    return int(match.group(1))


def announced_size(response, start: int) -> int | None:
    """The file's full size as the server announces it, or None if it does not say: the total of
    `Content-Range` for a 206 answer, START + `Content-Length` otherwise."""
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", "").strip())
    if response.status == 206 and match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def hash_file(path: Path, hasher=None):
    """Feed the bytes of PATH into HASHER (a new sha256 by default) and return it."""
    hasher = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher


def format_bytes(n: int) -> str:
    """Decimal units, as the hub shows sizes: 3438167534 -> '3.44 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def progress_line(received: int, total: int | None, new_bytes: int, seconds: float) -> str:
    rate = f"{format_bytes(int(new_bytes / seconds))}/s" if seconds > 0 else ""
    if total:
        share = 100 * received / total
        return f"  {share:5.1f}%  {format_bytes(received)} of {format_bytes(total)}  {rate}"
    return f"  {format_bytes(received)}  {rate}"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def manifest_listing(entries: list[ManifestEntry]) -> str:
    """`download --list`: each system with its hub repository, pinned commit, file count and
    size."""
    lines = []
    for system in dict.fromkeys(e.system for e in entries):
        files = [e for e in entries if e.system == system]
        known = sum(e.size for e in files if e.size is not None)
        unknown = sum(e.size is None for e in files)
        size = format_bytes(known) + (f" + {unknown} of unknown size" if unknown else "")
        revision = files[0].revision[:10]
        count = f"{len(files)} file{'s' * (len(files) > 1)}"
        lines.append(f"{system:24} {files[0].repo}@{revision}  {count}, {size}")
    return "\n".join(lines)


def main_list() -> int:
    """`python -m minildm download --list`: what the manifest holds, without downloading."""
    print(manifest_listing(read_manifest()))
    return 0


def main_download(name: str, directory: str) -> int:
    """`python -m minildm download NAME --dir DIRECTORY`. Returns the exit code: 0 when every
    file is in place and verified (or reported unverifiable), 1 after an error, printed on
    stderr."""
    try:
        # HUB_URL is read here, not bound as download's default when the module was imported,
        # so that a test pointing it at a local server reaches the command's code path too.
        paths = download(name, directory, base_url=HUB_URL)
    except (DownloadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: what was received is kept in .part files; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(f"done: {len(paths)} file(s) in {Path(directory) / name.partition('/')[0]}")
    return 0
