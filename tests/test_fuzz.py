"""Fuzzing (hypothesis, fixed seeds): the tokenizers on arbitrary Unicode, the weight readers
on random, truncated and bit-flipped files, and every key map on checkpoints with keys dropped,
renamed, added or reshaped answer with ids, the right weights, or their own clear error naming the
key, never a raw exception from the libraries underneath (issue 13). 2,000 examples per tokenizer
and per reader, 100 per key-map layout (50 for the SD single file); about 40 s alone."""

import atexit
import collections
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

import pytest
import torch
from conftest import oracle, randomize_, write_clip_hub_folder
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import minildm
from minildm import autoencoder, clip, ldm_bert, unet, vq_transformer
from minildm.checkpoints import autoencoder as autoencoder_checkpoints
from minildm.checkpoints import clip as clip_checkpoints
from minildm.checkpoints import ldm_bert as ldm_bert_checkpoints
from minildm.checkpoints import unet as unet_checkpoints
from minildm.checkpoints import vq_transformer as vq_transformer_checkpoints
from minildm.checkpoints.load import SCHEDULE_BUFFERS
from minildm.checkpoints.weights import (
    CheckpointError,
    legacy_attention_name,
    read_config,
    read_state_dict,
)
from minildm.pipelines.stable_diffusion import StableDiffusionPipeline
from minildm.tokenizer import BERT_VOCAB_FILE, BertTokenizer, CLIPTokenizer

# per layout; the single file is saved and split each time (about 7 times the cost of one model)
KEY_MAP_EXAMPLES = 100
SINGLE_FILE_EXAMPLES = 50

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
    @settings(derandomize=True, max_examples=2000, deadline=None)
    @given(TEXT)
    def run(text):
        check_tokenizer("clip", text, COUNTS["clip"])

    run()
    report("CLIPTokenizer", COUNTS["clip"])


def test_bert_tokenizer_on_any_text():
    @settings(derandomize=True, max_examples=2000, deadline=None)
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
    return {"cut or random": st.one_of(cut, noise, prefix), "flipped": flips.map(flip)}


def fuzz_reader(kind, damage):
    """1,000 examples of one kind of damage; two properties per reader, 2,000 examples in all."""
    counts = COUNTS[kind, damage]

    @settings(derandomize=True, max_examples=1000, deadline=None)
    @given(damaged_bytes(kind)[damage])
    def run(case):
        damage, data = case
        read_damaged(kind, data, damage, counts)

    run()
    report(f"read_state_dict(.{kind}), {damage}", counts)


@pytest.mark.parametrize("damage", ["cut or random", "flipped"])
def test_safetensors_reader_on_damaged_files(damage):
    fuzz_reader("safetensors", damage)


@pytest.mark.parametrize("damage", ["cut or random", "flipped"])
def test_zip_checkpoint_reader_on_damaged_files(damage):
    fuzz_reader("ckpt", damage)


@pytest.mark.parametrize("damage", ["cut or random", "flipped"])
def test_legacy_pickle_reader_on_damaged_files(damage):
    fuzz_reader("pt", damage)


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


# --- key maps -----------------------------------------------------------------------------------
# A correct checkpoint of a small model in each layout minildm reads, then one mutation: keys
# dropped, one renamed (a typo or a wrong prefix), a stray key added, or one tensor reshaped. The
# loader must refuse it with a CheckpointError that names the key (for a shape: both shapes), or
# load exactly the right weights (another spelling of the same name, a 1x1 conv for a Linear). A
# stray key may pass unnamed only when the key map drops it by name as a known extra (DESIGN.md,
# Weights and key maps: every key of the checkpoint is used).

ASSETS = Path(minildm.__file__).parent / "assets"


@dataclass
class Layout:
    load: Callable  # checkpoint -> {our name: tensor} of the module(s) it loaded
    checkpoint: dict  # {file key: tensor}: a correct checkpoint in this layout
    names: dict  # {file key of a parameter: the names an error may call it by (file's and ours)}
    expected: dict  # {our name: tensor}: what loading `checkpoint` gives
    extras: tuple = ()  # regexes (full match) of keys the key map drops by name


