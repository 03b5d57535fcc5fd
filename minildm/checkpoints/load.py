"""`load_component(folder)`: a diffusers/transformers component folder -> the minildm module.

A component folder (`text_encoder/`, `bert/`, `unet/`, ...) holds `config.json` and one weights
file. The config names its class (`_class_name` for diffusers, `architectures` for transformers);
that name picks the minildm model, its config is translated, and the weights are read and loaded
strictly through the model's key map (each by the checkpoints/ file named after the model).
"""

from pathlib import Path

from minildm import schedulers
from minildm.checkpoints import (
    autoencoder,
    clip,
    ldm_bert,
    safety_checker,
    unet,
    vq_transformer,
)
from minildm.checkpoints.configs import (
    SCHEDULER_VALUES,
    check_component_config,
    check_model_index,
    check_tokenizer_folder,
    check_values,
)
from minildm.checkpoints.weights import (
    CheckpointError,
    check_dtype,
    download_hint,
    find_weights_file,
    read_config,
    read_json,
    read_state_dict,
    resolve_folder,
    usable_device,
)
from minildm.tokenizer import BertTokenizer, CLIPTokenizer

# reference class name -> (config translation, loader)
COMPONENTS = {
    "CLIPTextModel": (clip.text_config_from_diffusers, clip.load_clip_text_model),
    "LDMBertModel": (ldm_bert.config_from_diffusers, ldm_bert.load_ldm_bert),
    "AutoencoderKL": (autoencoder.config_from_diffusers, autoencoder.load_autoencoder),
    "VQModel": (autoencoder.config_from_diffusers, autoencoder.load_autoencoder),
    "UNet2DConditionModel": (unet.config_from_diffusers, unet.load_unet),
    "UNet2DModel": (unet.config_from_diffusers, unet.load_unet),
    "Transformer2DModel": (
        vq_transformer.config_from_diffusers,
        vq_transformer.load_vq_transformer,
    ),
    "LearnedClassifierFreeSamplingEmbeddings": (
        vq_transformer.embeddings_config_from_diffusers,
        vq_transformer.load_learned_embeddings,
    ),
    "StableDiffusionSafetyChecker": (
        safety_checker.config_from_diffusers,
        safety_checker.load_safety_checker,
    ),
}


def component_class_name(config: dict, folder) -> str:
    architectures = config.get("architectures") or [None]
    if type(architectures) is not list:
        raise CheckpointError(
            f"{folder}/config.json: architectures must be a list of class names, found "
            f"{architectures!r}"
        )
    name = config.get("_class_name") or architectures[0]
    if name is not None and type(name) is not str:
        raise CheckpointError(f"{folder}/config.json names its class with {name!r}, not a string")
    if name is None:
        raise CheckpointError(
            f"{folder}/config.json names no class (neither '_class_name' nor 'architectures')"
        )
    return name


def load_component(folder, device=None, dtype=None, variant: str | None = None):
    """Build the minildm module for a component folder (a path, or `org/name/subfolder` in the
    Hugging Face cache).

    device, dtype: where the weights go (default: CPU, float32). variant: e.g. "fp16" to read the
    `*.fp16.safetensors` file of a hub folder.
    """
    if device is not None:
        usable_device(device)  # before any file is read
    check_dtype(dtype)
    folder = _resolve_component_folder(folder)
    config = read_component_config(folder)
    name = component_class_name(config, folder)
    if name not in COMPONENTS:
        raise CheckpointError(
            f"{folder}/config.json names class {name!r}; minildm can load {sorted(COMPONENTS)}"
        )
    make_config, load = COMPONENTS[name]
    model_config = translated(make_config, config, folder / "config.json")
    weights_file = find_weights_file(folder, variant)
    state_dict = read_state_dict(weights_file)
    try:
        return load(model_config, state_dict, device=device, dtype=dtype)
    except CheckpointError as error:
        if str(weights_file) in str(error):
            raise
        raise CheckpointError(f"{weights_file}: {error}") from None
    except ValueError as error:  # the module itself refused the sizes (GroupNorm's groups, ...)
        raise CheckpointError(
            f"{folder / 'config.json'} describes a model that cannot be built: {error}"
        ) from None


def read_component_config(folder) -> dict:
    """A model folder's config.json, its values checked (checkpoints/configs.py)."""
    config = read_config(folder)
    name = component_class_name(config, folder)
    check_component_config(Path(folder) / "config.json", config, name)
    return config


def translated(make_config, config: dict, path: Path):
    """`make_config(config)`, its refusals naming the file."""
    try:
        return make_config(config)
    except KeyError as error:
        raise CheckpointError(f"{path}: the key {error} is missing") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _resolve_component_folder(folder) -> Path:
    path = Path(folder).expanduser()
    if path.exists():
        return path
    parts = str(folder).split("/")
    if len(parts) >= 3:  # org/name/subfolder in the Hugging Face cache
        return resolve_folder("/".join(parts[:2])).joinpath(*parts[2:])
    return resolve_folder(folder)


