"""Autoencoders: parity with diffusers' AutoencoderKL and VQModel at the three official configs."""

import json

import pytest
import torch
from conftest import max_relative_error, oracle, randomize_
from safetensors.torch import save_file

import minildm
from minildm.autoencoder import (
    KL_F8,
    VQ_F4_CELEBAHQ,
    VQ_F8_ITHQ,
    AutoencoderConfig,
    AutoencoderKL,
    VQModel,
)
from minildm.checkpoints.autoencoder import config_from_diffusers, load_autoencoder, original_name

TOLERANCE = 1e-4  # fp32, max abs error relative to the output's max abs value

# The hub config.json contents (vae/ of CompVis/stable-diffusion-v1-4, vqvae/ of
# CompVis/ldm-celebahq-256 and of microsoft/vq-diffusion-ithq). Note the absent scaling_factor for
# the VQ models.
HUB_CONFIGS = {
    "KL-f8 (SD v1, LDM text2im)": dict(
        _class_name="AutoencoderKL",
        act_fn="silu",
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    "VQ-f4 (CelebA-HQ)": dict(
        _class_name="VQModel",
        act_fn="silu",
        block_out_channels=[128, 256, 512],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        layers_per_block=2,
        num_vq_embeddings=8192,
        sample_size=256,
    ),
    "VQ-f8 (VQ-Diffusion ITHQ)": dict(
        _class_name="VQModel",
        act_fn="silu",
        block_out_channels=[64, 128, 256, 512],
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        in_channels=3,
        out_channels=3,
        latent_channels=256,
        layers_per_block=2,
        norm_num_groups=32,
        num_vq_embeddings=4096,
        sample_size=32,
        vq_embed_dim=128,
    ),
}
PRESETS = {
    "KL-f8 (SD v1, LDM text2im)": KL_F8,
    "VQ-f4 (CelebA-HQ)": VQ_F4_CELEBAHQ,
    "VQ-f8 (VQ-Diffusion ITHQ)": VQ_F8_ITHQ,
}
IMAGE_SIZE = {
    "KL-f8 (SD v1, LDM text2im)": (64, 96),
    "VQ-f4 (CelebA-HQ)": (48, 64),
    "VQ-f8 (VQ-Diffusion ITHQ)": (64, 96),
}  # non-square


def diffusers_model(config: dict):
    diffusers = oracle("diffusers")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, config["_class_name"])(**kwargs)


def legacy_attention_names(state: dict, four_d: bool) -> dict:
    """The 2022 diffusers AttentionBlock names the hub files carry, optionally as 1x1 convs
    (docs/parity/models.md, 2022 attention names and 1x1-conv weights in hub files)."""
    out = {}
    for key, value in state.items():
        for new, old in {
            "to_q": "query",
            "to_k": "key",
            "to_v": "value",
            "to_out.0": "proj_attn",
        }.items():
            if f".attentions.0.{new}." in key or (".attentions." in key and f".{new}." in key):
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if four_d and value.ndim == 2 else value
        out[key] = value.contiguous()
    return out


@pytest.fixture(scope="module", params=list(HUB_CONFIGS))
def reference(request, tmp_path_factory):
    name, config = request.param, HUB_CONFIGS[request.param]
    model = randomize_(diffusers_model(config).eval())
    root = tmp_path_factory.mktemp("vae")
    modern = root / "modern"
    model.save_pretrained(modern)
    x = torch.rand(2, 3, *IMAGE_SIZE[name], generator=torch.Generator().manual_seed(1)) * 2 - 1
    return dict(
        name=name,
        config=config,
        model=model,
        modern=modern,
        root=root,
        x=x,
        encoded=reference_encode(model, x),
    )


def reference_encode(model, x):
    """diffusers' encoder output: (mean, logvar) for AutoencoderKL, the pre-quantization latents for VQModel."""
    with torch.no_grad():
        if type(model).__name__ == "AutoencoderKL":
            posterior = model.encode(x).latent_dist
            return posterior.mean, posterior.logvar
        return model.encode(x).latents


def hub_folder(reference, four_d=False):
    """A folder as on the hub: the hub's config.json, and a .bin with the 2022 attention names."""
    folder = reference["root"] / ("legacy-4d" if four_d else "legacy")
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(reference["config"]))
    torch.save(
        legacy_attention_names(reference["model"].state_dict(), four_d),
        folder / "diffusion_pytorch_model.bin",
    )
    return folder