def state_of(module, prefix=""):
    return {prefix + k: v for k, v in module.state_dict().items()}


def renamed_layout(model, to_file, conv_attention=False) -> tuple:
    """(checkpoint, names): `model`'s tensors under `to_file(our name)`. conv_attention: attention
    projection weights as 1x1 convs [C, C, 1, 1], as the original autoencoders store them."""
    checkpoint, names = {}, {}
    for ours, tensor in model.state_dict().items():
        if conv_attention and "attention" in ours and ours.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        checkpoint[to_file(ours)] = tensor.contiguous()
        names[to_file(ours)] = (to_file(ours), ours)
    return checkpoint, names


def module_layout(model, load, to_file, conv_attention=False, extras=()) -> Layout:
    checkpoint, names = renamed_layout(model, to_file, conv_attention)
    return Layout(lambda c: state_of(load(c)), checkpoint, names, state_of(model), extras)


def tiny(model_class, config):
    return randomize_(model_class(config)).eval()


def asset_config(config_from_diffusers, folder):
    return config_from_diffusers(read_config(ASSETS / folder))


def clip_layout(transformers_5: bool) -> Layout:
    config = replace(
        asset_config(clip_checkpoints.text_config_from_diffusers, "tiny-sd/text_encoder"),
        vocab_size=64,
    )
    model = tiny(clip.CLIPTextModel, config)

    def to_file(name):  # transformers 5 saves without the hub files' `text_model.` prefix
        hub = clip_checkpoints.transformers_name(name)
        return hub.removeprefix("text_model.") if transformers_5 else hub

    load = partial(clip_checkpoints.load_clip_text_model, config)
    return module_layout(model, load, to_file, extras=tuple(clip_checkpoints.DROPPED_KEYS))


def ldm_bert_layout(original: bool) -> Layout:
    from test_ldm_bert import original_layout  # the x-transformers names, written independently

    config = replace(
        asset_config(ldm_bert_checkpoints.config_from_diffusers, "tiny-ldm/bert"), vocab_size=64
    )
    model = tiny(ldm_bert.LDMBert, config)
    load = partial(ldm_bert_checkpoints.load_ldm_bert, config)
    if not original:
        return module_layout(
            model,
            load,
            ldm_bert_checkpoints.diffusers_name,
            extras=tuple(ldm_bert_checkpoints.DROPPED_KEYS),
        )
    # original_layout renames keys and keeps values: given our names as values, it pairs them
    file_to_ours = original_layout(
        {ldm_bert_checkpoints.diffusers_name(k): k for k in model.state_dict()}
    )
    ours_to_file = {ours: file for file, ours in file_to_ours.items()}
    return module_layout(
        model, load, ours_to_file.get, extras=tuple(ldm_bert_checkpoints.DROPPED_KEYS)
    )


def autoencoder_layout(folder, layout) -> Layout:
    config = asset_config(autoencoder_checkpoints.config_from_diffusers, folder)
    model = tiny(autoencoder.VQModel if config.is_vq else autoencoder.AutoencoderKL, config)
    levels = len(config.channels)
    to_file = {
        "diffusers": autoencoder_checkpoints.diffusers_name,
        "diffusers 2022": lambda k: legacy_attention_name(
            autoencoder_checkpoints.diffusers_name(k)
        ),
        "CompVis": lambda k: (
            "first_stage_model." + autoencoder_checkpoints.original_name(k, levels)
        ),
    }[layout]
    load = partial(autoencoder_checkpoints.load_autoencoder, config)
    conv = layout != "diffusers"
    return module_layout(model, load, to_file, conv, tuple(autoencoder_checkpoints.DROPPED_KEYS))


