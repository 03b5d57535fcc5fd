"""Tokenizers: ids identical to transformers' CLIPTokenizer and BertTokenizer on 300+ prompts."""

import json
from pathlib import Path

import pytest
import torch
from conftest import oracle, write_clip_hub_folder

from minildm.tokenizer import BERT_VOCAB_FILE, BertTokenizer, CLIPTokenizer

PROMPTS = json.loads((Path(__file__).parent / "data" / "prompts.json").read_text(encoding="utf-8"))


def reference_ids(reference, prompts):
    return reference(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def test_corpus_is_broad():
    assert len(PROMPTS) >= 300
    assert "" in PROMPTS and any(len(p) > 1000 for p in PROMPTS) and any("\t" in p for p in PROMPTS)


@pytest.mark.filterwarnings("ignore:prompt is longer")
@pytest.mark.parametrize("pad_token", [None, "!"])
def test_clip_ids_equal_transformers(tmp_path, pad_token):
    transformers = oracle("transformers")
    folder = write_clip_hub_folder(tmp_path / "tokenizer", pad_token)
    reference = transformers.CLIPTokenizer.from_pretrained(
        folder, model_max_length=77, **({"pad_token": pad_token} if pad_token else {})
    )
    ours = CLIPTokenizer.from_folder(folder)
    shipped = CLIPTokenizer(pad_token=pad_token or "<|endoftext|>")
    expected = reference_ids(reference, PROMPTS)
    got, got_shipped = ours(PROMPTS), shipped(PROMPTS)
    differing = [p for p, a, b in zip(PROMPTS, got, expected) if not torch.equal(a, b)]
    identical = len(PROMPTS) - len(differing)
    print(f"CLIP pad={pad_token or '<|endoftext|>'}: {identical}/{len(PROMPTS)} prompts identical")
    assert not differing, f"{len(differing)} prompts differ, e.g. {differing[:3]}"
    assert torch.equal(got_shipped, expected), (
        "the shipped BPE file gives other ids than the hub-style folder"
    )
    for prompt in PROMPTS[:50]:
        assert ours.encode(prompt) == reference(prompt).input_ids


@pytest.mark.filterwarnings("ignore:prompt is longer")
def test_bert_ids_equal_transformers(tmp_path):
    transformers = oracle("transformers")
    (tmp_path / "vocab.txt").write_bytes(BERT_VOCAB_FILE.read_bytes())
    reference = transformers.BertTokenizer.from_pretrained(tmp_path, model_max_length=77)
    expected = reference_ids(reference, PROMPTS)
    got = BertTokenizer()(PROMPTS)
    differing = [p for p, a, b in zip(PROMPTS, got, expected) if not torch.equal(a, b)]
    print(f"BERT: {len(PROMPTS) - len(differing)}/{len(PROMPTS)} prompts identical")
    assert not differing, f"{len(differing)} prompts differ, e.g. {differing[:3]}"
    assert torch.equal(BertTokenizer.from_folder(tmp_path)(PROMPTS[:20]), expected[:20])


def test_known_ids():
    # the ids transformers' CLIPTokenizer (openai/clip-vit-large-patch14) and BertTokenizer
    # (bert-base-uncased) give for the example prompts of the SD and LDM model cards
    clip_ids = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert CLIPTokenizer().encode("a photograph of an astronaut riding a horse") == clip_ids
    bert_ids = [101, 1037, 4169, 1997, 1037, 18197, 5983, 1037, 15890, 102]
    assert BertTokenizer().encode("A painting of a squirrel eating a burger") == bert_ids


def test_padding_tokens():
    clip_ids = CLIPTokenizer()(["a cat", ""])
    assert clip_ids.shape == (2, 77) and clip_ids.dtype == torch.long
    assert (
        clip_ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (clip_ids[0, 4:] == 49407).all()
    )
    assert (CLIPTokenizer(pad_token="!")("a cat")[0, 4:] == 0).all()
    bert_ids = BertTokenizer()("")
    assert bert_ids[0, :2].tolist() == [101, 102] and (bert_ids[0, 2:] == 0).all()


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_text():
    prompt = " ".join(["cat"] * 75 + ["zebra", "giraffe"])
    for tok, end in ((CLIPTokenizer(), 49407), (BertTokenizer(), 102)):
        with pytest.warns(UserWarning, match="'zebra giraffe'"):
            ids = tok([prompt])
        assert (
            ids.shape == (1, 77)
            and ids[0, -1].item() == end
            and ids[0, 1:76].tolist() == tok.encode("cat")[1:2] * 75
        )


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="prompt string or a list of strings"):
        CLIPTokenizer()([1, 2])
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(Path(__file__).parent)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BertTokenizer.from_folder(Path(__file__).parent)
