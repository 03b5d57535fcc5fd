"""Textual-inversion embedding files: the vectors of a placeholder token (Gal et al. 2022,
arXiv:2208.01618; minildm/textual_inversion.py), read from the layouts they are shared in and
written in diffusers'. `textual_inversion.add_placeholder` gives them to a tokenizer and text
encoder (the pipelines' `load_embedding`).

Layouts read, each holding n vectors of the text encoder's width D (768 for SD 1.x):

- diffusers (`learned_embeds.safetensors` / `.bin`, written by diffusers'
  examples/textual_inversion/textual_inversion.py and read by `loaders/textual_inversion.py`):
  {token: (D,) or (n, D)}, the token the key;
- AUTOMATIC1111's web UI (`.pt`, modules/textual_inversion/textual_inversion.py): a pickled dict
  {"string_to_param": {"*": (n, D)}, "string_to_token": {"*": 265}, "name": ..., "step": ...};
  files from 2022 pickle "string_to_param" as a torch.nn.ParameterDict, read here through an
  inert stand-in bound to that one name (never torch's class, never weights_only=False);
- kohya-ss sd-scripts (`.safetensors`, train_textual_inversion.py, which the web UI reads too):
  {"emb_params": (n, D)}.

The token, in order: the `token` argument; the diffusers key; A1111's "name"; the file's stem
in angle brackets ("pink.pt" -> "<pink>"). A token taken from the file is lower-cased, as the
tokenizer lower-cases prompts before it looks for it.
"""

from pathlib import Path

import torch

from minildm.checkpoints.weights import CheckpointError, read_pickle, read_state_dict


def read_embedding(path, token: str | None = None) -> tuple:
    """-> (token, vectors (n, D) in float32) from an embedding file of any layout above. A
    diffusers file holding several tokens needs `token` to choose one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        stored = read_state_dict(path)  # a damaged file is a CheckpointError naming it
    else:
        stored = read_pickle(path, [(_ParameterDictStandIn, PARAMETER_DICT)])
    if not isinstance(stored, dict) or not stored:
        raise CheckpointError(
            f"{path} holds {type(stored).__name__}, not an embedding: expected a dict such as "
            "{token: vectors} (diffusers) or {'string_to_param': ...} (AUTOMATIC1111)"
        )
    if "string_to_param" in stored:  # AUTOMATIC1111
        name = stored.get("name")
        name = name.lower() if isinstance(name, str) and name.strip() else None
        parameters = stored["string_to_param"]
        parameters = getattr(parameters, "parameters", parameters)  # the 2022 ParameterDict
        if not isinstance(parameters, dict) or len(parameters) != 1:
            raise CheckpointError(
                f"{path}: its string_to_param should hold one entry ('*': the vectors), "
                f"found {len(parameters) if isinstance(parameters, dict) else parameters!r}"
            )
        vectors = next(iter(parameters.values()))
        chosen = token or name or _token_from_stem(path)
    elif {"clip_l", "clip_g"} <= stored.keys():
        raise CheckpointError(
            f"{path} holds vectors for two text encoders (clip_l, clip_g): this looks like an "
            "SDXL embedding; minildm implements SD 1.x"
        )
    elif "emb_params" in stored:  # kohya-ss sd-scripts
        vectors, chosen = stored["emb_params"], token or _token_from_stem(path)
    else:  # diffusers: {token: vectors}
        chosen, vectors = _diffusers_entry(path, stored, token)
    return chosen, _as_vectors(path, chosen, vectors)


def write_embedding(path, token: str, vectors: torch.Tensor) -> Path:
    """Write {token: vectors (n, D)} in diffusers' layout, a .safetensors file (or a .bin pickle,
    by the suffix), which diffusers' `load_textual_inversion` and `read_embedding` read."""
    path = Path(path)
    vectors = vectors.detach().reshape(-1, vectors.shape[-1]).contiguous().cpu()  # (n, D)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({token: vectors}, str(path))
    else:
        torch.save({token: vectors}, path)
    return path


# --- The parts --------------------------------------------------------------------------------

PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"


class _ParameterDictStandIn:
    """What a pickled torch.nn.ParameterDict becomes here: the {name: tensor} it held, no module
    (its other state, hooks and flags, is dropped unread)."""

    def __setstate__(self, state):
        parameters = state.get("_parameters", {}) if isinstance(state, dict) else {}
        self.parameters = dict(parameters)


def _diffusers_entry(path: Path, stored: dict, token: str | None) -> tuple:
    tensors = {key: value for key, value in stored.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no tensor (keys {sorted(map(str, stored))[:5]}): not an embedding file"
        )
    if len(tensors) == 1:
        key, vectors = next(iter(tensors.items()))
        return token or key.lower(), vectors
    if token in tensors:
        return token, tensors[token]
    raise CheckpointError(
        f"{path} holds {len(tensors)} tokens ({', '.join(sorted(tensors)[:5])}): pass token= "
        "to choose the one to load"
    )


def _token_from_stem(path: Path) -> str:
    return f"<{path.stem.lower()}>"


def _as_vectors(path: Path, token: str, vectors) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise CheckpointError(
            f"{path}: the embedding of {token!r} is {type(vectors).__name__}"
            f"{'' if not isinstance(vectors, torch.Tensor) else ' ' + str(vectors.dtype)}, "
            "expected floating-point vectors (D,) or (n, D)"
        )
    if vectors.ndim not in (1, 2) or vectors.numel() == 0:
        raise CheckpointError(
            f"{path}: the embedding of {token!r} is {tuple(vectors.shape)}, expected (D,) or (n, D)"
        )
    return vectors.detach().float().reshape(-1, vectors.shape[-1])  # (n, D)
