"""VQ-Diffusion pipeline end to end against diffusers' VQDiffusionPipeline on small random
components."""

import json

import numpy as np
import pytest
import torch
from conftest import oracle, randomize_, write_clip_hub_folder

import minildm
from minildm.pipelines.vq_diffusion import VQDiffusionPipeline, truncate

PROMPTS = ["teddy bears working on new AI research underwater", "a watercolor of Kyoto in spring"]


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """Small random components (VQ-VAE f2 with 64 codes, a 1-block 32-wide transformer over an 8x8
    grid, a 2-layer CLIP) saved in the hub layout of microsoft/vq-diffusion-ithq, and diffusers'
    pipeline built from the same objects."""
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    import warnings

    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vqvae = randomize_(
            diffusers.VQModel(
                block_out_channels=[32, 64],
                down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                latent_channels=16,
                num_vq_embeddings=64,
                vq_embed_dim=8,
                norm_num_groups=8,
                layers_per_block=1,
            ).eval(),
            seed=1,
        )
        transformer = randomize_(
            diffusers.Transformer2DModel(
                num_attention_heads=2,
                attention_head_dim=16,
                num_vector_embeds=65,
                sample_size=8,
                num_layers=1,
                cross_attention_dim=32,
                num_embeds_ada_norm=100,
                activation_fn="geglu-approximate",
                attention_bias=True,
                norm_num_groups=8,
            ).eval(),
            seed=2,
        )
        text_encoder = randomize_(
            transformers.CLIPTextModel(
                transformers.CLIPTextConfig(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
                )
            ).eval(),
            seed=3,
        )
        embeddings = LearnedClassifierFreeSamplingEmbeddings(
            learnable=True, hidden_size=32, length=77
        )
        with torch.no_grad():
            embeddings.embeddings.normal_(generator=torch.Generator().manual_seed(4))
        scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=65)
    folder = tmp_path_factory.mktemp("vq-diffusion") / "pipeline"
    for name, part in [
        ("vqvae", vqvae),
        ("transformer", transformer),
        ("text_encoder", text_encoder),
        ("learned_classifier_free_sampling_embeddings", embeddings),
    ]:
        part.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    write_clip_hub_folder(folder / "tokenizer", pad_token="!")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "VQDiffusionPipeline",
                "_diffusers_version": "0.8.0.dev0",
                "learned_classifier_free_sampling_embeddings": [
                    "vq_diffusion",
                    "LearnedClassifierFreeSamplingEmbeddings",
                ],
                "scheduler": ["diffusers", "VQDiffusionScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "transformer": ["diffusers", "Transformer2DModel"],
                "vqvae": ["diffusers", "VQModel"],
            }
        )
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        folder / "tokenizer", pad_token="!", model_max_length=77
    )
    reference = diffusers.VQDiffusionPipeline(
        vqvae=vqvae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=embeddings,
    )
    reference.set_progress_bar_config(disable=True)
    return dict(folder=folder, reference=reference)


@pytest.mark.parametrize("truncation_rate", [1.0, 0.86])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_same_codes_at_every_step_and_same_images(hub_folder, guidance_scale, truncation_rate):
    ours = VQDiffusionPipeline.from_pretrained(hub_folder["folder"])
    ours_steps, theirs_steps = [], []
    kwargs = dict(
        num_inference_steps=100,
        guidance_scale=guidance_scale,
        truncation_rate=truncation_rate,
        num_images_per_prompt=2,
        output_type="np",
    )
    expected = hub_folder["reference"](
        PROMPTS,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x: theirs_steps.append(x.clone()),
        **kwargs,
    ).images
    got = ours(
        PROMPTS,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x: ours_steps.append(x.clone()),
        **kwargs,
    ).images
    assert len(ours_steps) == len(theirs_steps) == 100
    differing = [
        i
        for i, (a, b) in enumerate(zip(ours_steps, theirs_steps, strict=True))
        if not torch.equal(a, b)
    ]
    image_error = float(np.abs(got - expected).max())
    print(
        f"VQ-Diffusion pipeline guidance {guidance_scale}, truncation {truncation_rate}: "
        f"codes identical at {100 - len(differing)}/100 steps, "
        f"{int((ours_steps[-1] != 64).sum())} of {ours_steps[-1].numel()} final codes unmasked, "
        f"image max abs difference {image_error:.1e}"
    )
    assert not differing, f"codes differ from step {differing[0]}"
    # the same codes through the same decoder weights: float32 images equal up to convolution
    # rounding
    assert got.shape == (4, 16, 16, 3) and image_error < 1e-5


