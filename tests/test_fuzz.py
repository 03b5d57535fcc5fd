"""Fuzzing (hypothesis, fixed seeds): the tokenizers on arbitrary Unicode and the weight readers
on random, truncated and bit-flipped files answer with ids or their own clear error, never a raw
exception from the libraries underneath (issue 13)."""

import atexit
import collections
import os
import pickle
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import oracle, write_clip_hub_folder
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from minildm.tokenizer import BERT_VOCAB_FILE, BertTokenizer, CLIPTokenizer
from minildm.weights import CheckpointError, read_state_dict

# st.characters() leaves out the surrogates U+D800..U+DFFF; they are mixed back in, alone
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.one_of(  # half the texts valid Unicode, half with surrogates likely
    st.text(st.characters(), max_size=60),
    st.text(st.one_of(st.characters(), SURROGATES), max_size=60),
)
# damaged pickles name odd protocol numbers, and long random texts are truncated: both warn
pytestmark = pytest.mark.filterwarnings(
    "ignore:Detected pickle protocol", "ignore:prompt is longer"
)
TMP = Path(tempfile.mkdtemp(prefix="minildm-fuzz-"))  # function fixtures are not reset per example
atexit.register(shutil.rmtree, TMP, True)


@lru_cache
def tokenizers(kind):
    transformers = oracle("transformers")
    if kind == "clip":
        folder = write_clip_hub_folder(TMP / "clip")
        reference = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)
        return CLIPTokenizer(), reference, 49408
    (TMP / "bert").mkdir(exist_ok=True)
    (TMP / "bert" / "vocab.txt").write_bytes(BERT_VOCAB_FILE.read_bytes())
    reference = transformers.BertTokenizer.from_pretrained(TMP / "bert", model_max_length=77)
    return BertTokenizer(), reference, 30522


def check_tokenizer(kind, text, counts):
    ours, reference, vocab_size = tokenizers(kind)
    try:
        ids = ours(text)
    except ValueError as e:
        assert "lone surrogate" in str(e)
        counts["ValueError (lone surrogate)"] += 1
        return
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ((0 <= ids) & (ids < vocab_size)).all()
    try:
        expected = reference(
            [text], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
    except Exception as e:  # noqa: BLE001 - the oracle's failure is only counted
        counts[f"ids; transformers raised {type(e).__name__}"] += 1
        return
    assert torch.equal(ids, expected), text
    counts["ids equal to transformers'"] += 1


COUNTS = collections.defaultdict(collections.Counter)


def report(name, counts):
    print(f"\n{name}: {sum(counts.values())} examples: {dict(counts)}")


def test_clip_tokenizer_on_any_text():
    @settings(derandomize=True, max_examples=1000, deadline=None)
    @given(TEXT)
    def run(text):
        check_tokenizer("clip", text, COUNTS["clip"])

    run()
    report("CLIPTokenizer", COUNTS["clip"])


def test_bert_tokenizer_on_any_text():
    @settings(derandomize=True, max_examples=1000, deadline=None)
    @given(TEXT)
    def run(text):
        check_tokenizer("bert", text, COUNTS["bert"])

    run()
    report("BertTokenizer", COUNTS["bert"])


# --- weight readers -----------------------------------------------------------------------------

ORIGINAL = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.arange(5), "c": torch.ones(2, 2)}


@lru_cache
def valid_file(kind) -> bytes:
    path = TMP / f"valid.{kind}"
    if kind == "safetensors":
        save_file(ORIGINAL, path)
    elif kind == "ckpt":  # torch.save's zip archive
        torch.save({"state_dict": ORIGINAL}, path)
    else:  # .pt: the legacy (pre-zip) pickle format; its storage keys are object ids, so these
        # bytes (and the outcome counts of flips in them) differ a little from run to run
        torch.save(ORIGINAL, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def read_damaged(kind, data: bytes, damage: str, counts):
    path = TMP / f"damaged.{kind}"
    path.write_bytes(data)
    try:
        tensors = read_state_dict(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        counts[f"{damage}: CheckpointError"] += 1
        return
    assert damage == "flipped", f"{damage} file loaded"  # random or cut bytes never load
    same = tensors.keys() == ORIGINAL.keys() and all(
        tensors[k].dtype == v.dtype and torch.equal(tensors[k], v) for k, v in ORIGINAL.items()
    )
    # A flip inside tensor bytes changes values undetectably: no format here has a checksum that
    # the readers check. The result is still a dict of tensors, for the strict load to judge.
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    counts[f"flipped: loaded, {'identical' if same else 'values or names differ'}"] += 1


def damaged_bytes(kind):
    original = valid_file(kind)
    cut = st.integers(0, len(original) - 1).map(lambda n: ("cut", original[:n]))
    flips = st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 7)), min_size=1)

    def flip(positions):
        data = bytearray(original)
        for i, bit in positions:
            data[i] ^= 1 << bit
        return ("flipped", bytes(data))

    noise = st.binary(max_size=400).map(lambda b: ("random", b))
    prefix = st.binary(max_size=400).map(lambda b: ("random", original[:8] + b))
    return st.one_of(cut, flips.map(flip), noise, prefix)


def fuzz_reader(kind):
    counts = COUNTS[kind]

    @settings(derandomize=True, max_examples=1000, deadline=None)
    @given(damaged_bytes(kind))
    def run(case):
        damage, data = case
        read_damaged(kind, data, damage, counts)

    run()
    report(f"read_state_dict(.{kind})", counts)


def test_safetensors_reader_on_damaged_files():
    fuzz_reader("safetensors")


def test_zip_checkpoint_reader_on_damaged_files():
    fuzz_reader("ckpt")


def test_legacy_pickle_reader_on_damaged_files():
    fuzz_reader("pt")


class MakesMarker:
    def __reduce__(self):
        return (os.system, (f"touch {TMP / 'marker'}",))


def test_hostile_pickles_are_refused_and_run_nothing():
    import zipfile

    payload = pickle.dumps({"w": [1.0], "x": MakesMarker()}, protocol=2)
    (TMP / "evil.ckpt").write_bytes(payload)
    (TMP / "evil.bin").write_bytes(payload)
    with zipfile.ZipFile(TMP / "evil.pt", "w") as z:  # torch.save's layout, the pickle swapped
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    torch.save({"w": torch.ones(1), "x": MakesMarker()}, TMP / "evil_torch.pth")
    for name in ("evil.ckpt", "evil.bin", "evil.pt", "evil_torch.pth"):
        try:
            read_state_dict(TMP / name)
            raise AssertionError(f"{name} loaded")
        except CheckpointError as e:
            assert "system" in str(e) and "never unpickles" in str(e)
            print(f"{name}: refused: {str(e)[:120]}")
    assert not (TMP / "marker").exists()


def test_tokenizer_errors_name_the_prompt_and_character():
    for tokenizer in (CLIPTokenizer(), BertTokenizer()):
        with pytest.raises(ValueError, match=r"prompt 1 .* U\+D800 at character 5: pass valid"):
            tokenizer(["fine", "a cat\ud800"])
        with pytest.raises(ValueError, match="lone surrogate"):
            tokenizer.encode("\udfff")
        for bad in (b"a cat", 3, None, ["a", b"b"]):
            with pytest.raises(TypeError, match="expected a prompt string or a list of strings"):
                tokenizer(bad)