def unet_layout(folder, layout) -> Layout:
    config = asset_config(unet_checkpoints.config_from_diffusers, folder)
    model = tiny(unet.UNet, config)
    load = partial(unet_checkpoints.load_unet, config)
    if layout == "diffusers":
        return module_layout(model, load, lambda k: unet_checkpoints.diffusers_name(k, config))
    if layout == "diffusers 2022":  # the CelebA-HQ hub file's names
        return module_layout(
            model, load, lambda k: legacy_attention_name(unet_checkpoints.diffusers_name(k, config))
        )
    # CompVis openaimodel; the self-attention blocks' q, k and v fused in one Conv1d `qkv`
    from test_unet import original_layout

    checkpoint = original_layout(model)
    ours = {
        "model.diffusion_model." + unet_checkpoints.original_name(k, config): k
        for k in state_of(model)
    }
    names = {}
    for key in checkpoint:
        parts = [key.replace(".qkv.", f".{p}.") for p in "qkv"] if ".qkv." in key else [key]
        names[key] = (key, *(ours[part] for part in parts))
    return Layout(lambda c: state_of(load(c)), checkpoint, names, state_of(model))


def vq_transformer_layout(original: bool) -> Layout:
    from test_vq_transformer import original_name  # from diffusers' conversion script

    config = asset_config(
        vq_transformer_checkpoints.config_from_diffusers, "tiny-vq-diffusion/transformer"
    )
    model = tiny(vq_transformer.VQTransformer, config)

    def to_file(name):  # original: ithq_learnable.pth's transformer, as split_original_checkpoint
        if original:  # gives it
            return "transformer.transformer." + original_name(
                vq_transformer_checkpoints.diffusers_name(name)
            )
        return vq_transformer_checkpoints.diffusers_name(name)

    return module_layout(
        model, partial(vq_transformer_checkpoints.load_vq_transformer, config), to_file
    )


def single_file_layout() -> Layout:
    """An original Stable Diffusion file (sd-v1-4.ckpt's layout, as .safetensors) through
    `StableDiffusionPipeline.from_single_file`: the three models and the extras the real file holds
    (the schedule's scale factor, the EMA counters, CLIP's position ids)."""
    unet_config = asset_config(unet_checkpoints.config_from_diffusers, "tiny-sd/unet")
    vae_config = asset_config(autoencoder_checkpoints.config_from_diffusers, "tiny-sd/vae")
    clip_config = replace(
        asset_config(clip_checkpoints.text_config_from_diffusers, "tiny-sd/text_encoder"),
        vocab_size=64,
    )
    models = {
        "unet": tiny(unet.UNet, unet_config),
        "vae": tiny(autoencoder.AutoencoderKL, vae_config),
        "text_encoder": tiny(clip.CLIPTextModel, clip_config),
    }
    levels = len(vae_config.channels)
    parts = [
        renamed_layout(
            models["unet"],
            lambda k: "model.diffusion_model." + unet_checkpoints.original_name(k, unet_config),
        ),
        renamed_layout(
            models["vae"],
            lambda k: "first_stage_model." + autoencoder_checkpoints.original_name(k, levels),
            conv_attention=True,
        ),
        renamed_layout(
            models["text_encoder"],
            lambda k: "cond_stage_model.transformer." + clip_checkpoints.transformers_name(k),
        ),
    ]
    checkpoint = {k: v for part, _ in parts for k, v in part.items()}
    names = {k: v for _, part in parts for k, v in part.items()}
    extras = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None],
        "scale_factor": torch.tensor(0.18215),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(470000),
    }
    checkpoint |= extras
    path = TMP / "sd-v1-tiny.safetensors"

    def load(checkpoint):
        save_file(checkpoint, path)
        pipe = StableDiffusionPipeline.from_single_file(
            path, unet_config=unet_config, vae_config=vae_config, text_encoder_config=clip_config
        )
        return {k: v for part in models for k, v in state_of(getattr(pipe, part), part).items()}

    expected = {k: v for part, model in models.items() for k, v in state_of(model, part).items()}
    # known extras: the schedule buffers, EMA counters, the position ids
    extras = tuple(re.escape(k) for k in (*SCHEDULE_BUFFERS, *extras))
    return Layout(load, checkpoint, names, expected, extras)


