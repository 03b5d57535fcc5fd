"""Weight files: finding them, reading them safely, and loading them into a module strictly.

This file knows file formats and folder layouts, never a model. The files beside it
(`checkpoints/clip.py`, `checkpoints/ldm_bert.py`, ...) describe how official key names map onto
each model's attribute names as a few regex rules and call `remap_keys` and `load_into` from here.

Formats read:
- `.safetensors`: memory-mapped by the safetensors library, so a tensor's bytes are read from disk
  only when used and are not copied while loading (the module's parameters *are* the mapped
  tensors).
- sharded safetensors: a `*.safetensors.index.json` whose `weight_map` names the shard of each key.
- `.bin` / `.ckpt` / `.pt` / `.pth` pickles: `torch.load(weights_only=True)` only. Original CompVis
  checkpoints also pickle a PyTorch-Lightning callback and numpy scalars next to the weights; those
  globals are allowed by exact name and rebuilt as an inert stand-in object, never imported or run.

Folders read:
- a diffusers / transformers component folder (`config.json` plus one weights file);
- a Hugging Face hub cache that already holds a repo (`models--org--name/snapshots/COMMIT/...`),
  found without huggingface_hub and never written to.
"""

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from minildm.checkpoints.download import read_manifest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the module."""


# ---------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------


def read_state_dict(path, container: str | None = None) -> dict:
    """Return the {name: tensor} dict stored in `path` (safetensors, sharded index, or pickle).

    container: for a pickled training checkpoint, the entry holding the weights ("state_dict",
    "model", "ema"); by default the first of those present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.name.endswith(".index.json"):
        return _read_sharded_safetensors(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in WEIGHT_SUFFIXES:
        return _unwrap_checkpoint(_read_pickle(path), path, container)
    raise CheckpointError(
        f"{path}: unknown weights format; "
        f"expected one of {', '.join(WEIGHT_SUFFIXES)} or *.index.json"
    )


# What torch, safetensors, zipfile and pickle raise underneath on damaged bytes (found by fuzzing,
# tests/test_fuzz.py): all become one CheckpointError that names the file.
_LIBRARY_ERRORS = (
    RuntimeError,
    AssertionError,  # torch.load checks some of a legacy pickle's structure with `assert`
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
    struct.error,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # memory-mapped: no bytes are copied here
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, *_LIBRARY_ERRORS) as e:
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is not a complete safetensors file ({e}). "
            "It is probably truncated by an interrupted download: delete it and download it again."
        ) from None


def _read_sharded_safetensors(index_path: Path) -> dict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index_path}: expected a JSON object with a 'weight_map' ({e})"
        ) from None
    if type(weight_map) is not dict or not all(type(f) is str for f in weight_map.values()):
        raise CheckpointError(
            f"{index_path}: weight_map must be an object of tensor names to shard file names"
        )
    for shard in set(weight_map.values()):
        # by its name, not where it resolves: the Hugging Face cache links every file to a blob
        if os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] in ("..", "."):
            raise CheckpointError(
                f"{index_path}: weight_map names {shard!r}, outside the index's folder; the "
                "shards of a checkpoint lie beside its index"
            )
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _read_safetensors(index_path.parent / shard)
        wanted = {name for name, file in weight_map.items() if file == shard}
        absent = wanted - tensors.keys()
        if absent:
            raise CheckpointError(
                f"{shard} lacks {len(absent)} tensors its index promises, e.g. {sorted(absent)[:3]}"
            )
        state_dict.update({name: tensors[name] for name in wanted})
    return state_dict


class _InertStandIn:
    """What a CompVis checkpoint's Lightning callback or numpy scalar becomes: an object with no
    state.

    `torch.load(weights_only=True)` refuses any global not allowed by name. Original checkpoints
    (sd-v1-4.ckpt, the LDM model.ckpt files) pickle training bookkeeping next to the weights; we let
    exactly those names through, but bind them to this class, so nothing they name is imported or
    run.
    """

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        pass


# The globals of sd-v1-4.ckpt besides tensors: the pickle imports the Hugging Face hub lists for
# the file in CompVis/stable-diffusion-v-1-4-original. numpy >= 2 spells the scalar's module
# `numpy._core`; older checkpoints `numpy.core`.
_ALLOWED_CHECKPOINT_GLOBALS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
]


