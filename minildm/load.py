"""`load_component(folder)`: a diffusers/transformers component folder -> the minildm module.

A component folder (`text_encoder/`, `bert/`, `unet/`, ...) holds `config.json` and one weights
file. The config names its class (`_class_name` for diffusers, `architectures` for transformers);
that name picks the minildm model, its config is translated, and the weights are read and loaded
strictly through the model's key map.
"""

from pathlib import Path

from minildm import autoencoder, clip, ldm_bert, unet, vq_transformer
from minildm.weights import CheckpointError, find_weights_file, read_config, read_state_dict, resolve_folder

# reference class name -> (config translation, loader)
COMPONENTS = {
    "CLIPTextModel": (clip.CLIPTextConfig.from_diffusers, clip.load_clip_text_model),
    "LDMBertModel": (ldm_bert.LDMBertConfig.from_diffusers, ldm_bert.load_ldm_bert),
    "AutoencoderKL": (autoencoder.AutoencoderConfig.from_diffusers, autoencoder.load_autoencoder),
    "VQModel": (autoencoder.AutoencoderConfig.from_diffusers, autoencoder.load_autoencoder),
    "UNet2DConditionModel": (unet.UNetConfig.from_diffusers, unet.load_unet),
    "UNet2DModel": (unet.UNetConfig.from_diffusers, unet.load_unet),
    "Transformer2DModel": (vq_transformer.VQTransformerConfig.from_diffusers, vq_transformer.load_vq_transformer),
    "LearnedClassifierFreeSamplingEmbeddings": (vq_transformer.LearnedClassifierFreeEmbeddings.config_from_diffusers, vq_transformer.load_learned_embeddings),
}


def component_class_name(config: dict, folder) -> str:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name is None:
        raise CheckpointError(f"{folder}/config.json names no class (neither '_class_name' nor 'architectures')")
    return name


def load_component(folder, device=None, dtype=None, variant: str | None = None):
    """Build the minildm module for a component folder (a path, or `org/name/subfolder` in the HF cache).

    device, dtype: where the weights go (default: CPU, float32). variant: e.g. "fp16" to read the
    `*.fp16.safetensors` file of a hub folder.
    """
    folder = _resolve_component_folder(folder)
    config = read_config(folder)
    name = component_class_name(config, folder)
    if name not in COMPONENTS:
        raise CheckpointError(f"{folder}/config.json names class {name!r}; minildm can load {sorted(COMPONENTS)}")
    make_config, load = COMPONENTS[name]
    state_dict = read_state_dict(find_weights_file(folder, variant))
    return load(make_config(config), state_dict, device=device, dtype=dtype)


def _resolve_component_folder(folder) -> Path:
    path = Path(folder).expanduser()
    if path.exists():
        return path
    parts = str(folder).split("/")
    if len(parts) >= 3:  # org/name/subfolder in the Hugging Face cache
        return resolve_folder("/".join(parts[:2])).joinpath(*parts[2:])
    return resolve_folder(folder)
