"""checkpoints/weights.py and checkpoints/load.py: reading every format safely, finding files,
refusing bad input clearly."""

import json
import os
import pickle
import sys
import types

import pytest
import torch
from conftest import clip_hub_layout, randomize_
from safetensors.torch import save_file

import minildm
from minildm.checkpoints.weights import (
    CheckpointError,
    find_weights_file,
    hf_hub_cache,
    read_state_dict,
    resolve_repo,
)
from minildm.clip import CLIPTextConfig, CLIPTextModel

TINY = CLIPTextConfig(width=32, layers=2, heads=4, mlp_width=64)
TINY_JSON = {
    "architectures": ["CLIPTextModel"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}


def tiny_state() -> dict:
    """A tiny CLIP's weights in the hub layout (text_model. prefix, as transformers 4 saved
    them)."""
    return {
        k: v.clone()
        for k, v in clip_hub_layout(randomize_(CLIPTextModel(TINY)).state_dict()).items()
    }


def component_folder(path, state=None, filename="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_JSON))
    state = state if state is not None else tiny_state()
    save_file(state, path / filename) if filename.endswith(".safetensors") else torch.save(
        state, path / filename
    )
    return path


# --- formats ------------------------------------------------------------------------------------


def test_safetensors_is_memory_mapped(tmp_path):
    state = {"a": torch.randn(1000, 100), "b": torch.arange(5)}
    save_file(state, tmp_path / "w.safetensors")
    loaded = read_state_dict(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a"], state["a"]) and loaded["b"].dtype == torch.long
    # tensors point into one mapped storage of the file's size, not into freshly allocated copies
    storage = loaded["a"].untyped_storage()
    assert storage.nbytes() >= os.path.getsize(tmp_path / "w.safetensors") - 1000


def test_sharded_safetensors(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert find_weights_file(tmp_path).name == "model.safetensors.index.json"
    loaded = read_state_dict(tmp_path / "model.safetensors.index.json")
    assert sorted(loaded) == ["a", "b"] and loaded["b"].shape == (3,)
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks 1 tensors its index promises"):
        read_state_dict(tmp_path / "model.safetensors.index.json")


def save_compvis_style_checkpoint(path, state_dict):
    """What a PyTorch-Lightning checkpoint pickles besides weights: a callback object (its class
    under pytorch_lightning's name, faked here) and numpy scalars."""
    import numpy as np

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score, self.monitor = np.float64(0.25), "val/loss"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    sys.modules.update({name: module for name in names})
    try:
        torch.save(
            {
                "epoch": 6,
                "global_step": np.int64(470000),
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {
                    ModelCheckpoint: {"best_model_score": np.float64(0.5)},
                    "checkpoint": ModelCheckpoint(),
                },
                "state_dict": state_dict,
            },
            path,
        )
    finally:
        for name in names:
            del sys.modules[name]


def test_compvis_checkpoint_with_lightning_and_numpy_globals(tmp_path):
    state = {"model.diffusion_model.w": torch.randn(3, 3), "scale_factor": torch.tensor(0.18215)}
    save_compvis_style_checkpoint(tmp_path / "sd.ckpt", state)
    assert "pytorch_lightning" not in sys.modules
    loaded = read_state_dict(tmp_path / "sd.ckpt")
    assert loaded.keys() == state.keys() and torch.equal(
        loaded["model.diffusion_model.w"], state["model.diffusion_model.w"]
    )
    assert "pytorch_lightning" not in sys.modules  # the named class was never imported


@pytest.mark.parametrize("container", ["model", "ema"])
def test_vq_diffusion_style_containers(tmp_path, container):
    torch.save({container: {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ithq.pth")
    assert list(read_state_dict(tmp_path / "ithq.pth")) == ["w"]


def test_choosing_a_container(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}, tmp_path / "both.pth")
    assert read_state_dict(tmp_path / "both.pth")["w"].sum() == 2  # "model" comes first by default
    assert read_state_dict(tmp_path / "both.pth", container="ema")["w"].sum() == 0
    with pytest.raises(
        CheckpointError, match=r"no 'state_dict' entry holding weights; found \['ema', 'model'\]"
    ):
        read_state_dict(tmp_path / "both.pth", container="state_dict")


MARKER = "minildm_pickle_ran_code"


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_pickle_with_a_global_off_the_allow_list_is_refused_and_nothing_runs(
    tmp_path, monkeypatch, how
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    if how == "torch.save":
        torch.save({"w": torch.ones(1), "payload": RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": RunsCode()}, protocol=2))
    with pytest.raises(
        CheckpointError, match=r"refers to the Python object (posix|os)\.system.*never unpickles"
    ):
        read_state_dict(path)
    assert not (tmp_path / MARKER).exists()


def test_zero_byte_and_truncated_safetensors(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"\(0 bytes\) is not a complete safetensors file.*download it again"
    ):
        read_state_dict(tmp_path / "empty.safetensors")
    save_file({"w": torch.randn(100, 100)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="probably truncated"):
        read_state_dict(tmp_path / "cut.safetensors")


def test_text_file_named_ckpt(tmp_path):
    (tmp_path / "model.ckpt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:fe4e...\nsize 4265380512\n"
    )
    with pytest.raises(
        CheckpointError,
        match=r"is not a PyTorch checkpoint \(it starts with b'version.*Git LFS pointer",
    ):
        read_state_dict(tmp_path / "model.ckpt")
    (tmp_path / "notes.ckpt").write_text("just some notes")
    with pytest.raises(
        CheckpointError,
        match=r"is not a PyTorch checkpoint \(it starts with b'just some notes'\)\.$",
    ):
        read_state_dict(tmp_path / "notes.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        read_state_dict(tmp_path / "empty.ckpt")


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.ones(1), "note": "hello"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"entries \['note'\].*not tensors"):
        read_state_dict(tmp_path / "mixed.pt")


# --- folders ------------------------------------------------------------------------------------


def test_weights_file_choice_in_a_folder(tmp_path):
    for name in [
        "pytorch_model.bin",
        "model.safetensors",
        "model.fp16.safetensors",
        "pytorch_model.fp16.bin",
        "diffusion_pytorch_model.non_ema.bin",
        "notes.txt",
        "model.safetensors.bak",
        "training_args.bin",
    ]:
        (tmp_path / name).write_bytes(b"x")
    assert find_weights_file(tmp_path).name == "model.safetensors"
    assert find_weights_file(tmp_path, variant="fp16").name == "model.fp16.safetensors"
    assert (
        find_weights_file(tmp_path, variant="non_ema").name == "diffusion_pytorch_model.non_ema.bin"
    )
    (tmp_path / "model.safetensors").unlink()
    assert find_weights_file(tmp_path).name == "pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=r"no variant 'bf16' \(files named \*.bf16.\*\)"):
        find_weights_file(tmp_path, variant="bf16")


def test_load_component_output_matches_the_weights(tmp_path):
    state = tiny_state()
    model = minildm.load_component(component_folder(tmp_path / "text_encoder", state))
    assert isinstance(model, CLIPTextModel) and model.config == TINY and not model.training
    assert torch.equal(model.final_norm.bias, state["text_model.final_layer_norm.bias"])


def test_unknown_class_and_missing_config(tmp_path):
    folder = component_folder(tmp_path / "unet")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(
        CheckpointError,
        match=r"names class 'UNet3DConditionModel'; minildm can load \['AutoencoderKL', "
        r"'CLIPTextModel', 'LDMBertModel', 'LearnedClassifierFreeSamplingEmbeddings', "
        r"'StableDiffusionSafetyChecker', 'Transformer2DModel', 'UNet2DConditionModel', "
        r"'UNet2DModel', 'VQModel'\]",
    ):
        minildm.load_component(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(CheckpointError, match="names no class"):
        minildm.load_component(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        minildm.load_component(folder)


# --- the Hugging Face cache ---------------------------------------------------------------------


def fake_hub_cache(
    cache,
    repo="CompVis/stable-diffusion-v1-4",
    commit="133a221b8aa7292a167afc5127cb63fb5005638b",
    symlinks=True,
):
    """The tree huggingface_hub writes: blobs/, refs/main, snapshots/COMMIT/ with symlinks into
    blobs (or plain copies, as on file systems without symlinks)."""
    repo_folder = cache / ("models--" + repo.replace("/", "--"))
    source = component_folder(cache.parent / "source" / "text_encoder")
    snapshot = repo_folder / "snapshots" / commit / "text_encoder"
    snapshot.mkdir(parents=True)
    (repo_folder / "blobs").mkdir()
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)
    for file in source.iterdir():
        blob = repo_folder / "blobs" / (file.name + ".blob")
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot)) if symlinks else (
            snapshot / file.name
        ).write_bytes(file.read_bytes())
    return repo_folder


def tree_listing(folder):
    return sorted((str(p), p.lstat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("symlinks", [True, False])
def test_repo_id_found_in_the_hub_cache_without_writing_to_it(tmp_path, monkeypatch, symlinks):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    repo_folder = fake_hub_cache(tmp_path / "cache", symlinks=symlinks)
    before = tree_listing(repo_folder)
    model = minildm.load_component("CompVis/stable-diffusion-v1-4/text_encoder")
    assert isinstance(model, CLIPTextModel)
    assert (
        resolve_repo(
            "CompVis/stable-diffusion-v1-4", "133a221b8aa7292a167afc5127cb63fb5005638b"
        ).name
        == "133a221b8aa7292a167afc5127cb63fb5005638b"
    )
    assert tree_listing(repo_folder) == before
    with pytest.raises(
        FileNotFoundError, match=r"no snapshot for revision 'fp16'.*cached refs: \['main'\]"
    ):
        resolve_repo("CompVis/stable-diffusion-v1-4", "fp16")
    with pytest.raises(
        FileNotFoundError,
        match=r"neither a local folder nor in the Hugging Face cache .*Fetch it with "
        r"`python -m minildm download ldm-celebahq-256 --dir weights`",
    ):
        minildm.load_component("CompVis/ldm-celebahq-256/unet")


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hf_hub_cache() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hf_hub_cache() == tmp_path / "new"