def read_pickle(path, stand_ins: list = ()):
    """The object a `.pt`/`.bin`/`.ckpt` pickle holds, whatever it is (a training checkpoint, an
    embedding file's dict of names, steps and tensors), read as `read_state_dict` reads one:
    `torch.load(weights_only=True)`, with CompVis' bookkeeping bound to an inert stand-in, and
    `stand_ins` [(class, "module.Global")] binding more globals by exact name to classes of the
    caller's (checkpoints/embeddings.py: the ParameterDict of 2022 textual-inversion files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return _read_pickle(path, list(stand_ins))


def _read_pickle(path: Path, extra_stand_ins: list = ()):
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): delete it and download it again")
    stand_ins = [(_InertStandIn, name) for name in _ALLOWED_CHECKPOINT_GLOBALS]
    stand_ins += list(extra_stand_ins)
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the global it refused
        if refused:
            raise CheckpointError(
                f"{path} refers to the Python object {refused.group(1)}, "
                "which a weights file does not need. "
                "minildm never unpickles arbitrary objects (that can run code). "
                "If you trust the file, convert it to .safetensors with the tool that made it."
            ) from None
        raise _not_a_checkpoint(path, e) from None
    except CheckpointError:
        raise
    except _LIBRARY_ERRORS as e:  # what torch.load raises on other or damaged bytes
        raise _not_a_checkpoint(path, e) from None


# torch.save's legacy (non-zip) files open with the pickled magic number 0x1950a86a20f9469cfc6c
# (torch/serialization.py, MAGIC_NUMBER): protocol 2, then a 10-byte long
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _not_a_checkpoint(path: Path, error: Exception) -> CheckpointError:
    if _is_zip(path):  # a zip archive (torch.save's format) that torch cannot read
        return CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is a damaged PyTorch checkpoint "
            f"({type(error).__name__}: {str(error)[:200]}). It may be truncated by an interrupted "
            "download: delete it and download it again."
        )
    with open(path, "rb") as f:
        start = f.read(24)
    if start.startswith(LEGACY_MAGIC):  # torch.save's pre-1.6 format, damaged after its header
        return CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is a damaged PyTorch checkpoint in the legacy "
            f"format ({type(error).__name__}: {str(error)[:200]}). It may be truncated by an "
            "interrupted download: delete it and download it again."
        )
    lfs = ""
    if start.startswith(b"version https://git-lfs"):
        lfs = " It is a Git LFS pointer: fetch the real file (git lfs pull)."
    return CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {start!r}).{lfs}")


def _is_zip(path: Path) -> bool:
    # torch.save writes zip archives since 1.6; mmap needs one. Older pickles are read into memory.
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _unwrap_checkpoint(obj, path: Path, container: str | None) -> dict:
    """Find the {name: tensor} dict inside a training checkpoint.

    Lightning saves {"state_dict": ...}; microsoft/VQ-Diffusion saves {"model": ...} and, in its
    EMA files, {"ema": ...} too (image_synthesis/engine/solver.py, Solver.save). A plain state dict
    is returned as is.
    """
    if container is not None:
        if not isinstance(obj, dict) or not isinstance(obj.get(container), dict):
            found = (
                sorted(str(k) for k in obj.keys()) if isinstance(obj, dict) else type(obj).__name__
            )
            raise CheckpointError(
                f"{path} has no {container!r} entry holding weights; found {found}"
            )
        obj = obj[container]
    else:
        for name in ("state_dict", "model", "ema"):
            if isinstance(obj, dict) and isinstance(obj.get(name), dict):
                obj = obj[name]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path}: expected a dict of tensors (or one under 'state_dict'/'model'/'ema'), "
            f"found {type(obj).__name__}"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(str(k) for k in obj.keys() - tensors.keys())
    if others:
        raise CheckpointError(
            f"{path}: entries {others[:5]} ({len(others)} in all) are not tensors; "
            "expected a state dict"
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# Folders: a component folder, and the Hugging Face cache
# ---------------------------------------------------------------------------------------------


def find_weights_file(folder, variant: str | None = None) -> Path:
    """The weights file of a diffusers/transformers component folder.

    Hub folders hold e.g. `model.safetensors`, `pytorch_model.bin`, `model.fp16.safetensors` and
    `diffusion_pytorch_model.non_ema.bin` side by side: `variant` picks the `*.{variant}.*` files,
    and safetensors (memory-mapped, no code in them) is preferred over a pickle.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    # rank: safetensors (a sharded index before a single file), then .bin, then other pickles
    rank = {
        ".safetensors.index.json": 0,
        ".safetensors": 1,
        ".bin": 2,
        ".ckpt": 3,
        ".pt": 3,
        ".pth": 3,
    }
    candidates = []
    for file in folder.iterdir():
        kind = next((k for k in rank if file.name.endswith(k)), None)
        if kind is None:
            continue
        # "model.fp16" -> "model", "fp16"
        stem, _, file_variant = file.name[: -len(kind)].partition(".")
        if (
            stem in ("model", "pytorch_model", "diffusion_pytorch_model")
            and (file_variant or None) == variant
        ):
            candidates.append((rank[kind], file.name, file))
    if not candidates:
        present = sorted(f.name for f in folder.iterdir())
        wanted = f"variant {variant!r} (files named *.{variant}.*)" if variant else "a weights file"
        raise FileNotFoundError(f"{folder} holds no {wanted}; found {present}")
    return min(candidates)[2]


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: expected a diffusers or transformers component folder"
        )
    return read_json(path)