LAYOUTS = {
    "CLIPTextModel, hub (text_model.*)": partial(clip_layout, transformers_5=False),
    "CLIPTextModel, transformers 5 (no prefix)": partial(clip_layout, transformers_5=True),
    "LDMBert, diffusers (model.*)": partial(ldm_bert_layout, original=False),
    "LDMBert, CompVis (cond_stage_model.transformer.*)": partial(ldm_bert_layout, original=True),
    "AutoencoderKL, diffusers": partial(autoencoder_layout, "tiny-sd/vae", "diffusers"),
    "AutoencoderKL, diffusers 2022 names, 1x1 convs": partial(
        autoencoder_layout, "tiny-sd/vae", "diffusers 2022"
    ),
    "VQModel, diffusers": partial(autoencoder_layout, "tiny-ldm-uncond/vqvae", "diffusers"),
    "VQModel, CompVis (first_stage_model.*)": partial(
        autoencoder_layout, "tiny-ldm-uncond/vqvae", "CompVis"
    ),
    "UNet (cross-attention), diffusers": partial(unet_layout, "tiny-sd/unet", "diffusers"),
    "UNet (self-attention), diffusers 2022 names": partial(
        unet_layout, "tiny-ldm-uncond/unet", "diffusers 2022"
    ),
    "UNet (self-attention), CompVis, fused qkv": partial(
        unet_layout, "tiny-ldm-uncond/unet", "CompVis"
    ),
    "VQTransformer, diffusers": partial(vq_transformer_layout, original=False),
    "VQTransformer, microsoft (transformer.transformer.*)": partial(
        vq_transformer_layout, original=True
    ),
    "Stable Diffusion single file (CompVis)": single_file_layout,
}


@lru_cache
def layout(name) -> Layout:
    return LAYOUTS[name]()


PREFIXES = ["module.", "model.", "text_model.", "vae.", "unet.", "transformer.", "_orig_mod."]
PREFIXES += ["first_stage_model.", "model.diffusion_model.", "cond_stage_model.transformer."]
PREFIXES += ["model_ema."]
STRAY_NAMES = st.from_regex(r"[a-z_]{1,10}(\.[a-z0-9_]{1,8}){0,3}", fullmatch=True)


def mutations(keys):
    """(kind, what) pairs: the mutations drawn for a checkpoint with parameter keys `keys`, the
    four kinds equally often."""
    key = st.sampled_from(sorted(keys))
    drop = st.lists(key, min_size=1, max_size=3, unique=True)
    typo = st.builds(
        typo_name, key, st.integers(0, 10**3), st.sampled_from("aex019._"), st.integers(0, 2)
    )
    prefix = st.builds(prefixed_name, key, st.sampled_from(PREFIXES + [""]), st.booleans())
    stray = st.one_of(  # an unknown name, a known key's name with one more part, or under a prefix
        STRAY_NAMES,
        st.tuples(key, STRAY_NAMES).map(".".join),
        st.tuples(st.sampled_from(PREFIXES), STRAY_NAMES).map("".join),
    )
    stray_shape = st.lists(st.integers(1, 4), max_size=3)
    reshape = st.tuples(key, st.sampled_from(["grow", "add dim", "flatten", "1x1"]), st.integers())
    kinds = {
        "drop": drop,
        "rename": st.one_of(typo, prefix),
        "stray": st.tuples(stray, stray_shape),
        "reshape": reshape,
    }
    return st.sampled_from(sorted(kinds)).flatmap(lambda kind: kinds[kind].map(lambda w: (kind, w)))


def typo_name(key, position, character, edit):
    """(key, its misspelling): one character replaced, inserted or deleted."""
    i = position % len(key)
    if edit == 0:
        return key, key[:i] + character + key[i + 1 :]
    if edit == 1:
        return key, key[:i] + character + key[i:]
    return key, key[:i] + key[i + 1 :]


def prefixed_name(key, prefix, swap):
    """(key, the key under a wrong prefix): `prefix` put before it, or (swap) put in place of its
    first part ("" then drops that part)."""
    first, _, rest = key.partition(".")
    return key, (prefix + rest if swap else prefix + key)