def compare(label, got, expected, tolerance=TOLERANCE):
    error = max_relative_error(got.float(), expected)
    print(f"{label}: max relative error {error:.2e} (tolerance {tolerance:.0e})")
    assert got.shape == expected.shape and error < tolerance


def check_parity(ours, reference, layout):
    diffusers_model, x, name = reference["model"], reference["x"], f"{reference['name']} [{layout}]"
    with torch.no_grad():
        if isinstance(ours, AutoencoderKL):
            mean, logvar = ours.encode(x)
            compare(f"{name} encode mean", mean, reference["encoded"][0])
            compare(f"{name} encode logvar", logvar, reference["encoded"][1])
            z = reference["encoded"][0]
            compare(
                f"{name} sample",
                ours.sample(mean, logvar, torch.Generator().manual_seed(3)),
                diffusers_model.encode(x).latent_dist.sample(
                    generator=torch.Generator().manual_seed(3)
                ),
            )
            compare(f"{name} decode", ours.decode(z), diffusers_model.decode(z).sample)
        else:
            h_ref = reference["encoded"]
            compare(f"{name} encode", ours.encode(x), h_ref)
            # quantize the same latents on both sides: indices must be identical, not merely close
            z_q, indices = ours.quantize(h_ref)
            ref_z_q, _, (_, _, ref_indices) = diffusers_model.quantize(h_ref)
            assert torch.equal(indices.flatten(), ref_indices.flatten()) and indices.shape == (
                2,
                *h_ref.shape[2:],
            )
            print(
                f"{name} quantize: {indices.numel()} indices identical, {indices.unique().numel()} distinct codes"
            )
            compare(f"{name} quantized latents", z_q, ref_z_q)
            compare(
                f"{name} decode (quantized)",
                ours.decode(h_ref),
                diffusers_model.decode(h_ref).sample,
            )
            compare(
                f"{name} decode (not quantized)",
                ours.decode(h_ref, quantize=False),
                diffusers_model.decode(h_ref, force_not_quantize=True).sample,
            )
            # VQ-Diffusion's path: indices -> codebook vectors -> decoder
            # (diffusers' pipeline_vq_diffusion.py)
            h, w = h_ref.shape[2:]
            codes = diffusers_model.quantize.get_codebook_entry(
                ref_indices.flatten(), (2, h, w, ours.config.code_dim)
            )
            compare(
                f"{name} decode_indices",
                ours.decode_indices(ref_indices.view(2, h * w), (h, w)),
                diffusers_model.decode(codes, force_not_quantize=True).sample,
            )


def test_folder_saved_by_diffusers(reference):
    ours = minildm.load_component(reference["modern"])
    assert isinstance(
        ours, VQModel if reference["config"]["_class_name"] == "VQModel" else AutoencoderKL
    )
    check_parity(ours, reference, "diffusers save_pretrained, modern names")


@pytest.mark.parametrize(
    "four_d", [False, True], ids=["2022 names", "2022 names, 1x1 conv weights"]
)
def test_hub_folder_with_2022_attention_names(reference, four_d):
    ours = minildm.load_component(hub_folder(reference, four_d))
    assert ours.config == PRESETS[reference["name"]]  # the hub config gives exactly the preset
    check_parity(ours, reference, "hub config, 2022 names" + (", 4-D" if four_d else ""))


def original_layout(ours, prefix: str) -> dict:
    """Invert our key map: our state dict written out with the original (CompVis / taming) names,
    attention projections as 1x1 convs as the original modules store them."""
    levels = len(ours.config.channels)
    out = {}
    for key, value in ours.state_dict().items():
        is_attention_weight = ("attention" in key) and key.endswith("weight") and value.ndim == 2
        out[prefix + original_name(key, levels)] = (
            value[:, :, None, None] if is_attention_weight else value
        )
    return out