def read_json(path: Path) -> dict:
    """A config file of a component or pipeline folder; broken JSON is reported with the file's name
    (json's own error names only a line and column)."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}): fix the file, or download the folder again"
        ) from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a JSON {type(content).__name__}, expected an object")
    return content


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, by the environment variables huggingface_hub reads."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def download_hint(name_or_path) -> str:
    """How to fetch what `name_or_path` names with minildm's own `download` command: a folder named
    after a system of weights_manifest.txt ("weights/stable-diffusion-v1-4"), or a repo id listed
    there ("CompVis/stable-diffusion-v1-4")."""
    path = Path(str(name_or_path).rstrip("/"))
    systems = {}  # system -> its repo, in manifest order
    for entry in read_manifest():
        systems.setdefault(entry.system, entry.repo)
    for system, repo in systems.items():
        if str(path) == repo:  # a repo id: its files go to weights/SYSTEM
            return (
                f"Fetch it with `python -m minildm download {system} --dir weights`, then pass "
                f"--weights weights/{system}."
            )
    for system in systems:
        if path.name == system:  # a folder named after the system: fetch it there
            into = path.parent
            return (
                f"Fetch it with `python -m minildm download {system} --dir {into}`, then pass "
                f"--weights {path}."
            )
    return (
        "`python -m minildm download --list` lists the official systems minildm can fetch; pass the "
        "folder it writes."
    )


def resolve_repo(repo_id: str, revision: str = "main") -> Path:
    """The snapshot folder of `org/name` in the local Hugging Face cache (read only, never
    downloads).

    The cache stores `models--org--name/refs/REVISION` (a file holding a commit hash) and
    `models--org--name/snapshots/COMMIT/` (the files, as symlinks into blobs/ or as plain copies).
    """
    cache = hf_hub_cache()
    repo_folder = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_folder.is_dir():
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face cache ({cache}). "
            + download_hint(repo_id)
        )
    ref = repo_folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_folder / "snapshots" / commit
    if not snapshot.is_dir():
        known = (
            sorted(p.name for p in (repo_folder / "refs").glob("*"))
            if (repo_folder / "refs").is_dir()
            else []
        )
        raise FileNotFoundError(
            f"{repo_id} has no snapshot for revision {revision!r} in {cache}; cached refs: {known}"
        )
    return snapshot


def resolve_folder(name_or_path) -> Path:
    """A local folder as is, or `org/name` looked up in the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        return resolve_repo(str(name_or_path))
    raise FileNotFoundError(
        f"{name_or_path} does not exist (expected a folder or a hub repo id like 'org/name'). "
        + download_hint(name_or_path)
    )


# --- The 2022 diffusers attention blocks in weight files --------------------------------------
# diffusers' AttentionBlock of 2022 (models/attention.py) named its projections
# query/key/value/proj_attn; the official hub files of the autoencoders and of the CelebA-HQ UNet
# were saved with it and still carry those names (modern diffusers renames them on load, in
# ModelMixin._fix_state_dict_keys_on_load): docs/parity/models.md, 2022 attention names and
# 1x1-conv weights in hub files.
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def legacy_attention_name(diffusers_name: str) -> str:
    """A modern diffusers name -> its 2022 AttentionBlock spelling (unchanged if it has none)."""
    for new, old in LEGACY_ATTENTION_NAMES.items():
        diffusers_name = diffusers_name.replace(f".{new}.", f".{old}.")
    return diffusers_name


_ATTENTION_WEIGHT = re.compile(r".*attention(s\.\d+)?\.(q|k|v|out)\.weight")


def squeeze_attention_weights(weights: dict) -> dict:
    """Original checkpoints (and some diffusers files) hold the attention projections as 1x1 convs
    [C, C, 1, 1]; ours are Linear [C, C]. `weights` is keyed by our names."""
    squeezed = {}
    for name, value in weights.items():
        # only a true 1x1 kernel; any other shape is left for the strict load to report
        if value.ndim == 4 and value.shape[2:] == (1, 1) and _ATTENTION_WEIGHT.fullmatch(name):
            value = value[:, :, 0, 0]
        squeezed[name] = value
    return squeezed


# ---------------------------------------------------------------------------------------------
# Key maps and strict loading
# ---------------------------------------------------------------------------------------------


