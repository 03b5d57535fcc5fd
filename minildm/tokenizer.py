"""Tokenizers: CLIP's byte-level BPE (SD, VQ-Diffusion) and BERT's uncased WordPiece (LDM).

Both are assembled from the `tokenizers` library's parts and the raw vocabulary files shipped in
`minildm/assets/`, so they work offline; both can also read a hub `tokenizer/` folder.

- CLIP (Radford et al. 2021, arXiv:2103.00020; openai/CLIP clip/simple_tokenizer.py): the
  vocabulary is derived from the BPE merges file exactly as the original does (256 byte symbols,
  the same with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`). Text is
  NFC-normalised, runs of whitespace become one space, and it is lower-cased; this matches
  transformers' `CLIPTokenizer` (our oracle). The original OpenAI tokenizer also runs `ftfy` and
  `html.unescape`, so it turns "&amp;" into "&" where transformers (and we) keep the entity as
  typed.
- BERT (Devlin et al. 2019, arXiv:1810.04805; bert-base-uncased): lower-casing, accent stripping,
  CJK characters split apart, then greedy longest-match WordPiece with `##` continuations.

Calling a tokenizer on prompts gives the fixed-length id tensor the text encoders take:
[start] tokens [end] [pad]..., 77 ids per prompt. Longer prompts are truncated with a warning that
names the text that was cut off.
"""

import gzip
import importlib.resources
import json
import re
import warnings
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

# The package's data folder (vocabularies, embedded models), found through importlib.resources: the
# installed copy after `pip install .`, wherever that is. A pathlib.Path for any package installed
# as files (pip never installs a zip).
ASSETS = importlib.resources.files("minildm") / "assets"
CLIP_BPE_FILE = ASSETS / "clip_bpe_simple_vocab_16e6.txt.gz"
BERT_VOCAB_FILE = ASSETS / "bert_base_uncased_vocab.txt"

MAX_LENGTH = 77  # the context length of every text encoder in minildm


def _pad_and_truncate(encodings, prompts, max_length: int, pad_id: int) -> torch.Tensor:
    """Stack encodings (each [start] tokens [end]) into a (B, max_length) LongTensor.

    A prompt with more than max_length - 2 tokens keeps its first tokens and its end token, the way
    transformers' `truncation=True` does, and the cut-off text is named in a warning.
    """
    rows = []
    for prompt, encoding in zip(prompts, encodings):
        ids = encoding.ids
        if len(ids) > max_length:
            first_dropped = encoding.offsets[max_length - 1][0]  # character offset in the prompt
            dropped = prompt[first_dropped:]
            shown = repr(dropped)
            if len(dropped) > 80:  # a megabyte-long prompt gets a line, not a megabyte
                shown = f"{dropped[:80]!r}... ({len(dropped)} characters)"
            warnings.warn(
                f"prompt is longer than {max_length} tokens ({len(ids)}); "
                f"this text was dropped: {shown}",
                stacklevel=3,
            )
            ids = ids[: max_length - 1] + ids[-1:]
        rows.append(ids + [pad_id] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)  # (B, max_length)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            f"expected a prompt string or a list of strings, got {type(prompts).__name__}"
        )
    for i, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # only a lone surrogate (U+D800..U+DFFF) fails to encode
            raise ValueError(
                f"prompt {i} contains a lone surrogate U+{ord(prompt[e.start]):04X} at character "
                f"{e.start}: pass valid Unicode text"
            ) from None
    return list(prompts)