# diffusers' converter cannot convert attention inside levels, so VQ-Diffusion's model has its own test below
@pytest.mark.parametrize(
    "reference", ["KL-f8 (SD v1, LDM text2im)", "VQ-f4 (CelebA-HQ)"], indirect=True
)
def test_original_compvis_layout_through_diffusers_converter(reference):
    """Our inverted map must produce a checkpoint that diffusers' own converter reads into the same model."""
    convert = oracle("diffusers.loaders.single_file_utils").convert_ldm_vae_checkpoint
    ours = minildm.load_component(reference["modern"])
    original = original_layout(ours, "first_stage_model.")
    converted = convert(original, reference["config"])
    if isinstance(
        ours, VQModel
    ):  # the KL converter leaves the codebook alone; its name is unchanged
        # (diffusers' single_file_utils.py convert_ldm_vae_checkpoint)
        converted["quantize.embedding.weight"] = original[
            "first_stage_model.quantize.embedding.weight"
        ]
    rebuilt = diffusers_model(reference["config"]).eval()
    rebuilt.load_state_dict(converted, strict=True)
    rebuilt_reference = dict(
        reference, model=rebuilt, encoded=reference_encode(rebuilt, reference["x"])
    )
    check_parity(ours, rebuilt_reference, "CompVis layout -> diffusers converter")
    # training-only extras are dropped by name
    original["first_stage_model.loss.logvar"] = torch.zeros(())
    check_parity(load_autoencoder(ours.config, original), reference, "CompVis layout -> minildm")


def test_original_vq_diffusion_layout():
    """ithq_vqvae.pth["model"]: taming names, 4-D attention weights, the codebook as a bare tensor
    `quantize.embedding`, and the EMA quantizer's statistics (diffusers'
    scripts/convert_vq_diffusion_to_diffusers.py)."""
    assert (
        original_name("encoder.levels.3.attentions.1.q.weight", 4)
        == "encoder.down.3.attn.1.q.weight"
    )
    assert (
        original_name("decoder.levels.0.attentions.2.out.weight", 4)
        == "decoder.up.3.attn.2.proj_out.weight"
    )
    assert (
        original_name("decoder.levels.1.resample.conv.bias", 4) == "decoder.up.2.upsample.conv.bias"
    )
    assert original_name("encoder.mid.attention.norm.weight", 4) == "encoder.mid.attn_1.norm.weight"
    assert (
        original_name("decoder.levels.3.resnets.2.shortcut.weight", 4)
        == "decoder.up.0.block.2.nin_shortcut.weight"
    )
    model = randomize_(VQModel(VQ_F8_ITHQ))
    original = original_layout(model, "")
    original["quantize.embedding"] = original.pop("quantize.embedding.weight")
    original["quantize.cluster_size"] = torch.ones(4096)
    original["quantize.embedding_avg"] = torch.ones(4096, 128)
    assert len(original) == 303 + 2
    loaded = load_autoencoder(VQ_F8_ITHQ, original)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_vq_config_without_scaling_factor_keeps_the_original_scale():
    # the hub's ldm-celebahq-256 vqvae config names no scaling_factor: diffusers then uses 0.18215,
    # the original LDM 1.0 (docs/parity/pipelines.md, "LDM CelebA-HQ: the latent scale is 1, not
    # 0.18215")
    assert config_from_diffusers(HUB_CONFIGS["VQ-f4 (CelebA-HQ)"]).scaling_factor == 1.0
    assert (
        config_from_diffusers(
            dict(HUB_CONFIGS["VQ-f4 (CelebA-HQ)"], scaling_factor=0.5)
        ).scaling_factor
        == 0.5
    )
    assert (
        config_from_diffusers(
            {
                k: v
                for k, v in HUB_CONFIGS["KL-f8 (SD v1, LDM text2im)"].items()
                if k != "scaling_factor"
            }
        ).scaling_factor
        == 0.18215
    )