def remap_keys(state_dict: dict, rules, drop=()) -> tuple:
    """Rename checkpoint keys to module names; returns (renamed state dict, {new name: file name}).

    rules: (regex, replacement) pairs applied in order to every key with `re.sub`; a replacement may
        be a string or a function of the match (for index arithmetic).
    drop: regexes (full match) of keys that are known not to be weights of the module, e.g. an
        unused output head or a buffer that the module recomputes.
    """
    renamed, file_names = {}, {}
    for key, tensor in state_dict.items():
        if any(re.fullmatch(pattern, key) for pattern in drop):
            continue
        new_key = key
        for pattern, replacement in rules:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in renamed:
            raise CheckpointError(
                f"two checkpoint keys map to {new_key!r} (one is {key!r}): "
                "the file mixes two layouts"
            )
        renamed[new_key] = tensor
        file_names[new_key] = key
    return renamed, file_names


def rename_keys(state_dict: dict, names: dict, drop=()) -> tuple:
    """Rename checkpoint keys by a table {name in the file: module name}; returns (renamed state
    dict, {module name: file name}). Keys not in the table keep their name (the strict load reports
    them); `drop` as in `remap_keys`."""
    renamed, file_names = {}, {}
    for key, tensor in state_dict.items():
        if any(re.fullmatch(pattern, key) for pattern in drop):
            continue
        new_key = names.get(key, key)
        if new_key in renamed:
            raise CheckpointError(
                f"two checkpoint keys map to {new_key!r} ({file_names[new_key]!r} and {key!r}): "
                "the file mixes two layouts"
            )
        renamed[new_key] = tensor
        file_names[new_key] = key
    return renamed, file_names


def _listing(names, shown: int = 5) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)}: " + ", ".join(names[:shown]) + more


def usable_device(device, option: str = "device") -> torch.device:
    """`device` (a name or a torch.device) if this machine can run on it, else a ValueError that
    says why; `option` names it in the message (--device on the command line)."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{option} {device!r} is not a device: expected cpu, cuda or cuda:N"
        ) from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {device}: this torch sees no CUDA GPU; use {option} cpu")
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{option} {device}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {device}: minildm runs on cpu or cuda")
    return found


def check_dtype(dtype):
    """The floating-point types minildm's models run in (None: float32)."""
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}"
        )


def load_into(
    module: nn.Module,
    state_dict: dict,
    *,
    file_names=None,
    device=None,
    dtype=None,
    what="model",
    hint=None,
) -> nn.Module:
    """Fill a module (usually built on the `meta` device) with `state_dict`, strictly.

    Every parameter and persistent buffer must be present, every key used, and every shape equal;
    otherwise the error lists the offending keys (unused ones by their name in the file, from
    `file_names`) and `hint(missing, unexpected, mismatched)`'s guess at the cause.
    Floating-point tensors are cast to `dtype` (float32 when None); tensors that are already on the
    right device and dtype are used as they are, without a copy (`assign=True`).
    """
    if device is not None and torch.device(device).type == "cuda":
        usable_device(device)  # before any tensor moves (torch's own error is an AssertionError)
    check_dtype(dtype)
    expected = module.state_dict(keep_vars=True)
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    mismatched = {
        k: (tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected.keys() & state_dict.keys()
        if state_dict[k].shape != expected[k].shape
    }
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint does not fit the {what}:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({_listing(missing)})")
        if unexpected:
            names_in_file = ((file_names or {}).get(k, k) for k in unexpected)
            lines.append(f"  not used by the {what} ({_listing(names_in_file)})")
        if mismatched:
            shown = []
            for k, (got, want) in sorted(mismatched.items())[:3]:
                in_file = (file_names or {}).get(k, k)
                called = k if in_file == k else f"{k} ({in_file} in the file)"
                shown.append(f"{called} is {got} in the checkpoint, {want} in the {what}")
            lines.append(f"  shapes differ ({len(mismatched)}): " + "; ".join(shown))
        cause = hint(missing, unexpected, mismatched) if hint else None
        if not cause:
            cause = (
                "the weights belong to another model or configuration; "
                "check that config.json and the weights file come from the same folder"
            )
        lines.append("  likely cause: " + cause)
        raise CheckpointError("\n".join(lines))

    not_floating = sorted(
        k
        for k in expected
        if expected[k].is_floating_point() and not state_dict[k].is_floating_point()
    )
    if not_floating:
        first = not_floating[0]
        raise CheckpointError(
            f"the checkpoint holds {len(not_floating)} of the {what}'s floating-point tensors as "
            f"{state_dict[first].dtype} (e.g. {(file_names or {}).get(first, first)}): weights are "
            "saved as float16, bfloat16 or float32; convert the file again"
        )
    dtype = dtype or torch.float32
    converted = {}
    for name, tensor in state_dict.items():
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        converted[name] = tensor.to(device=device or "cpu", dtype=target_dtype)
    with warnings.catch_warnings():
        # memory-mapped safetensors are read-only until written to; the module never writes to them
        warnings.filterwarnings("ignore", message=".*non-writable.*")
        module.load_state_dict(converted, strict=True, assign=True)
    return module.eval().requires_grad_(False)