def test_truncate_equals_diffusers():
    diffusers = oracle("diffusers")
    log_p = torch.log_softmax(
        3 * torch.randn(2, 64, 10, generator=torch.Generator().manual_seed(0)), dim=1
    )
    for rate in (1.0, 0.86, 0.5, 1e-3):
        expected = diffusers.VQDiffusionPipeline.truncate(None, log_p, rate)
        got = truncate(log_p, rate)
        assert torch.equal(got, expected), rate
        assert torch.isfinite(got).sum(dim=1).min() >= 1  # the most likely code always survives
    print("truncate: identical to diffusers at rates 1.0, 0.86, 0.5, 0.001")


def test_outputs_and_bad_input(hub_folder):
    pipe = VQDiffusionPipeline.from_pretrained(hub_folder["folder"])
    pil = pipe("a cat", num_inference_steps=100, generator=torch.Generator().manual_seed(0)).images
    as_tensor = pipe(
        "a cat",
        num_inference_steps=100,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        return_dict=False,
    )[0]
    assert pil[0].size == (16, 16) and as_tensor.shape == (1, 3, 16, 16)
    assert np.array_equal(
        np.asarray(pil[0]), (as_tensor[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    )
    for rate in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"truncation_rate must lie in \(0, 1\]"):
            pipe("a cat", truncation_rate=rate)
    with pytest.raises(ValueError, match=r"latents must be integer code indices in \[0, 64\]"):
        pipe("a cat", latents=torch.full((1, 64), 65))
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 64\)"):
        pipe("a cat", num_images_per_prompt=2, latents=torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        pipe("a cat", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="output_type must be"):
        pipe("a cat", output_type="latent")
    (hub_folder["folder"].parent / "other").mkdir(exist_ok=True)
    (hub_folder["folder"].parent / "other" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    with pytest.raises(
        minildm.CheckpointError,
        match="holds a 'StableDiffusionPipeline', not a VQDiffusionPipeline",
    ):
        VQDiffusionPipeline.from_pretrained(hub_folder["folder"].parent / "other")


def test_command_line_writes_a_png(hub_folder, tmp_path, capsys):
    from PIL import Image

    from minildm.__main__ import main

    main(
        [
            "vq-diffusion",
            "a teddy bear playing in the pool",
            "--weights",
            str(hub_folder["folder"]),
            "--steps",
            "100",
            "-n",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    written = sorted(tmp_path.glob("*.png"))
    output = capsys.readouterr().out
    assert [p.name for p in written] == [
        "vq-diffusion_a-teddy-bear-playing-in-the-pool_seed0_0.png",
        "vq-diffusion_a-teddy-bear-playing-in-the-pool_seed0_1.png",
        "vq-diffusion_a-teddy-bear-playing-in-the-pool_seed0_grid.png",
    ]
    assert f"wrote 3 file(s):\n  {written[0]}" in output and Image.open(written[2]).size == (32, 16)
    assert Image.open(written[0]).size == (16, 16) and "step 100/100" in output
    with pytest.raises(SystemExit, match="neither a local folder nor in the Hugging Face cache"):
        main(["vq-diffusion", "a cat", "--weights", "someone/not-downloaded"])