def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are
    shifted to code points 256 and up, so every byte string becomes a string BPE can work on.
    The order of this dict is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer.

    pad_token: "<|endoftext|>" (id 49407) for Stable Diffusion, as the hub's tokenizer/ folder of
    CompVis/stable-diffusion-v1-4 says; "!" (id 0) for VQ-Diffusion, whose original code pads token
    ids with 0 (microsoft/VQ-Diffusion configs/ithq.yaml, `pad_value: 0`; diffusers'
    scripts/convert_vq_diffusion_to_diffusers.py builds the hub tokenizer with `pad_token="!"`).
    What the "!" pad does to a typed "!": docs/parity/tokenizers.md, "VQ-Diffusion pads with !".
    """

    START = "<|startoftext|>"
    END = "<|endoftext|>"
    NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the 262,144 in the file

    def __init__(
        self,
        vocab: dict | None = None,
        merges: list | None = None,
        pad_token: str = END,
        max_length: int = MAX_LENGTH,
    ):
        if (vocab is None) != (merges is None):
            raise ValueError(
                "give both vocab and merges, or neither (to use the shipped CLIP vocabulary)"
            )
        if vocab is None:
            vocab, merges = self._vocab_from_bpe_file(CLIP_BPE_FILE)
        for token in (self.START, self.END, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the vocabulary ({len(vocab)} entries)")
        self.vocab = vocab
        self.max_length = max_length
        self.pad_token = pad_token
        self.pad_id = vocab[pad_token]
        self.start_id = vocab[self.START]
        self.end_id = vocab[self.END]

        tok = Tokenizer(
            BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=self.END)
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        # CLIP's word pattern (openai/CLIP clip/simple_tokenizer.py, SimpleTokenizer.pat).
        # Everything it does not match (spaces) is dropped.
        words = (
            r"<\|startoftext\|>|<\|endoftext\|>"  # special tokens
            r"|'s|'t|'re|'ve|'m|'ll|'d"  # English contractions
            r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"  # letter runs, single digits, other symbols
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.post_processor = processors.TemplateProcessing(
            single=f"{self.START} $A {self.END}",
            special_tokens=[(self.START, self.start_id), (self.END, self.end_id)],
        )
        tok.decoder = decoders.ByteLevel()
        # Special tokens typed in a prompt stay one token each, as in the original and in
        # transformers. transformers also treats the pad token as special, so with VQ-Diffusion's
        # pad "!" every typed "!" becomes id 0 instead of a BPE token ("!!!" -> 0 0 0): a quirk of
        # the reference we keep (docs/parity/tokenizers.md, "VQ-Diffusion pads with !").
        tok.add_special_tokens(list(dict.fromkeys([self.START, self.END, pad_token])))
        self._tokenizer = tok
        self.added = {}  # whole-word tokens added after the vocabulary (add_tokens): {token: id}

    def add_tokens(self, tokens: list) -> list:
        """Add whole-word tokens, such as a textual-inversion placeholder "<pink>", with the next
        free ids; each is matched in the (lower-cased) text before BPE splits it. -> their ids.

        A placeholder with several vectors is added as "<pink>", "<pink>_1", ...; a prompt's
        "<pink>" then stands for all of them, in order, as in diffusers (`maybe_convert_prompt`)
        and AUTOMATIC1111's web UI."""
        for token in tokens:
            taken = [t for t in (token, token + "</w>") if t in self.vocab or t in self.added]
            if taken:
                raise ValueError(
                    f"the token {token!r} is already in the vocabulary (as {taken[0]!r}): a "
                    "placeholder must be a new word; choose another, such as '<my-concept>'"
                )
            if token != token.lower() or not token.strip() or token != token.strip():
                raise ValueError(
                    f"the token {token!r} must be lower-case, without surrounding spaces: the "
                    "tokenizer lower-cases prompts before it looks for added tokens"
                )
        start = len(self.vocab) + len(self.added)
        self._tokenizer.add_tokens(list(tokens))
        ids = [self._tokenizer.token_to_id(token) for token in tokens]
        assert ids == list(range(start, start + len(tokens))), ids
        self.added.update(zip(tokens, ids))
        return ids

    def __len__(self) -> int:
        return len(self.vocab) + len(self.added)

    def expand_placeholders(self, text: str) -> str:
        """ "<pink>" -> "<pink> <pink>_1 <pink>_2" for a placeholder added with three vectors."""
        for token in self.added:
            names = [token]
            while f"{token}_{len(names)}" in self.added:
                names.append(f"{token}_{len(names)}")
            if len(names) > 1:  # "<pink>" alone, not the "<pink>" inside "<pink>_1"
                text = re.sub(re.escape(token) + r"(?!_\d)", " ".join(names), text)
        return text

    @staticmethod
    def _vocab_from_bpe_file(path: Path):
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        # line 0 is "#version"
        merges = [tuple(line.split()) for line in lines[1 : 1 + CLIPTokenizer.NUM_MERGES]]
        symbols = list(bytes_to_unicode().values())
        tokens = (
            symbols
            + [s + "</w>" for s in symbols]
            + ["".join(pair) for pair in merges]
            + [CLIPTokenizer.START, CLIPTokenizer.END]
        )
        return {token: i for i, token in enumerate(tokens)}, merges

    @classmethod
    def from_folder(cls, folder, max_length: int | None = None) -> "CLIPTokenizer":
        """Read a hub `tokenizer/` folder: vocab.json, merges.txt, the pad token if one is named,
        and the padded length (`model_max_length` of tokenizer_config.json, 77 when absent)."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder} has no {name}: "
                    "expected a CLIP tokenizer folder (vocab.json + merges.txt)"
                )
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merge_lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [
            tuple(line.split()) for line in merge_lines if line and not line.startswith("#version")
        ]
        max_length = max_length or _model_max_length(folder)
        return cls(
            vocab,
            merges,
            pad_token=_special_token(folder, "pad_token") or cls.END,
            max_length=max_length,
        )

    def encode(self, text: str) -> list:
        """Token ids of one text with the start and end tokens, neither padded nor truncated."""
        _as_prompt_list(text)  # the same checks (a str, valid Unicode) as for a call
        return self._tokenizer.encode(self.expand_placeholders(text)).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids)).replace("</w>", " ").strip()

    def __call__(self, prompts) -> torch.Tensor:
        prompts = [self.expand_placeholders(p) for p in _as_prompt_list(prompts)]
        return _pad_and_truncate(
            self._tokenizer.encode_batch(prompts), prompts, self.max_length, self.pad_id
        )  # (B, 77)


class BertTokenizer:
    """bert-base-uncased WordPiece tokenizer, the LDM text-to-image model's: the model_index.json
    of CompVis/ldm-text2im-large-256 names a transformers BertTokenizer, its tokenizer/vocab.txt is
    bert-base-uncased's, and the original code loads `BertTokenizerFast.from_pretrained(
    "bert-base-uncased")` (CompVis/latent-diffusion ldm/modules/encoders/modules.py,
    BERTTokenizer)."""

    CLS = "[CLS]"
    SEP = "[SEP]"
    PAD = "[PAD]"
    UNK = "[UNK]"

    def __init__(self, vocab_file=BERT_VOCAB_FILE, max_length: int = MAX_LENGTH):
        tokens = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()  # the file ends with a newline
        vocab = {token: i for i, token in enumerate(tokens)}
        for token in (self.CLS, self.SEP, self.PAD, self.UNK):
            if token not in vocab:
                raise ValueError(f"{vocab_file} lacks {token}: expected a BERT vocab.txt")
        self.vocab = vocab
        self.max_length = max_length
        self.pad_id = vocab[self.PAD]

        tok = Tokenizer(WordPiece(vocab, unk_token=self.UNK))  # words over 100 characters: [UNK]
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{self.CLS} $A {self.SEP}",
            special_tokens=[(self.CLS, vocab[self.CLS]), (self.SEP, vocab[self.SEP])],
        )
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens([self.CLS, self.SEP, self.PAD, self.UNK, "[MASK]"])
        self._tokenizer = tok

    @classmethod
    def from_folder(cls, folder, max_length: int = MAX_LENGTH) -> "BertTokenizer":
        """Read a hub `tokenizer/` folder (vocab.txt)."""
        folder = Path(folder)
        if not (folder / "vocab.txt").is_file():
            raise FileNotFoundError(f"{folder} has no vocab.txt: expected a BERT tokenizer folder")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("do_lower_case", True) is False:
            raise ValueError(
                f"{config_file} asks for a cased tokenizer; "
                "minildm's BertTokenizer is the uncased one LDM uses"
            )
        return cls(folder / "vocab.txt", max_length=max_length)

    def encode(self, text: str) -> list:
        """Token ids of one text with [CLS] and [SEP], neither padded nor truncated."""
        _as_prompt_list(text)
        return self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids))

    def __call__(self, prompts) -> torch.Tensor:
        prompts = _as_prompt_list(prompts)
        return _pad_and_truncate(
            self._tokenizer.encode_batch(prompts), prompts, self.max_length, self.pad_id
        )  # (B, 77)


def _special_token(folder: Path, name: str) -> str | None:
    """A special token named in special_tokens_map.json or tokenizer_config.json (a string or
    {"content": ...})."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _model_max_length(folder: Path) -> int:
    """The padded length a tokenizer folder asks for. Official folders say 77; the embedded
    teaching models use shorter contexts (their captions are at most 13 tokens), as transformers
    would read."""
    path = folder / "tokenizer_config.json"
    value = None
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    if value is None or value > 10**6:  # transformers writes a huge sentinel for "no limit"
        return MAX_LENGTH
    if not isinstance(value, int) or value < 2:
        raise ValueError(
            f"{path}: model_max_length must be an integer >= 2 (start + end token), got {value!r}"
        )
    return value
