"""Stable Diffusion, LDM text-to-image and LDM unconditional end to end against diffusers'
pipelines, on small random components saved as hub-layout folders (tokenizer folders without
tokenizer.json)."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    SCHEDULER_CONFIGS,
    oracle,
    randomize_,
    reference_scheduler,
    write_clip_hub_folder,
)

import minildm
from minildm import schedulers
from minildm.pipelines import LDMPipeline, LDMTextToImagePipeline, StableDiffusionPipeline

TOLERANCE = 1e-4  # max abs difference of float images in [0, 1]
SMALL_KL = dict(  # f = 8 like the real one, tiny widths
    block_out_channels=[8, 16, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
)
SMALL_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=2,
    in_channels=4,
    out_channels=4,
)


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def save_hub_folder(folder, class_name, components: dict, extra_index=None):
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    for name, module in components.items():
        module.save_pretrained(folder / name)
        library = (
            "transformers" if type(module).__module__.startswith("transformers") else "diffusers"
        )
        index[name] = [library, type(module).__name__]
    index.update(extra_index or {})
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    torch.manual_seed(0)
    vae = randomize_(diffusers.AutoencoderKL(**SMALL_KL).eval(), seed=1)
    unet = randomize_(
        diffusers.UNet2DConditionModel(**SMALL_UNET, cross_attention_dim=32, sample_size=8).eval(),
        seed=2,
    )
    text_encoder = randomize_(
        transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
            )
        ).eval(),
        seed=3,
    )
    scheduler = quietly(
        diffusers.PNDMScheduler.from_config,
        {k: v for k, v in SCHEDULER_CONFIGS["SD v1-4 (PNDM)"].items() if not k.startswith("_")},
    )
    folder = save_hub_folder(
        tmp_path_factory.mktemp("sd") / "pipeline",
        "StableDiffusionPipeline",
        dict(vae=vae, unet=unet, text_encoder=text_encoder, scheduler=scheduler),
        {
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
        },
    )
    write_clip_hub_folder(folder / "tokenizer")
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
    return dict(folder=folder, reference=reference)


def compare(label, got, expected):
    error = float(np.abs(got - expected).max())
    print(f"{label}: image max abs difference {error:.1e} (tolerance {TOLERANCE:.0e})")
    assert got.shape == expected.shape and error < TOLERANCE


SD_SCHEDULERS = {  # name -> (minildm class, diffusers class name, extra call options)
    "PNDM (as published)": (schedulers.PNDMScheduler, "PNDMScheduler", {}),
    "DDIM eta 0": (schedulers.DDIMScheduler, "DDIMScheduler", {"eta": 0.0}),
    "DDIM eta 0.5": (schedulers.DDIMScheduler, "DDIMScheduler", {"eta": 0.5}),
    "LMS": (schedulers.LMSDiscreteScheduler, "LMSDiscreteScheduler", {}),
    "Euler ancestral": (
        schedulers.EulerAncestralDiscreteScheduler,
        "EulerAncestralDiscreteScheduler",
        {},
    ),
    "Heun": (schedulers.HeunDiscreteScheduler, "HeunDiscreteScheduler", {}),
    "KDPM2": (schedulers.KDPM2DiscreteScheduler, "KDPM2DiscreteScheduler", {}),
    "KDPM2 ancestral": (
        schedulers.KDPM2AncestralDiscreteScheduler,
        "KDPM2AncestralDiscreteScheduler",
        {},
    ),
    "DPM-Solver++ single-step": (
        schedulers.DPMSolverSinglestepScheduler,
        "DPMSolverSinglestepScheduler",
        {},
    ),
    "DEIS": (schedulers.DEISMultistepScheduler, "DEISMultistepScheduler", {}),
}


@pytest.mark.parametrize("name", list(SD_SCHEDULERS))
def test_stable_diffusion_matches_diffusers(sd, name):
    ours_class, theirs_name, options = SD_SCHEDULERS[name]
    pipe = StableDiffusionPipeline.from_pretrained(sd["folder"])
    config = SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]
    # swapped by assignment, as in the blog post
    pipe.scheduler = quietly(ours_class.from_config, config)
    sd["reference"].scheduler = reference_scheduler(theirs_name, config)
    call = dict(
        prompt=["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"],
        negative_prompt=["blurry", "low quality"],
        height=64,
        width=96,
        num_inference_steps=6,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        output_type="np",
        **options,
    )
    expected = sd["reference"](generator=torch.Generator().manual_seed(0), **call).images
    got = pipe(generator=torch.Generator().manual_seed(0), **call)
    assert got.nsfw_content_detected is None  # no safety checker in this folder
    compare(f"SD 64x96, 2 prompts x 2 images, negative prompts, {name}", got.images, expected)


def test_stable_diffusion_without_guidance_and_output_types(sd):
    pipe = StableDiffusionPipeline.from_pretrained(sd["folder"])
    sd["reference"].scheduler = reference_scheduler(
        "PNDMScheduler", SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]
    )
    call = dict(prompt="a cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0)
    expected = sd["reference"](
        generator=torch.Generator().manual_seed(3), output_type="np", **call
    ).images
    got = pipe(generator=torch.Generator().manual_seed(3), output_type="np", **call).images
    compare("SD guidance 1.0 (no unconditional branch)", got, expected)
    pil = pipe(generator=torch.Generator().manual_seed(3), **call).images[0]
    assert pil.size == (64, 64) and np.array_equal(
        np.asarray(pil), (got[0] * 255).round().astype("uint8")
    )
    images, flags = pipe(
        generator=torch.Generator().manual_seed(3), output_type="pt", return_dict=False, **call
    )
    assert images.shape == (1, 3, 64, 64) and flags is None


def test_stable_diffusion_bad_input(sd):
    pipe = StableDiffusionPipeline.from_pretrained(sd["folder"])
    with pytest.raises(
        ValueError,
        match=r"positive multiples of 8 \(the autoencoder's downsampling factor\), got 60x64",
    ):
        pipe("a cat", height=60, width=64)
    with pytest.raises(ValueError, match=r"positive multiples of 8 .*, got 0x64"):
        pipe("a cat", height=0, width=64)  # not "the default size"
    with pytest.raises(ValueError, match="a list of 2 strings"):
        pipe(["a cat", "a dog"], negative_prompt=["blurry"])
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        pipe("a cat", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="no effect without guidance"):
        pipe("a cat", guidance_scale=1.0, negative_prompt="blurry")
    with pytest.raises(ValueError, match="eta=0.5 only applies to DDIM"):
        pipe("a cat", eta=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\)"):
        pipe("a cat", height=64, width=64, latents=torch.zeros(1, 4, 8, 9))
    with pytest.raises(
        minildm.CheckpointError,
        match="holds a 'StableDiffusionPipeline', not a LDMTextToImagePipeline",
    ):
        LDMTextToImagePipeline.from_pretrained(sd["folder"])


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )

    vqvae = randomize_(diffusers.AutoencoderKL(**SMALL_KL).eval(), seed=4)
    unet = randomize_(
        diffusers.UNet2DConditionModel(**SMALL_UNET, cross_attention_dim=32, sample_size=8).eval(),
        seed=5,
    )
    bert = randomize_(
        LDMBertModel(
            LDMBertConfig(
                d_model=32,
                encoder_layers=2,
                encoder_ffn_dim=37,
                encoder_attention_heads=2,
                head_dim=16,
            )
        ).eval(),
        seed=6,
    )
    scheduler = quietly(
        diffusers.DDIMScheduler.from_config,
        {k: v for k, v in SCHEDULER_CONFIGS["LDM text2im (DDIM)"].items() if not k.startswith("_")},
    )
    folder = save_hub_folder(
        tmp_path_factory.mktemp("ldm") / "pipeline",
        "LDMTextToImagePipeline",
        dict(vqvae=vqvae, unet=unet, bert=bert, scheduler=scheduler),
        {
            "tokenizer": ["transformers", "BertTokenizer"],
            "bert": ["latent_diffusion", "LDMBertModel"],
        },
    )
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_bytes(minildm.tokenizer.BERT_VOCAB_FILE.read_bytes())
    tokenizer = transformers.BertTokenizer.from_pretrained(
        folder / "tokenizer", model_max_length=77
    )
    reference = diffusers.LDMTextToImagePipeline(
        vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    reference.set_progress_bar_config(disable=True)
    return dict(folder=folder, reference=reference)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_ldm_text2im_matches_diffusers(ldm, guidance_scale):
    pipe = LDMTextToImagePipeline.from_pretrained(ldm["folder"])
    call = dict(
        prompt=["A painting of a squirrel eating a burger", "a fox in the snow"],
        height=64,
        width=96,
        num_inference_steps=5,
        guidance_scale=guidance_scale,
        output_type="np",
    )
    expected = ldm["reference"](generator=torch.Generator().manual_seed(0), **call).images
    compare(
        f"LDM text-to-image 64x96, guidance {guidance_scale}, DDIM (hub config)",
        pipe(generator=torch.Generator().manual_seed(0), **call).images,
        expected,
    )


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    diffusers = oracle("diffusers")
    vqvae = randomize_(
        diffusers.VQModel(
            block_out_channels=[8, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            latent_channels=3,
            num_vq_embeddings=16,
            layers_per_block=1,
            norm_num_groups=8,
        ).eval(),
        seed=7,
    )
    unet = randomize_(
        diffusers.UNet2DModel(
            block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=8,
            in_channels=3,
            out_channels=3,
            sample_size=8,
            layers_per_block=2,
        ).eval(),
        seed=8,
    )
    scheduler = quietly(
        diffusers.DDIMScheduler.from_config,
        {k: v for k, v in SCHEDULER_CONFIGS["CelebA-HQ (DDIM)"].items() if not k.startswith("_")},
    )
    folder = save_hub_folder(
        tmp_path_factory.mktemp("celeba") / "pipeline",
        "LDMPipeline",
        dict(vqvae=vqvae, unet=unet, scheduler=scheduler),
    )
    config = json.loads((folder / "vqvae" / "config.json").read_text())
    # as the hub's CompVis/ldm-celebahq-256 vqvae/config.json: no scaling_factor
    del config["scaling_factor"]
    (folder / "vqvae" / "config.json").write_text(json.dumps(config))
    # the original LDM's scale, which minildm uses (docs/parity/pipelines.md,
    # "LDM CelebA-HQ: the latent scale is 1, not 0.18215")
    vqvae.register_to_config(scaling_factor=1.0)
    reference = diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    return dict(folder=folder, reference=reference)


@pytest.mark.parametrize("eta", [0.0])
def test_ldm_unconditional_matches_diffusers(celeba, eta):
    pipe = LDMPipeline.from_pretrained(celeba["folder"])
    assert pipe.vqvae.config.scaling_factor == 1.0
    expected = celeba["reference"](
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=5,
        eta=eta,
        output_type="np",
    ).images
    got = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=5,
        eta=eta,
        output_type="np",
    ).images
    compare("LDM unconditional (CelebA-HQ layout), DDIM, scale 1.0", got, expected)


NEW_SAMPLERS = ["KDPM2", "KDPM2 ancestral", "DPM-Solver++ single-step", "DEIS"]


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_ldm_pipelines_with_the_newer_samplers(ldm, celeba, name):
    """The samplers added with DDIM inversion, swapped into both LDM pipelines on both sides (as
    into SD's above): the same images as diffusers'. Except KDPM2 in LDM text-to-image: diffusers'
    LDMTextToImagePipeline neither scales its starting noise by init_noise_sigma nor calls
    scale_model_input, so no sigma-parameterised sampler works in it (its image is off by up to
    1.0 here); minildm's loop does both, as its other pipelines and diffusers' LDMPipeline do."""
    ours_class, theirs_name, _ = SD_SCHEDULERS[name]
    cases = [
        (
            "LDM text-to-image, guidance 6.0",
            ldm,
            LDMTextToImagePipeline,
            "LDM text2im (DDIM)",
            dict(prompt=["a fox in the snow"], height=64, width=64, guidance_scale=6.0),
        ),
        ("LDM unconditional", celeba, LDMPipeline, "CelebA-HQ (DDIM)", dict(batch_size=2)),
    ]
    if name.startswith("KDPM2"):
        cases = cases[1:]
    for label, fixture, cls, official, call in cases:
        pipe = cls.from_pretrained(fixture["folder"])
        config = SCHEDULER_CONFIGS[official]
        pipe.scheduler = quietly(ours_class.from_config, config)
        reference = fixture["reference"]
        original = reference.scheduler
        reference.scheduler = reference_scheduler(theirs_name, config)
        call = dict(call, num_inference_steps=5, output_type="np")
        if cls is LDMPipeline and name == "KDPM2 ancestral":
            # diffusers' LDMPipeline passes no generator to step: the ancestral noise comes from
            # torch's global generator there. Put it where minildm's generator is after drawing
            # the starting noise (2 x 3 x 8 x 8), so that both draw the same.
            torch.manual_seed(0)
            torch.randn(2, 3, 8, 8)
        try:
            expected = reference(generator=torch.Generator().manual_seed(0), **call).images
        finally:
            reference.scheduler = original
        got = pipe(generator=torch.Generator().manual_seed(0), **call).images
        compare(f"{label}, {name}", got, expected)


def original_checkpoint(pipe: StableDiffusionPipeline) -> dict:
    """A CompVis-layout SD file made by inverting minildm's key maps: model.diffusion_model.*,
    first_stage_model.* (attention as 1x1 convs), cond_stage_model.transformer.text_model.*, the
    schedule buffers and the EMA counters of sd-v1-4.ckpt."""
    from conftest import clip_hub_layout

    from minildm.checkpoints import autoencoder, unet

    state = {
        "model.diffusion_model." + unet.original_name(k, pipe.unet.config): v
        for k, v in pipe.unet.state_dict().items()
    }
    levels = len(pipe.vae.config.channels)
    for key, value in pipe.vae.state_dict().items():
        as_conv = "attention" in key and key.endswith("weight") and value.ndim == 2
        state["first_stage_model." + autoencoder.original_name(key, levels)] = (
            value[:, :, None, None] if as_conv else value
        )
    state |= {
        "cond_stage_model.transformer." + k: v
        for k, v in clip_hub_layout(pipe.text_encoder.state_dict()).items()
    }
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[
        None
    ]
    state["betas"], state["alphas_cumprod"] = pipe.scheduler.betas, pipe.scheduler.alphas_cumprod
    state["scale_factor"], state["model_ema.decay"], state["model_ema.num_updates"] = (
        torch.tensor(0.18215),
        torch.tensor(0.9999),
        torch.tensor(470000),
    )
    return {k: v.contiguous() for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_from_single_file_gives_the_folder_image(sd, tmp_path, suffix):
    from safetensors.torch import save_file

    folder_pipe = StableDiffusionPipeline.from_pretrained(sd["folder"])
    path = tmp_path / f"sd-small{suffix}"
    checkpoint = original_checkpoint(folder_pipe)
    torch.save(
        {"state_dict": checkpoint, "global_step": 470000}, path
    ) if suffix == ".ckpt" else save_file(checkpoint, path)
    single = StableDiffusionPipeline.from_single_file(
        path,
        unet_config=folder_pipe.unet.config,
        vae_config=folder_pipe.vae.config,
        text_encoder_config=folder_pipe.text_encoder.config,
    )
    call = dict(
        prompt="a photograph of an astronaut riding a horse",
        height=64,
        width=64,
        num_inference_steps=5,
        output_type="np",
    )
    expected = folder_pipe(generator=torch.Generator().manual_seed(0), **call).images
    compare(
        f"SD from_single_file ({suffix}) vs the folder it came from",
        single(generator=torch.Generator().manual_seed(0), **call).images,
        expected,
    )
    # the very same weights and schedule
    images = single(generator=torch.Generator().manual_seed(0), **call).images
    assert np.array_equal(images, expected)


def test_single_file_of_another_kind_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {
            "model.diffusion_model.x": torch.zeros(1),
            "cond_stage_model.model.token_embedding.weight": torch.zeros(1),
        },
        tmp_path / "sd2.safetensors",
    )
    with pytest.raises(minildm.CheckpointError, match="SD 2.x checkpoint"):
        StableDiffusionPipeline.from_single_file(tmp_path / "sd2.safetensors")


def random_pil(height, width, seed):
    from PIL import Image

    return Image.fromarray(
        np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    )


@pytest.mark.parametrize(
    "name", ["PNDM (as published)", "DDIM eta 0.5", "Euler ancestral", "Heun", *NEW_SAMPLERS]
)
def test_image_to_image_matches_diffusers(sd, name):
    diffusers = oracle("diffusers")
    from minildm.pipelines import StableDiffusionImg2ImgPipeline

    ours_class, theirs_name, options = SD_SCHEDULERS[name]
    reference = diffusers.StableDiffusionImg2ImgPipeline(**sd["reference"].components)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = reference_scheduler(theirs_name, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd["folder"])
    pipe.scheduler = quietly(ours_class.from_config, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    call = dict(
        prompt=["a watercolor of Kyoto", "a fox in the snow"],
        negative_prompt=["blurry", "dark"],
        image=random_pil(64, 96, 0),
        strength=0.6,
        num_inference_steps=8,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        output_type="np",
        **options,
    )
    expected = reference(generator=torch.Generator().manual_seed(0), **call).images
    compare(
        f"SD image-to-image 64x96, strength 0.6, {name}",
        pipe(generator=torch.Generator().manual_seed(0), **call).images,
        expected,
    )
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        pipe("a cat", image=random_pil(64, 64, 1), strength=1.5)
    for strength, steps in [(0.0, 50), (0.09, 10), (0.5, 1)]:  # int(steps * strength) == 0
        with pytest.raises(ValueError, match=f"strength {strength} with {steps} steps leaves no"):
            pipe("a cat", image=random_pil(64, 64, 1), strength=strength, num_inference_steps=steps)
    with pytest.raises(ValueError, match="positive multiples of 8"):
        pipe("a cat", image=random_pil(60, 64, 1))


def rectangle_mask(height, width):
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 :] = 255  # white = repaint
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def inpainting_unet(sd, tmp_path_factory):
    """A 9-channel inpainting UNet, in a copy of the SD folder."""
    import shutil

    diffusers = oracle("diffusers")
    unet = randomize_(
        diffusers.UNet2DConditionModel(
            **dict(SMALL_UNET, in_channels=9), cross_attention_dim=32, sample_size=8
        ).eval(),
        seed=9,
    )
    folder = tmp_path_factory.mktemp("inpaint") / "pipeline"
    shutil.copytree(sd["folder"], folder)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    return dict(folder=folder, unet=unet)


@pytest.mark.parametrize(
    "model, strength, name",
    [
        ("base 4-channel", 1.0, "PNDM (as published)"),
        ("base 4-channel", 0.7, "DDIM eta 0.5"),
        ("inpainting 9-channel", 1.0, "PNDM (as published)"),
        ("inpainting 9-channel", 0.7, "Euler ancestral"),
    ],
)
def test_inpainting_matches_diffusers(sd, inpainting_unet, model, strength, name):
    diffusers = oracle("diffusers")
    from minildm.pipelines import StableDiffusionInpaintPipeline

    ours_class, theirs_name, options = SD_SCHEDULERS[name]
    components = dict(sd["reference"].components)
    folder = sd["folder"]
    if model.startswith("inpainting"):
        components["unet"], folder = inpainting_unet["unet"], inpainting_unet["folder"]
    reference = quietly(diffusers.StableDiffusionInpaintPipeline, **components)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = reference_scheduler(theirs_name, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    pipe.scheduler = quietly(ours_class.from_config, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    call = dict(
        prompt=["a red door", "a window"],
        negative_prompt=["blurry", "dark"],
        image=random_pil(64, 96, 2),
        mask_image=rectangle_mask(64, 96),
        strength=strength,
        num_inference_steps=6,
        guidance_scale=7.5,
        output_type="np",
        **options,
    )
    expected = quietly(
        reference, generator=torch.Generator().manual_seed(0), height=64, width=96, **call
    ).images
    got = pipe(generator=torch.Generator().manual_seed(0), **call).images
    compare(f"SD inpainting, {model} UNet, strength {strength}, {name}", got, expected)


def test_inpainting_bad_input(sd):
    from minildm.pipelines import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(sd["folder"])
    with pytest.raises(
        ValueError, match=r"the mask is \(1, 1, 32, 32\), the image \(1, 3, 64, 64\)"
    ):
        pipe("a door", image=random_pil(64, 64, 0), mask_image=rectangle_mask(32, 32))
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        pipe(
            "a door", image=random_pil(64, 64, 0), mask_image=rectangle_mask(64, 64), strength=-0.1
        )


def test_command_line_writes_pngs(sd, ldm, celeba, tmp_path, capsys):
    from PIL import Image

    from minildm.__main__ import main

    main(
        [
            "sd",
            "a cat",
            "--weights",
            str(sd["folder"]),
            "--steps",
            "3",
            "--height",
            "64",
            "--width",
            "96",
            "-n",
            "2",
            "--scheduler",
            "EulerAncestralDiscreteScheduler",
            "--negative",
            "blurry",
            "--out",
            str(tmp_path),
        ]
    )
    main(
        [
            "ldm",
            "a squirrel",
            "--weights",
            str(ldm["folder"]),
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            str(tmp_path),
        ]
    )
    main(
        [
            "ldm-uncond",
            "--weights",
            str(celeba["folder"]),
            "--steps",
            "2",
            "-n",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    output = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == [
        "ldm-uncond_seed0_0.png",
        "ldm-uncond_seed0_1.png",
        "ldm-uncond_seed0_2.png",
        "ldm-uncond_seed0_grid.png",
        "ldm_a-squirrel_seed0_0.png",
        "sd_a-cat_seed0_0.png",
        "sd_a-cat_seed0_1.png",
        "sd_a-cat_seed0_grid.png",
    ]
    assert Image.open(tmp_path / "sd_a-cat_seed0_0.png").size == (96, 64) and Image.open(
        tmp_path / "sd_a-cat_seed0_grid.png"
    ).size == (192, 64)
    assert (
        "step 3/3" in output
        and output.count("step 2/2") == 2
        and f"wrote 3 file(s):\n  {tmp_path / 'sd_a-cat_seed0_0.png'}" in output
    )
    with pytest.raises(SystemExit, match="unknown scheduler 'Fast'"):
        main(
            [
                "sd",
                "a cat",
                "--weights",
                str(sd["folder"]),
                "--scheduler",
                "Fast",
                "--out",
                str(tmp_path),
            ]
        )


@pytest.mark.parametrize("threshold, flagged", [(-1.0, True), (1.0, False)])
def test_safety_checker_reports_and_never_blacks_out(sd, tmp_path, threshold, flagged):
    """With a safety checker in the folder, nsfw_content_detected equals diffusers' flags; where
    diffusers replaces a flagged image by black, minildm returns the image as generated."""
    import shutil

    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from test_safety_checker import SMALL_TEXT, SMALL_VISION

    checker = randomize_(
        StableDiffusionSafetyChecker(
            transformers.CLIPConfig(
                vision_config=SMALL_VISION, text_config=SMALL_TEXT, projection_dim=16
            )
        ).eval()
    )
    with (
        torch.no_grad()
    ):  # every concept fires (threshold -1) or none does (+1: cosine similarities are at most 1)
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    folder = tmp_path / "pipeline"
    shutil.copytree(sd["folder"], folder)
    checker.save_pretrained(folder / "safety_checker")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    unchecked = StableDiffusionPipeline.from_pretrained(folder, safety_checker=False)
    assert pipe.safety_checker is not None and unchecked.safety_checker is None
    reference = quietly(
        diffusers.StableDiffusionPipeline,
        **dict(
            sd["reference"].components,
            safety_checker=checker,
            feature_extractor=transformers.CLIPImageProcessor(crop_size=224, size=224),
        ),
    )
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = reference_scheduler("PNDMScheduler", SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    call = dict(
        prompt=["a cat", "a dog"], height=64, width=64, num_inference_steps=3, output_type="np"
    )
    expected = quietly(reference, generator=torch.Generator().manual_seed(0), **call)
    got = pipe(generator=torch.Generator().manual_seed(0), **call)
    assert got.nsfw_content_detected == expected.nsfw_content_detected == [flagged, flagged]
    as_generated = unchecked(generator=torch.Generator().manual_seed(0), **call).images
    # reported, not blacked out
    assert np.array_equal(got.images, as_generated) and got.images.max() > 0
    print(
        f"safety checker threshold {threshold}: flags {got.nsfw_content_detected} as diffusers'; "
        "images kept "
        f"(diffusers' max pixel {expected.images.max():.2f}, minildm's {got.images.max():.2f})"
    )