# --- whole pipelines: model_index.json, tokenizers, schedulers -----------------------------------


def missing_model_index_message(folder) -> str:
    """What to say of a folder without model_index.json: an empty one (or one holding only the
    .part files of an unfinished download) is a download to finish; anything else is not a
    pipeline folder."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    if all(p.suffix == ".part" for p in files):
        held = f"holds only {len(files)} unfinished .part file(s)" if files else "is empty"
        return f"{folder} {held}: a download that did not finish? " + download_hint(folder)
    return (
        f"{folder} has no model_index.json: expected a diffusers pipeline folder (model_index.json "
        "and one subfolder per model, as `python -m minildm download` writes it); a single "
        "model's folder loads with minildm.load_component"
    )


def read_model_index(folder, expected_class: str) -> dict:
    """A pipeline folder's model_index.json: {component: [library, class]}; refuses another
    system's folder."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(missing_model_index_message(folder))
    index = read_json(path)
    check_model_index(path, index)
    if index.get("_class_name") != expected_class:
        raise CheckpointError(
            f"{folder} holds a {index.get('_class_name')!r}, not a {expected_class}: "
            "use the pipeline class named in its model_index.json"
        )
    return {name: value for name, value in index.items() if not name.startswith("_")}


def load_tokenizer(folder):
    """CLIPTokenizer (vocab.json + merges.txt) or BertTokenizer (vocab.txt), from what the folder
    holds."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() or (folder / "vocab.txt").is_file():
        check_tokenizer_folder(folder)
    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_folder(folder)
    if (folder / "vocab.txt").is_file():
        return BertTokenizer.from_folder(folder)
    raise FileNotFoundError(
        f"{folder} holds neither vocab.json + merges.txt (CLIP) nor vocab.txt (BERT)"
    )


def load_scheduler(folder):
    """The minildm scheduler named by scheduler_config.json's `_class_name`, built from the same
    keys."""
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no scheduler_config.json")
    config = read_scheduler_config(folder)
    name = config.get("_class_name")
    if name not in schedulers.__all__:
        raise CheckpointError(
            f"{path} names scheduler {name!r}; minildm implements {schedulers.__all__}"
        )
    return translated(getattr(schedulers, name).from_config, config, path)


def read_scheduler_config(folder) -> dict:
    """A scheduler folder's scheduler_config.json, its values checked (checkpoints/configs.py)."""
    path = Path(folder) / "scheduler_config.json"
    config = read_json(path)
    check_values(path, config, SCHEDULER_VALUES)
    return config


def build_scheduler(cls, config: dict, path):
    """`cls.from_config(config)`, a refusal naming the file the config came from."""
    return translated(cls.from_config, config, path)


# --- original single-file checkpoints -----------------------------------------------------------

# The LatentDiffusion buffers of a CompVis checkpoint besides the three models: the training noise
# schedule (recomputed by the scheduler) and the latent scale factor, as registered by
# DDPM.register_schedule and LatentDiffusion.__init__ in CompVis/stable-diffusion's
# ldm/models/diffusion/ddpm.py.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "scale_factor",
)


def split_stable_diffusion_checkpoint(state_dict: dict) -> dict:
    """An original SD 1.x file (sd-v1-4.ckpt, or its .safetensors conversions) -> {"unet", "vae",
    "text_encoder", "schedule"} state dicts, each still in the original key names its loader
    reads."""
    parts = {"unet": {}, "vae": {}, "text_encoder": {}, "schedule": {}}
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(("model.diffusion_model.", "model_ema.")):
            parts["unet"][key] = tensor  # the UNet and, in full-EMA files, its EMA copy
        elif key.startswith("first_stage_model."):
            parts["vae"][key] = tensor
        elif key.startswith("cond_stage_model.transformer."):
            parts["text_encoder"][key] = tensor
        elif key in SCHEDULE_BUFFERS:
            parts["schedule"][key] = tensor
        else:
            unknown.append(key)
    if unknown or not parts["unet"]:
        sd2 = any(k.startswith("cond_stage_model.model.") for k in unknown)
        message = (
            f"not a Stable Diffusion 1.x checkpoint: {len(unknown)} unexpected keys, "
            f"e.g. {sorted(unknown)[:5]}"
        )
        if sd2:
            message += (
                "; cond_stage_model.model.* is OpenCLIP: this looks like an SD 2.x checkpoint, "
                "which minildm does not implement"
            )
        raise CheckpointError(message)
    return parts