def test_bfloat16_within_tolerance_of_float32(reference):
    ours = minildm.load_component(reference["modern"], dtype=torch.bfloat16)
    ours32 = minildm.load_component(reference["modern"])
    is_vq = isinstance(ours, VQModel)
    with torch.no_grad():
        latent = reference["encoded"] if is_vq else reference["encoded"][0]
        # decode without snapping to the codebook: in bf16 a latent near the boundary between two codes
        # can land on the other one, a discrete change that says nothing about the decoder's precision
        decode32 = (
            (lambda m, z: m.decode(z, quantize=False)) if is_vq else (lambda m, z: m.decode(z))
        )
        got, expected = decode32(ours, latent.bfloat16()), decode32(ours32, latent)
        encoded = ours.encode(reference["x"].bfloat16())
    assert got.dtype == torch.bfloat16
    compare(f"{reference['name']} bf16 decode vs fp32", got, expected, tolerance=5e-2)
    compare(
        f"{reference['name']} bf16 encode vs fp32",
        encoded if is_vq else encoded[0],
        latent,
        tolerance=5e-2,
    )
    if is_vq:
        same = (
            (ours32.quantize(encoded.float())[1] == ours32.quantize(latent)[1])
            .float()
            .mean()
            .item()
        )
        print(f"{reference['name']} bf16 encode: {same:.1%} of code indices equal to fp32's")
        assert same > 0.5


SMALL = AutoencoderConfig(
    channels=(32, 64), attention_levels=(1,), latent_channels=4, codebook_size=64, code_dim=4
)


def test_float16_small_shapes_and_slicing():
    model32 = randomize_(VQModel(SMALL)).eval()
    model16 = load_autoencoder(SMALL, model32.state_dict(), dtype=torch.float16)
    x = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h = model32.encode(x)
        compare("small VQ fp16 encode vs fp32", model16.encode(x.half()), h, tolerance=5e-3)
        compare(
            "small VQ fp16 decode vs fp32",
            model16.decode(h.half(), quantize=False),
            model32.decode(h, quantize=False),
            tolerance=5e-3,
        )
        compare(
            "small VQ decode sliced vs batched",
            model32.decode(h, sliced=True),
            model32.decode(h),
            tolerance=1e-5,
        )
        kl = randomize_(AutoencoderKL(AutoencoderConfig(channels=(32, 64)))).eval()
        z = torch.randn(3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
        compare(
            "small KL decode sliced vs batched",
            kl.decode(z, sliced=True),
            kl.decode(z),
            tolerance=1e-5,
        )


def test_non_finite_decode_suggests_float32():
    model = randomize_(AutoencoderKL(AutoencoderConfig(channels=(32, 64))))
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(1e5)  # activations beyond float16's 65504
    model16 = load_autoencoder(model.config, model.state_dict(), dtype=torch.float16)
    with pytest.raises(FloatingPointError, match="Run the autoencoder in float32"):
        model16.decode(torch.randn(1, 4, 4, 4, dtype=torch.float16))


def test_bad_input_is_refused():
    kl = randomize_(AutoencoderKL(AutoencoderConfig(channels=(32, 64, 64))))
    vq = randomize_(VQModel(SMALL))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        kl.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        kl.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"expected KL latents of shape \(B, 4, h, w\)"):
        kl.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected VQ latents of shape \(B, 4, h, w\)"):
        vq.quantize(torch.zeros(1, 8, 4, 4))
    with pytest.raises(
        ValueError, match=r"in \[0, 64\), got \[0, 64\]; 64 is VQ-Diffusion's mask class"
    ):
        vq.decode_indices(torch.tensor([[0, 64, 3, 5]]), (2, 2))
    with pytest.raises(ValueError, match=r"in \[0, 64\), got \[-1, 5\]"):
        vq.decode_indices(torch.tensor([[0, -1, 3, 5]]), (2, 2))
    with pytest.raises(ValueError, match=r"integer indices of shape \(B, 6\)"):
        vq.decode_indices(torch.tensor([[0, 1, 3, 5]]), (2, 3))


def test_checkpoint_of_the_other_kind_is_refused(reference):
    state = reference["model"].state_dict()
    other = KL_F8 if reference["config"]["_class_name"] == "VQModel" else VQ_F4_CELEBAHQ
    with pytest.raises(
        minildm.CheckpointError, match="(?s)likely cause: .*(AutoencoderKL|VQModel)"
    ):
        load_autoencoder(other, state)
    save_file(
        {k: v.contiguous() for k, v in list(state.items())[:-1]},
        reference["root"] / "partial.safetensors",
    )
    with pytest.raises(minildm.CheckpointError, match=r"missing from the checkpoint \(1: "):
        load_autoencoder(
            PRESETS[reference["name"]],
            minildm.read_state_dict(reference["root"] / "partial.safetensors"),
        )
