"""Stable Diffusion at the official component sizes (CLIP ViT-L/14, KL-f8, the 860M UNet) with
random weights, saved as a hub folder: minildm's image equals diffusers' at a small resolution."""

import json

import numpy as np
import torch
from conftest import SCHEDULER_CONFIGS, oracle, reference_scheduler, write_clip_hub_folder
from test_autoencoder import HUB_CONFIGS as VAE_CONFIGS
from test_unet import SD_CONFIG

from minildm.pipelines import StableDiffusionPipeline


def test_official_sizes_small_resolution(tmp_path):
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    torch.manual_seed(0)  # default initialisation: the point here is the official shapes end to end
    unet = diffusers.UNet2DConditionModel(
        **{k: v for k, v in SD_CONFIG.items() if not k.startswith("_")}
    ).eval()
    vae = diffusers.AutoencoderKL(
        **{
            k: v
            for k, v in VAE_CONFIGS["KL-f8 (SD v1, LDM text2im)"].items()
            if not k.startswith("_")
        }
    ).eval()
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        )
    ).eval()
    scheduler = reference_scheduler("PNDMScheduler", SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    folder = tmp_path / "stable-diffusion-v1-4"
    for name, part in dict(
        unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler
    ).items():
        part.save_pretrained(folder / name)
    write_clip_hub_folder(folder / "tokenizer")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "safety_checker": [None, None],
            }
        )
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        folder / "tokenizer", model_max_length=77
    )
    reference = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    assert sum(p.numel() for p in ours.unet.parameters()) == 859_520_964
    call = dict(
        prompt="a photograph of an astronaut riding a horse",
        height=64,
        width=128,
        num_inference_steps=3,
        guidance_scale=7.5,
        output_type="np",
    )
    expected = reference(generator=torch.Generator().manual_seed(0), **call).images
    got = ours(generator=torch.Generator().manual_seed(0), **call).images
    error = float(np.abs(got - expected).max())
    print(
        "SD at official sizes, 64x128, 3 PNDM steps: "
        f"image max abs difference {error:.1e} (tolerance 1e-4)"
    )
    assert got.shape == (1, 64, 128, 3) and error < 1e-4
