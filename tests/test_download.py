"""minildm.checkpoints.download against a real HTTP server on 127.0.0.1 that can resume, drop the connection,
corrupt a byte, ignore Range requests, answer HTTP errors, go silent, misreport lengths or never
stop; a disk that fills up; and the real weights_manifest.txt. No internet. The stalls end by
minildm.checkpoints.download.TIMEOUT, which the tests set to 0.5 s (it is 60 s)."""

import errno
import hashlib
import random
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import minildm
import minildm.checkpoints.download
from minildm.checkpoints.download import (
    OFFICIAL_FOLDERS,
    DownloadError,
    download,
    main_download,
    manifest_listing,
    official_or_tiny,
    read_manifest,
)

SD_UNET = (
    "unet/diffusion_pytorch_model.safetensors",
    3438167534,
    "145a07e0f05ec5bbe6e2e9faf608bdb311caf708895cac8c8ed713c59864e1e8",
)


class FakeHub:
    """What the test server serves, how it misbehaves, and what it was asked."""

    def __init__(self):
        self.files = {}  # URL path -> bytes
        self.requests = []  # (URL path, Range header or None), in order
        self.truncate_after = None  # send only this many bytes of the body, then hang up
        self.corrupt = False  # flip one byte in the middle of every file
        self.ignore_range = False  # answer 200 with the whole file even when asked for a range
        self.error = None  # answer every request for a file with this HTTP status code
        self.never_answer = False  # accept the connection, read the request, send nothing
        self.stall_after = None  # send the headers and this many body bytes, then go silent
        self.release = threading.Event()  # set to end every stall (at the latest at teardown)
        self.length_offset = 0  # added to the true Content-Length (a server that misreports it)
        self.omit_length = False  # no Content-Length: the body ends when the connection closes
        self.extra = b""  # bytes sent after the body, beyond what Content-Length announces
        self.endless = False  # after the body, keep sending bytes until the client hangs up
        self.wrong_range_start = False  # a 206 whose Content-Range says it starts at byte 0