def reshaped(tensor, how, dim):
    if how == "grow" or tensor.ndim == 0:  # one dimension one longer, the values all new
        shape = list(tensor.shape) or [1]
        shape[dim % len(shape)] += 1
        return torch.full(shape, 0.5)
    if how == "add dim":
        return tensor[..., None]
    if how == "flatten":
        return tensor.reshape(-1) if tensor.ndim > 1 else tensor.reshape(1, -1)
    # a Linear weight as a 1x1 conv, or the other way round
    if tensor.ndim == 2:
        return tensor[:, :, None, None]
    if tensor.ndim > 2 and all(n == 1 for n in tensor.shape[2:]):
        return tensor.reshape(tensor.shape[:2])
    return tensor[..., None]


def shape_text(tensor):
    return str(tuple(tensor.shape))


def check_mutation(layout, mutation, counts):
    kind, what = mutation
    checkpoint = dict(layout.checkpoint)
    must_name = []  # an error must name one of these
    if kind == "drop":
        for key in what:
            del checkpoint[key]
        must_name = [name for key in what for name in layout.names[key]]
    elif kind == "rename":
        old, new = what
        if new == old:
            return
        checkpoint[new] = checkpoint.pop(old)
        must_name = [new, *layout.names[old]]
    elif kind == "stray":
        name, shape = what
        if name in checkpoint:
            return
        checkpoint[name] = torch.zeros(shape)
        must_name = [name]
    else:
        key, how, dim = what
        checkpoint[key] = reshaped(checkpoint[key], how, dim).contiguous()
        must_name = list(layout.names[key])
        wanted_shapes = [shape_text(layout.checkpoint[key])]  # the shape before, in file or module
        ours = layout.names[key][1:]
        for name, tensor in layout.expected.items():
            if name in ours or name.partition(".")[2] in ours:  # "unet." etc. in the single file
                wanted_shapes.append(shape_text(tensor))
    try:
        loaded = layout.load(checkpoint)
    except CheckpointError as e:
        message = str(e)
        assert any(name in message for name in must_name), f"{mutation}: {message}"
        if kind == "reshape":  # a 1x1 conv's trailing dimensions may be dropped before comparing
            new = checkpoint[key]
            squeezed = (
                new.reshape(new.shape[:2]) if new.ndim > 2 and new[0, 0].numel() == 1 else new
            )
            assert shape_text(new) in message or shape_text(squeezed) in message, message
            assert any(shape in message for shape in wanted_shapes), f"{mutation}: {message}"
        counts[f"{kind}: CheckpointError naming it"] += 1
        return
    # Loaded: only right if every parameter holds exactly its value in the correct checkpoint.
    assert kind != "drop", f"{mutation}: loaded without {what}"
    same = loaded.keys() == layout.expected.keys() and all(
        torch.equal(v, layout.expected[k]) for k, v in loaded.items()
    )
    assert same, f"{mutation}: loaded, but the weights are not those of the file"
    if kind == "stray":
        assert any(re.fullmatch(p, what[0]) for p in layout.extras), f"{what[0]} passed unnamed"
        counts["stray: dropped by name as a known extra"] += 1
    elif kind == "rename":
        counts["rename: loaded, same weights (another spelling of the name)"] += 1
    else:
        counts[f"reshape: loaded, same weights ({what[1]})"] += 1


@pytest.mark.parametrize("name", LAYOUTS)
def test_key_map_on_damaged_state_dicts(name):
    counts = COUNTS[name]
    this = layout(name)
    assert this.load(this.checkpoint).keys() == this.expected.keys()  # the correct one loads

    examples = SINGLE_FILE_EXAMPLES if "single file" in name else KEY_MAP_EXAMPLES

    @settings(derandomize=True, max_examples=examples, deadline=None)
    @given(mutations(this.names))
    def run(mutation):
        check_mutation(this, mutation, counts)

    run()
    report(f"key map of {name}", counts)
