"""Writing diffusers-layout folders: the inverse of loading (checkpoints/load.py).

`save_component(folder, module)` writes one minildm model as the official component folder that
diffusers or transformers would write for it (config.json in their keys, the weights renamed to
their layout in a safetensors file); `save_pipeline_folder(out, system, components, tokenizer,
scheduler_config)` writes a whole pipeline folder: model_index.json, the scheduler's config, the
tokenizer and every component. The trainer (train/run.py) saves the embedded models this way and `python -m minildm
bench` writes an official-size SD folder with it; both minildm's and diffusers' `from_pretrained`
read what it writes.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from minildm import shapes
from minildm.autoencoder import AutoencoderKL, VQModel
from minildm.checkpoints.autoencoder import config_to_diffusers as vae_config
from minildm.checkpoints.autoencoder import diffusers_name as vae_file_name
from minildm.checkpoints.clip import text_config_to_diffusers as clip_config
from minildm.checkpoints.clip import transformers_name
from minildm.checkpoints.files import write_file, write_text
from minildm.checkpoints.ldm_bert import config_to_diffusers as bert_config
from minildm.checkpoints.ldm_bert import diffusers_name as bert_file_name
from minildm.checkpoints.unet import config_to_diffusers as unet_config
from minildm.checkpoints.unet import diffusers_name as unet_file_name
from minildm.checkpoints.vq_transformer import config_to_diffusers as transformer_config
from minildm.checkpoints.vq_transformer import diffusers_name as transformer_file_name
from minildm.clip import CLIPTextModel
from minildm.ldm_bert import LDMBert
from minildm.tokenizer import ASSETS, BertTokenizer, CLIPTokenizer
from minildm.unet import UNet
from minildm.vq_transformer import VQTransformer

# model_index.json's _class_name: the pipeline that reads each system's folder
PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "ldm": "LDMTextToImagePipeline",
    "ldm-uncond": "LDMPipeline",
    "vq-diffusion": "VQDiffusionPipeline",
}
# model_index.json: each component's [library, class], as diffusers writes them
COMPONENT_CLASSES = {
    "sd": {
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "ldm": {
        "bert": ["latent_diffusion", "LDMBertModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vqvae": ["diffusers", "AutoencoderKL"],
    },
    "ldm-uncond": {
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    },
    "vq-diffusion": {
        # the module that defines the class, as diffusers' own save_pretrained records it (the hub's
        # "vq_diffusion" no longer resolves since the pipeline moved under pipelines/deprecated)
        "learned_classifier_free_sampling_embeddings": [
            "diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion",
            "LearnedClassifierFreeSamplingEmbeddings",
        ],
        "scheduler": ["diffusers", "VQDiffusionScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    },
}


def _file_tensors(state: dict, rename, dtype: torch.dtype) -> dict:
    """Contiguous, in `dtype` (fp16: what the shipped files hold), renamed to the official
    layout."""
    return {rename(name): tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}


def save_component(folder: Path, module, dtype: torch.dtype = torch.float16):
    """One model in its diffusers / transformers folder layout: config.json + safetensors (fp16
    as shipped; `python -m minildm bench` writes fp32)."""
    if isinstance(module, (AutoencoderKL, VQModel)):
        config = vae_config(module.config, sample_size=shapes.SIZE)
        weights = _file_tensors(module.state_dict(), vae_file_name, dtype)
        file = "diffusion_pytorch_model"
    elif isinstance(module, UNet):
        config = unet_config(module.config)
        weights = _file_tensors(
            module.state_dict(), lambda n: unet_file_name(n, module.config), dtype
        )
        file = "diffusion_pytorch_model"
    elif isinstance(module, CLIPTextModel):
        config = clip_config(module.config)
        weights = _file_tensors(module.state_dict(), transformers_name, dtype)
        file = "model"
    elif isinstance(module, LDMBert):
        config = bert_config(module.config)
        weights = _file_tensors(module.state_dict(), bert_file_name, dtype)
        file = "model"
    elif isinstance(module, VQTransformer):
        config = transformer_config(module.config)
        weights = _file_tensors(module.state_dict(), transformer_file_name, dtype)
        file = "diffusion_pytorch_model"
    else:  # the learned classifier-free embeddings
        length, hidden_size = module.embeddings.shape
        config = {
            "_class_name": "LearnedClassifierFreeSamplingEmbeddings",
            "_diffusers_version": "0.42.1",
            "learnable": True,
            "hidden_size": hidden_size,
            "length": length,
        }
        weights = _file_tensors(module.state_dict(), lambda n: n, dtype)
        file = "diffusion_pytorch_model"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    write_file(
        folder / f"{file}.safetensors",
        lambda temporary: save_file(weights, temporary, metadata={"format": "pt"}),
    )


def save_pipeline_folder(
    out: Path,
    system: str,
    components: dict,
    tokenizer,
    scheduler_config: dict,
    dtype: torch.dtype = torch.float16,
):
    """model_index.json, the scheduler, the tokenizer and every model of `components`
    ({folder name: module}, or a path to an existing folder to copy unchanged). `scheduler_config`
    is written as scheduler/scheduler_config.json."""
    import shutil

    index = {
        "_class_name": PIPELINE_CLASSES[system],
        "_diffusers_version": "0.42.1",
        **COMPONENT_CLASSES[system],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")
    for name, part in components.items():
        if isinstance(part, Path):
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.copytree(part, out / name)
        else:
            save_component(out / name, part, dtype)
    (out / "scheduler").mkdir(exist_ok=True)
    write_text(
        out / "scheduler" / "scheduler_config.json", json.dumps(scheduler_config, indent=2) + "\n"
    )
    if isinstance(tokenizer, Path):
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        shutil.copytree(tokenizer, out / "tokenizer")
    elif isinstance(tokenizer, BertTokenizer):
        save_bert_tokenizer_folder(out / "tokenizer", tokenizer)
    elif tokenizer is not None:
        save_tokenizer_folder(out / "tokenizer", tokenizer)


def save_tokenizer_folder(folder: Path, tokenizer: CLIPTokenizer):
    """vocab.json + merges.txt made from the shipped BPE file, and SD's padding at the short
    length."""
    folder.mkdir(exist_ok=True)
    vocab, merges = CLIPTokenizer._vocab_from_bpe_file(ASSETS / "clip_bpe_simple_vocab_16e6.txt.gz")
    write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(
        folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    end = CLIPTokenizer.END
    special = {
        "bos_token": CLIPTokenizer.START,
        "eos_token": end,
        "pad_token": end,
        "unk_token": end,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tokenizer.max_length,
        **special,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def save_bert_tokenizer_folder(folder: Path, tokenizer: BertTokenizer):
    """bert-base-uncased's vocab.txt (the shipped copy) and its settings, at the tokenizer's length
    (LDM's 77 tokens)."""
    folder.mkdir(exist_ok=True)
    vocab = (ASSETS / "bert_base_uncased_vocab.txt").read_bytes()
    write_file(folder / "vocab.txt", lambda temporary: temporary.write_bytes(vocab))
    special = {
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }
    config = {
        "tokenizer_class": "BertTokenizer",
        "model_max_length": tokenizer.max_length,
        "do_lower_case": True,
        **special,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