def make_handler(hub: FakeHub):
    """A request handler serving HUB's files: 206 with Content-Range for a Range request, 200
    otherwise; misbehaving as HUB says."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked_range = self.headers.get("Range")
            hub.requests.append((self.path, asked_range))
            data = hub.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            if hub.error is not None:
                self.send_error(hub.error)
                return
            if hub.never_answer:
                hub.release.wait()
                return
            if hub.corrupt:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
            start = 0
            if asked_range and not hub.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", asked_range).group(1))
                self.send_response(206)
                first = 0 if hub.wrong_range_start else start
                self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if not hub.omit_length:  # the full length, even when truncating
                self.send_header("Content-Length", str(len(body) + hub.length_offset))
            self.end_headers()
            try:
                if hub.stall_after is not None:
                    self.wfile.write(body[: hub.stall_after])
                    hub.release.wait()
                    return
                self.wfile.write(body if hub.truncate_after is None else body[: hub.truncate_after])
                self.wfile.write(hub.extra)
                while hub.endless and not hub.release.is_set():
                    self.wfile.write(bytes(65536))
            except (BrokenPipeError, ConnectionResetError):  # the client hung up first
                pass

        def log_message(self, *args):  # keep the test output clean
            pass

    return Handler


WEIGHTS = random.Random(0).randbytes(300_000)
CONFIG = b'{"answer": 42}\n'
UNHASHED = random.Random(1).randbytes(50_000)
OTHER = random.Random(2).randbytes(1_000)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running fake hub with two systems, its manifest, a download folder and a progress log."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # never send the test's requests through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    ).start()
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}"

    rows = [
        ("toy", "test/toy", "0123abc", "weights.bin", str(len(WEIGHTS)), sha256(WEIGHTS), WEIGHTS),
        (
            "toy",
            "test/toy",
            "0123abc",
            "config/config.json",
            str(len(CONFIG)),
            sha256(CONFIG),
            CONFIG,
        ),
        ("toy", "test/toy", "0123abc", "unhashed.bin", "-", "-", UNHASHED),
        ("other", "test/other", "4567def", "model.bin", str(len(OTHER)), sha256(OTHER), OTHER),
    ]
    fake.manifest = tmp_path / "manifest.txt"
    fake.manifest.write_text(
        "# system repo revision path bytes sha256\n" + "".join(" ".join(r[:6]) + "\n" for r in rows)
    )
    for _system, repo, revision, path, *_, data in rows:
        fake.files[f"/{repo}/resolve/{revision}/{path}"] = data
    fake.dir = tmp_path / "weights"
    fake.log = []
    fake.download = lambda name: download(
        name, fake.dir, base_url=fake.base_url, progress=fake.log.append, manifest=fake.manifest
    )
    yield fake
    fake.release.set()
    server.shutdown()
    server.server_close()


def test_real_manifest_pins_the_sd_unet():
    entries = read_manifest()
    rows = {(e.system, e.path): e for e in entries}
    unet = rows["stable-diffusion-v1-4", SD_UNET[0]]
    assert (unet.repo, unet.revision) == (
        "CompVis/stable-diffusion-v1-4",
        "133a221b8aa7292a167afc5127cb63fb5005638b",
    )
    assert (unet.size, unet.sha256) == SD_UNET[1:]
    assert all(e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256) for e in entries)
    systems = {e.system for e in entries}
    assert systems == {
        "stable-diffusion-v1-4",
        "sd-v1-4-ckpt",
        "ldm-text2im-large-256",
        "ldm-celebahq-256",
        "vq-diffusion-ithq",
    }
    counts = {s: sum(e.system == s for e in entries) for s in sorted(systems)}
    print(f"weights_manifest.txt: {len(entries)} files, {counts}")


def test_lessons_read_the_official_folders_when_downloaded_else_the_tiny_models(tmp_path):
    systems = {entry.system for entry in read_manifest()}
    assert set(OFFICIAL_FOLDERS.values()) <= systems  # the names `download` puts there
    (tmp_path / "stable-diffusion-v1-4").mkdir()
    assert official_or_tiny("sd", tmp_path) == (tmp_path / "stable-diffusion-v1-4", False)
    for system in ("ldm", "ldm-uncond", "vq-diffusion"):
        assert official_or_tiny(system, tmp_path) == (minildm.TINY_MODELS[system], True)
    with pytest.raises(ValueError, match="unknown system 'sd2': expected one of sd, ldm"):
        official_or_tiny("sd2", tmp_path)


def test_the_listing_sums_each_system(tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(
        "# two systems, one size unknown\n"
        "toy test/toy 0123456789abcdef weights.bin 2000000 -\n"
        "toy test/toy 0123456789abcdef config.json 1000000 -\n"
        "other test/other main model.ckpt - -\n"
    )
    listing = manifest_listing(read_manifest(manifest)).splitlines()
    print("\n".join(listing))
    assert len(listing) == 2
    assert listing[0].split() == ["toy", "test/toy@0123456789", "2", "files,", "3.00", "MB"]
    assert listing[1].split() == [
        "other",
        "test/other@main",
        "1",
        "file,",
        "0",
        "B",
        "+",
        "1",
        "of",
        "unknown",
        "size",
    ]


def test_a_malformed_manifest_line_is_named(tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(
        "# comment\n\ntoy test/toy abc weights.bin 12 -\ntoy test/toy abc config.json 12\n"
    )
    with pytest.raises(ValueError, match=r"line 4: expected 6 columns.*found 5"):
        read_manifest(manifest)
    manifest.write_text("toy test/toy abc weights.bin 12 ABC\n")
    with pytest.raises(ValueError, match=r"line 1: expected the sha256 as 64 lowercase hex digits"):
        read_manifest(manifest)


def test_download_verifies_then_places_the_file(hub):
    [path] = hub.download("toy/weights.bin")
    assert path == hub.dir / "toy" / "weights.bin"
    assert path.read_bytes() == WEIGHTS
    assert not path.with_name("weights.bin.part").exists()
    assert hub.requests == [("/test/toy/resolve/0123abc/weights.bin", None)]
    assert any("verified" in line and "unverified" not in line for line in hub.log), hub.log
    assert any("100.0%" in line for line in hub.log), hub.log


def test_a_system_name_fetches_all_its_files(hub):
    paths = hub.download("toy")
    assert [p.relative_to(hub.dir).as_posix() for p in paths] == [
        "toy/weights.bin",
        "toy/config/config.json",
        "toy/unhashed.bin",
    ]
    assert (hub.dir / "toy" / "config" / "config.json").read_bytes() == CONFIG
    assert not (hub.dir / "other").exists()


def test_a_dropped_connection_keeps_the_part_and_a_rerun_resumes(hub):
    hub.truncate_after = 100_000
    with pytest.raises(
        DownloadError,
        match=r"ended after 100000 of 300000 bytes.*run the same command again to resume",
    ):
        hub.download("toy/weights.bin")
    part = hub.dir / "toy" / "weights.bin.part"
    assert part.read_bytes() == WEIGHTS[:100_000]
    assert not (hub.dir / "toy" / "weights.bin").exists()

    hub.truncate_after = None
    hub.download("toy/weights.bin")
    assert hub.requests[-1] == ("/test/toy/resolve/0123abc/weights.bin", "bytes=100000-")
    assert (hub.dir / "toy" / "weights.bin").read_bytes() == WEIGHTS
    assert not part.exists()
    assert any("resuming" in line for line in hub.log), hub.log


def test_a_server_ignoring_range_makes_the_download_start_over(hub):
    part = hub.dir / "toy" / "weights.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 100_000)  # wrong bytes: appending to them would fail the sha256 check
    hub.ignore_range = True
    hub.download("toy/weights.bin")
    assert hub.requests == [("/test/toy/resolve/0123abc/weights.bin", "bytes=100000-")]
    assert (hub.dir / "toy" / "weights.bin").read_bytes() == WEIGHTS
    assert any("starting over from byte 0" in line for line in hub.log), hub.log


def test_corrupt_bytes_are_deleted_and_reported(hub):
    hub.corrupt = True
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    bad = bytearray(WEIGHTS)
    bad[len(bad) // 2] ^= 0xFF
    assert f"sha256 is {sha256(bytes(bad))}, expected {sha256(WEIGHTS)}" in message
    assert f"{hub.base_url}/test/toy/resolve/0123abc/weights.bin" in message
    assert not (hub.dir / "toy" / "weights.bin.part").exists()
    assert not (hub.dir / "toy" / "weights.bin").exists()


def test_a_verified_file_in_place_is_skipped_without_a_request(hub):
    target = hub.dir / "toy" / "weights.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(WEIGHTS)
    assert hub.download("toy/weights.bin") == [target]
    assert hub.requests == []
    assert any("already verified" in line for line in hub.log), hub.log


def test_a_different_file_in_place_is_refused_not_overwritten(hub):
    target = hub.dir / "toy" / "weights.bin"
    target.parent.mkdir(parents=True)
    wrong = bytes(len(WEIGHTS))  # right size, wrong bytes
    target.write_bytes(wrong)
    with pytest.raises(
        DownloadError, match=r"its sha256 is .* expected .* delete it and run again"
    ):
        hub.download("toy/weights.bin")
    assert target.read_bytes() == wrong
    assert hub.requests == []


def test_a_complete_part_is_checked_and_placed_without_a_request(hub):
    part = hub.dir / "toy" / "weights.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS)  # e.g. interrupted between the last byte and the rename
    hub.download("toy/weights.bin")
    assert hub.requests == []
    assert (hub.dir / "toy" / "weights.bin").read_bytes() == WEIGHTS


@pytest.mark.parametrize(
    "value, refused", [("1", True), ("YES", True), ("0", False), ("false", False)]
)
def test_hf_hub_offline_refuses_before_any_request(hub, monkeypatch, value, refused):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    if not refused:
        hub.download("toy/weights.bin")
        assert len(hub.requests) == 1
        return
    with pytest.raises(
        DownloadError, match=r"(?s)HF_HUB_OFFLINE=.*toy/weights\.bin.*toy/config/config\.json"
    ):
        hub.download("toy")
    assert hub.requests == []
    assert not (hub.dir / "toy").exists()


def test_an_unknown_name_lists_what_is_known(hub):
    with pytest.raises(DownloadError, match=r"unknown name 'stable-diffusion'.*\(toy, other\)"):
        hub.download("stable-diffusion")
    with pytest.raises(DownloadError, match=r"(?s)toy has no file 'nope\.bin'.*weights\.bin"):
        hub.download("toy/nope.bin")
    assert hub.requests == []


def test_a_file_without_sha256_is_downloaded_and_reported_unverified(hub):
    [path] = hub.download("toy/unhashed.bin")
    assert path.read_bytes() == UNHASHED
    assert any("unverified" in line and sha256(UNHASHED) in line for line in hub.log), hub.log


def test_main_download_prints_the_error_and_returns_1(tmp_path, capsys):
    assert main_download("no-such-system", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: unknown name 'no-such-system'") and "stable-diffusion-v1-4" in err
    ), err


# ---------------------------------------------------------------------------------------------
# Faults: HTTP errors, silent servers, wrong lengths, wrong bytes, a failing disk. Each checks
# the error and its words, that nothing is under the final name, and what is left in the .part.
# ---------------------------------------------------------------------------------------------

URL = "/test/toy/resolve/0123abc/weights.bin"


def put(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_http_500_stops_with_a_clear_error_and_leaves_a_good_file_in_place_alone(hub):
    good = put(hub.dir / "toy" / "weights.bin", WEIGHTS)
    stamp = good.stat().st_mtime_ns
    hub.error = 500
    with pytest.raises(DownloadError) as error:
        hub.download("toy")  # weights.bin is in place; config/config.json gets the 500
    message = str(error.value)
    print(message)
    assert "config/config.json answered HTTP 500 (Internal Server Error)" in message
    assert "Nothing was written" in message and "run again later" in message
    assert hub.requests == [("/test/toy/resolve/0123abc/config/config.json", None)]
    assert good.read_bytes() == WEIGHTS and good.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (hub.dir / "toy" / "config").iterdir()) == []


def test_http_500_on_a_resume_keeps_the_part_for_the_next_run(hub):
    part = put(hub.dir / "toy" / "weights.bin.part", WEIGHTS[:100_000])
    hub.error = 503
    with pytest.raises(
        DownloadError,
        match=r"HTTP 503 \(Service Unavailable\).*The 100000 bytes received before are kept in ",
    ) as error:
        hub.download("toy/weights.bin")
    print(error.value)
    assert part.read_bytes() == WEIGHTS[:100_000]
    assert not (hub.dir / "toy" / "weights.bin").exists()

    hub.error = None
    hub.download("toy/weights.bin")
    assert hub.requests[-1] == (URL, "bytes=100000-")
    assert (hub.dir / "toy" / "weights.bin").read_bytes() == WEIGHTS


@pytest.mark.parametrize(
    "code, words",
    [
        (401, ["HTTP 401", "gated", "sends no credentials", "put it at {target}"]),
        (403, ["HTTP 403", "gated", "sends no credentials", "put it at {target}"]),
        (404, ["HTTP 404 (not found)", "the manifest", "Nothing was written"]),
        (410, ["HTTP 410 (Gone)", "Nothing was written"]),
    ],
)
def test_http_client_errors_say_what_they_mean(hub, code, words):
    target = hub.dir / "toy" / "weights.bin"
    hub.error = code
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(message)
    for word in words:
        assert word.format(target=target) in message, (word, message)
    assert not target.exists()
    assert not target.with_name("weights.bin.part").exists()


def test_http_416_on_a_resume_says_the_server_file_is_shorter_than_the_manifest(hub):
    # 416 (Range Not Satisfiable): the server's file ends before byte 100000, yet the manifest
    # says 300000. The .part may be right and the server wrong, so it is kept.
    part = put(hub.dir / "toy" / "weights.bin.part", WEIGHTS[:100_000])
    hub.error = 416
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(message)
    assert "has no bytes after byte 100000" in message
    assert "the manifest expects 300000" in message and "another file" in message
    assert "is longer" not in message  # the old text blamed the .part, which is shorter
    assert part.read_bytes() == WEIGHTS[:100_000]
    assert not (hub.dir / "toy" / "weights.bin").exists()


def stalled_download_error(hub, monkeypatch) -> str:
    """Download from a server set up to stall, with the timeout cut from 60 s to 0.5 s: it must
    end in a DownloadError within seconds, not hang. -> the error's message."""
    monkeypatch.setattr(minildm.checkpoints.download, "TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    seconds = time.monotonic() - started
    message = str(error.value)
    print(f"{seconds:.2f} s: {message}")
    assert seconds < 5
    return message


def test_a_server_that_never_answers_times_out(hub, monkeypatch):
    hub.never_answer = True
    message = stalled_download_error(hub, monkeypatch)
    assert "did not answer within 0.5 s" in message and "run again" in message
    assert not (hub.dir / "toy" / "weights.bin").exists()
    assert not (hub.dir / "toy" / "weights.bin.part").exists()


def test_a_server_that_goes_silent_after_the_headers_times_out(hub, monkeypatch):
    hub.stall_after = 0
    message = stalled_download_error(hub, monkeypatch)
    assert "sent nothing for 0.5 s after 0 bytes" in message
    assert not (hub.dir / "toy" / "weights.bin").exists()
    assert not (hub.dir / "toy" / "weights.bin.part").exists()  # an empty .part helps nobody


def test_a_server_that_goes_silent_mid_file_keeps_what_arrived_and_a_rerun_resumes(
    hub, monkeypatch
):
    hub.stall_after = 100_000
    message = stalled_download_error(hub, monkeypatch)
    assert "sent nothing for 0.5 s after 100000 bytes" in message
    assert "run the same command again to resume" in message
    part = hub.dir / "toy" / "weights.bin.part"
    assert part.read_bytes() == WEIGHTS[:100_000]  # every byte that arrived, none lost
    assert not (hub.dir / "toy" / "weights.bin").exists()

    hub.stall_after = None
    hub.release.set()
    hub.download("toy/weights.bin")
    assert hub.requests[-1] == (URL, "bytes=100000-")
    assert (hub.dir / "toy" / "weights.bin").read_bytes() == WEIGHTS


@pytest.mark.parametrize("offset", [1000, -1000])
def test_a_content_length_unlike_the_manifest_is_refused_before_writing(hub, offset):
    hub.length_offset = offset
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(message)
    assert f"has {300_000 + offset} bytes, but the manifest expects 300000" in message
    assert "Nothing was written" in message
    assert not (hub.dir / "toy" / "weights.bin").exists()
    assert not (hub.dir / "toy" / "weights.bin.part").exists()


def test_bytes_beyond_the_content_length_are_not_read(hub):
    hub.extra = b"trailing garbage"
    [path] = hub.download("toy/weights.bin")
    assert path.read_bytes() == WEIGHTS


def test_a_body_without_length_that_ends_short_is_kept_for_resume(hub):
    hub.omit_length = True
    hub.truncate_after = 100_000
    with pytest.raises(DownloadError, match=r"ended after 100000 of 300000 bytes.*to resume"):
        hub.download("toy/weights.bin")
    assert (hub.dir / "toy" / "weights.bin.part").read_bytes() == WEIGHTS[:100_000]
    assert not (hub.dir / "toy" / "weights.bin").exists()


def test_a_body_without_length_that_never_ends_is_cut_at_the_manifest_size(hub):
    hub.omit_length = True
    hub.endless = True  # before the fix, this filled the disk
    started = time.monotonic()
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(f"{time.monotonic() - started:.2f} s: {message}")
    assert "sent more than the 300000 bytes the manifest expects" in message
    assert "was deleted" in message
    assert not (hub.dir / "toy" / "weights.bin").exists()
    assert not (hub.dir / "toy" / "weights.bin.part").exists()


def test_a_resumed_file_with_a_wrong_sha256_is_deleted(hub):
    part = put(hub.dir / "toy" / "weights.bin.part", bytes(100_000))  # zeros, not WEIGHTS
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(message)
    spliced = bytes(100_000) + WEIGHTS[100_000:]
    assert f"sha256 is {sha256(spliced)}, expected {sha256(WEIGHTS)}" in message
    assert "run again to fetch it anew" in message
    assert hub.requests == [(URL, "bytes=100000-")]
    assert not part.exists()
    assert not (hub.dir / "toy" / "weights.bin").exists()


def test_a_resume_from_the_wrong_byte_is_refused(hub):
    part = put(hub.dir / "toy" / "weights.bin.part", WEIGHTS[:100_000])
    hub.wrong_range_start = True
    with pytest.raises(
        DownloadError, match=r"resume at byte 100000, but it sent bytes from 0.*left unchanged"
    ):
        hub.download("toy/weights.bin")
    assert part.read_bytes() == WEIGHTS[:100_000]
    assert not (hub.dir / "toy" / "weights.bin").exists()


def test_too_little_free_space_is_refused_before_writing(hub, monkeypatch):
    usage = shutil.disk_usage(".")._replace(free=1000)
    monkeypatch.setattr(minildm.checkpoints.download.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(DownloadError, match=r"has 1.00 kB free.*needs 300.00 kB.*--dir"):
        hub.download("toy/weights.bin")
    assert not (hub.dir / "toy" / "weights.bin").exists()
    assert not (hub.dir / "toy" / "weights.bin.part").exists()


class FullDisk:
    """A file that accepts LIMIT bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, file, limit):
        self.file = file
        self.limit = limit

    def write(self, data):
        room = self.limit - self.file.tell()
        if len(data) > room:  # a real disk writes what fits, then fails
            self.file.write(data[:room])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_disk_that_fills_up_mid_file_keeps_the_part_and_says_so(hub, monkeypatch):
    def open_on_a_small_disk(path, mode="r"):
        file = open(path, mode)
        return FullDisk(file, limit=100_000) if "b" in mode and mode != "rb" else file

    # download.py's `open` is looked up in its module first, then in builtins
    monkeypatch.setattr(minildm.checkpoints.download, "open", open_on_a_small_disk, raising=False)
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(message)
    part = hub.dir / "toy" / "weights.bin.part"
    assert f"could not write {part} (it holds 100000 bytes now)" in message
    assert "No space left on device" in message
    assert "free some space" in message.lower() and "to resume" in message
    assert part.read_bytes() == WEIGHTS[:100_000]  # what was written is kept for a resume
    assert not (hub.dir / "toy" / "weights.bin").exists()


def test_a_folder_that_cannot_be_made_is_a_clear_error(hub):
    hub.dir.write_text("a file where the download folder should be\n")
    with pytest.raises(DownloadError) as error:
        hub.download("toy/weights.bin")
    message = str(error.value)
    print(message)
    assert f"cannot create the folder {hub.dir / 'toy'}" in message and "--dir" in message
    assert hub.dir.read_text() == "a file where the download folder should be\n"
    assert hub.requests == []


def test_a_refused_connection_is_a_clear_error(hub):
    with socket.socket() as unused:  # a port with nobody listening: bound, then closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(DownloadError, match=r"could not reach http://127.0.0.1:\d+/.*refused"):
        download(
            "toy/weights.bin", hub.dir, f"http://127.0.0.1:{port}", hub.log.append, hub.manifest
        )
    assert not (hub.dir / "toy" / "weights.bin.part").exists()


def test_main_download_turns_a_fault_into_exit_code_1(hub, monkeypatch, capsys):
    monkeypatch.setattr(minildm.checkpoints.download, "MANIFEST", hub.manifest)
    monkeypatch.setattr(minildm.checkpoints.download, "HUB_URL", hub.base_url)
    monkeypatch.setattr(minildm.checkpoints.download, "TIMEOUT", 0.5)
    hub.never_answer = True
    assert main_download("toy/weights.bin", str(hub.dir)) == 1
    err = capsys.readouterr().err
    print(err)
    assert err.startswith("error: ") and "did not answer within 0.5 s" in err
    assert "Traceback" not in err
