"""minildm.download against a real HTTP server on 127.0.0.1 that can resume, drop the connection,
corrupt a byte or ignore Range requests; and the real weights_manifest.txt. No internet."""

import hashlib
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minildm.download import DownloadError, download, main_download, manifest_listing, read_manifest

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


def make_handler(hub: FakeHub):
    """A request handler serving HUB's files: 206 with Content-Range for a Range request, 200
    otherwise."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked_range = self.headers.get("Range")
            hub.requests.append((self.path, asked_range))
            data = hub.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            if hub.corrupt:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
            start = 0
            if asked_range and not hub.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", asked_range).group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header(
                "Content-Length", str(len(body))
            )  # the full length, even when truncating
            self.end_headers()
            self.wfile.write(body if hub.truncate_after is None else body[: hub.truncate_after])

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
