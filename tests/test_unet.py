"""UNet: parity with diffusers' UNet2DConditionModel / UNet2DModel at the three official configs."""

import json

import pytest
import torch
from conftest import max_relative_error, oracle, randomize_

import minildm
from minildm.checkpoints.unet import config_from_diffusers, file_names, load_unet, original_name
from minildm.cpu_speed import speed_up
from minildm.unet import (
    CELEBAHQ,
    LDM_TEXT2IM,
    SD_V1,
    UNet,
    UNetConfig,
)

TOLERANCE = 1e-4  # fp32, max abs error relative to the output's max abs value

# The hub unet/config.json contents (CompVis/stable-diffusion-v1-4, CompVis/ldm-text2im-large-256,
# CompVis/ldm-celebahq-256); the LDM one has no cross_attention_dim.
SD_CONFIG = dict(
    _class_name="UNet2DConditionModel",
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
HUB_CONFIGS = {
    "SD v1": SD_CONFIG,
    "LDM text2im": {
        k: (32 if k == "sample_size" else v)
        for k, v in SD_CONFIG.items()
        if k != "cross_attention_dim"
    },
    "CelebA-HQ": dict(
        _class_name="UNet2DModel",
        act_fn="silu",
        attention_head_dim=32,
        block_out_channels=[224, 448, 672, 896],
        center_input_sample=False,
        down_block_types=["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=3,
        layers_per_block=2,
        mid_block_scale_factor=1,
        norm_eps=1e-05,
        norm_num_groups=32,
        out_channels=3,
        sample_size=64,
        time_embedding_type="positional",
        up_block_types=["AttnUpBlock2D"] * 3 + ["UpBlock2D"],
    ),
}
PRESETS = {"SD v1": SD_V1, "LDM text2im": LDM_TEXT2IM, "CelebA-HQ": CELEBAHQ}
# diffusers' models at the hub configs; the CompVis code prints
# "DiffusionWrapper has 859.52 M params" for SD v1 and 872.30 M for LDM text2im
PARAMETERS = {"SD v1": 859_520_964, "LDM text2im": 872_300_484, "CelebA-HQ": 274_056_163}


def diffusers_unet(config: dict):
    diffusers = oracle("diffusers")
    return getattr(diffusers, config["_class_name"])(
        **{k: v for k, v in config.items() if not k.startswith("_")}
    )


def inputs(preset: UNetConfig, batch=3, size=(16, 24), seed=0):
    """Small non-square latents, one timestep per sample, and a text context where the UNet has one."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, preset.in_channels, *size, generator=g)
    timesteps = torch.tensor([999, 500, 1][:batch])
    context = (
        torch.randn(batch, 77, preset.context_dim, generator=g) if preset.context_dim else None
    )
    return sample, timesteps, context


def run_reference(model, sample, timesteps, context):
    with torch.no_grad():
        if context is None:
            return model(sample, timesteps).sample
        return model(sample, timesteps, encoder_hidden_states=context).sample


def run_ours(model, sample, timesteps, context):
    with torch.no_grad():
        return model(sample, timesteps, context)


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_config_parameter_count_and_key_coverage_on_meta(name):
    """Cheap, at full size: the hub config gives the preset, the official parameter count, and a key map
    that covers every diffusers tensor with the same shape."""
    config = config_from_diffusers(HUB_CONFIGS[name])
    assert config == PRESETS[name]
    with torch.device("meta"):
        ours, reference = UNet(config), diffusers_unet(HUB_CONFIGS[name])
    count = sum(p.numel() for p in ours.parameters())
    print(f"UNet {name}: {count:,} parameters")
    assert count == PARAMETERS[name] == sum(p.numel() for p in reference.parameters())
    table, ours_state = file_names(ours), ours.state_dict()
    reference_state = reference.state_dict()
    assert all(k in table for k in reference_state), [k for k in reference_state if k not in table][
        :5
    ]
    assert {table[k] for k in reference_state} == set(ours_state)
    assert all(ours_state[table[k]].shape == v.shape for k, v in reference_state.items())


@pytest.fixture(scope="module", params=list(HUB_CONFIGS))
def reference(request, tmp_path_factory):
    name = request.param
    model = randomize_(diffusers_unet(HUB_CONFIGS[name]).eval())
    folder = tmp_path_factory.mktemp("unet") / "unet"
    model.save_pretrained(folder)
    args = inputs(PRESETS[name])
    return dict(
        name=name, model=model, folder=folder, args=args, expected=run_reference(model, *args)
    )


def check(label, got, expected, tolerance=TOLERANCE):
    error = max_relative_error(got.float(), expected)
    print(f"UNet {label}: max relative error {error:.2e} (tolerance {tolerance:.0e})")
    assert got.shape == expected.shape and error < tolerance


def test_folder_saved_by_diffusers(reference):
    ours = minildm.load_component(reference["folder"])
    assert isinstance(ours, UNet) and ours.config == PRESETS[reference["name"]]
    check(
        f"{reference['name']} diffusers folder, batch 3, latents 16x24, t=(999, 500, 1)",
        run_ours(ours, *reference["args"]),
        reference["expected"],
    )


# latents of images that are multiples of 8 but not of 64: SD 520x776, LDM 264x200 (f8)
ODD_LATENTS = {"SD v1": (65, 97), "LDM text2im": (33, 25)}


@pytest.mark.parametrize("reference", list(ODD_LATENTS), indirect=True)
def test_latents_not_divisible_by_the_unet_factor_match_diffusers(reference):
    """An odd size is rounded up by each stride-2 conv (65 -> 33 -> 17 -> 9); on the way up each
    level upsamples to its skip's size, as diffusers' UNet2DConditionModel does (upsample_size)."""
    name = reference["name"]
    ours = minildm.load_component(reference["folder"])
    size = ODD_LATENTS[name]
    args = inputs(PRESETS[name], batch=1, size=size, seed=1)
    expected = run_reference(reference["model"], *args)
    check(f"{name} latents {size[0]}x{size[1]}, t=999", run_ours(ours, *args), expected)


@pytest.mark.parametrize("reference", ["CelebA-HQ"], indirect=True)
def test_celebahq_hub_file_with_2022_attention_names(reference, tmp_path):
    state = {}
    for key, value in reference["model"].state_dict().items():
        for new, old in {
            "to_q": "query",
            "to_k": "key",
            "to_v": "value",
            "to_out.0": "proj_attn",
        }.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS["CelebA-HQ"]))
    check(
        "CelebA-HQ hub layout (query/key/value/proj_attn, .bin)",
        run_ours(minildm.load_component(tmp_path), *reference["args"]),
        reference["expected"],
    )


def fuse_qkv(q, k, v, head_channels):
    """The inverse of the head-major split (docs/parity/models.md, The fused qkv of openaimodel's
    AttentionBlock is laid out head by head): per head, its q rows, k rows, v rows."""
    C = q.shape[0]
    per_head = [t.reshape(C // head_channels, head_channels, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_head, dim=1).reshape(3 * C, *q.shape[1:])


def original_layout(ours: UNet) -> dict:
    """Invert our key map: our weights under openaimodel's names (`model.diffusion_model.` prefix).
    CelebA-HQ's attention blocks get their fused Conv1d qkv [3C, C, 1] and Conv1d proj_out."""
    config, state = ours.config, ours.state_dict()
    out = {"model.diffusion_model." + original_name(k, config): v for k, v in state.items()}
    if config.context_dim is None:
        for key in [k for k in out if k.endswith((".q.weight", ".q.bias"))]:
            suffix = key.rsplit(".", 1)[1]
            base = key[: -len(f"q.{suffix}")]
            q, k, v = (out.pop(f"{base}{part}.{suffix}") for part in "qkv")
            fused = fuse_qkv(q, k, v, config.head_channels)
            out[f"{base}qkv.{suffix}"] = fused[..., None] if suffix == "weight" else fused
            if suffix == "weight":
                out[f"{base}proj_out.weight"] = out[f"{base}proj_out.weight"][..., None]
    return out


@pytest.mark.parametrize("reference", ["SD v1"], indirect=True)
def test_original_sd_layout_through_diffusers_converter(reference):
    """Our inverted map must give a checkpoint that diffusers' own converter reads into the same UNet."""
    convert = oracle("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    ours = minildm.load_component(reference["folder"])
    original = original_layout(ours)
    assert (
        "model.diffusion_model.output_blocks.5.2.conv.weight" in original
        and "model.diffusion_model.input_blocks.3.0.op.weight" in original
    )
    rebuilt = diffusers_unet(HUB_CONFIGS["SD v1"]).eval()
    rebuilt.load_state_dict(convert(original, HUB_CONFIGS["SD v1"]), strict=True)
    check(
        "SD CompVis layout -> diffusers converter",
        run_reference(rebuilt, *reference["args"]),
        reference["expected"],
    )
    original["model_ema.decay"], original["model_ema.num_updates"] = (
        torch.tensor(0.9999),
        torch.tensor(1000),
    )  # as in sd-v1-4.ckpt
    check(
        "SD CompVis layout -> minildm",
        run_ours(load_unet(SD_V1, original), *reference["args"]),
        reference["expected"],
    )


def legacy_attention(x, norm, qkv_weight, qkv_bias, proj_weight, proj_bias, heads):
    """openaimodel AttentionBlock with QKVAttentionLegacy, from the original code's semantics:
    qkv = conv1d(norm(x)); per head, split its 3*Dh channels into q, k, v; scale both q and k by
    Dh^-1/4; softmax over keys; proj_out; residual. Independent of minildm's split."""
    B, C, H, W = x.shape
    h = torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-5).reshape(B, C, H * W)
    qkv = torch.nn.functional.conv1d(h, qkv_weight, qkv_bias)  # (B, 3C, HW)
    Dh = C // heads
    q, k, v = qkv.reshape(B * heads, 3 * Dh, H * W).split(Dh, dim=1)
    scale = 1 / Dh**0.25
    weights = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weights, v).reshape(B, C, H * W)
    return x + torch.nn.functional.conv1d(a, proj_weight, proj_bias).reshape(B, C, H, W)


def test_original_celebahq_layout_with_fused_qkv():
    """The CelebA-HQ attention blocks' fused, head-major qkv: our split must compute what the
    original attention computes with the fused tensor."""
    ours = randomize_(UNet(CELEBAHQ)).eval()
    original = original_layout(ours)
    assert original["model.diffusion_model.middle_block.1.qkv.weight"].shape == (3 * 896, 896, 1)
    loaded = load_unet(CELEBAHQ, original)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    x = torch.randn(2, 896, 4, 6, generator=torch.Generator().manual_seed(0))
    p = "model.diffusion_model.middle_block.1."
    with torch.no_grad():
        expected = legacy_attention(
            x,
            ours.mid["attention"].norm,
            original[p + "qkv.weight"],
            original[p + "qkv.bias"],
            original[p + "proj_out.weight"],
            original[p + "proj_out.bias"],
            heads=896 // 32,
        )
        check(
            "CelebA-HQ fused qkv attention vs the original QKVAttentionLegacy",
            loaded.mid["attention"](x),
            expected,
        )


TINY = UNetConfig(channels=(32, 64), attention_levels=(1,), context_dim=16, heads=2)


def test_full_ema_checkpoint_needs_an_explicit_choice():
    trained, averaged = randomize_(UNet(TINY), seed=1).eval(), randomize_(UNet(TINY), seed=2).eval()
    checkpoint = original_layout(trained)
    for key, value in original_layout(averaged).items():
        checkpoint["model_ema." + "".join(key.split(".")[1:])] = value  # LitEma's flattened names
    checkpoint["model_ema.decay"], checkpoint["model_ema.num_updates"] = (
        torch.tensor(0.9999),
        torch.tensor(10),
    )
    with pytest.raises(minildm.CheckpointError, match="pass ema=True .* or ema=False"):
        load_unet(TINY, checkpoint)
    args = inputs(TINY, batch=2, size=(8, 8))
    for ema, source in ((True, averaged), (False, trained)):
        check(
            f"tiny full-EMA checkpoint, ema={ema}",
            run_ours(load_unet(TINY, checkpoint, ema=ema), *args),
            run_ours(speed_up(source), *args),  # the same kernels as the loaded model's
            tolerance=1e-6,
        )
    with pytest.raises(minildm.CheckpointError, match="no EMA copy"):
        load_unet(TINY, original_layout(trained), ema=True)
    # diffusers' converter, an independent reader of the flattened EMA names, picks the same tensors
    convert = oracle("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    table, chosen = file_names(averaged), load_unet(TINY, checkpoint, ema=True).state_dict()
    converted = convert(checkpoint, {"layers_per_block": TINY.layers_per_level}, extract_ema=True)
    assert len(converted) == len(chosen) and all(
        torch.equal(v, chosen[table[k]]) for k, v in converted.items()
    )


@pytest.mark.parametrize("reference", ["SD v1"], indirect=True)
def test_bfloat16_within_tolerance_of_float32(reference):
    ours = minildm.load_component(reference["folder"], dtype=torch.bfloat16)
    sample, timesteps, context = reference["args"]
    got = run_ours(ours, sample.bfloat16(), timesteps, context.bfloat16())
    assert got.dtype == torch.bfloat16
    check("SD v1 bf16 vs fp32", got, reference["expected"], tolerance=5e-2)


def test_float16_small_shapes():
    model = randomize_(UNet(TINY)).eval()
    half = load_unet(
        TINY,
        {
            ("model.diffusion_model." + original_name(k, TINY)): v
            for k, v in model.state_dict().items()
        },
        dtype=torch.float16,
    )
    sample, timesteps, context = inputs(TINY, batch=2, size=(8, 16))
    check(
        "tiny fp16 vs fp32",
        run_ours(half, sample.half(), timesteps, context.half()),
        run_ours(model, sample, timesteps, context),
        tolerance=5e-3,
    )


def test_bad_input_is_refused():
    with torch.device("meta"):
        sd, celeba = UNet(SD_V1), UNet(CELEBAHQ)
    sample = torch.zeros(1, 4, 16, 16, device="meta")
    with pytest.raises(
        ValueError,
        match=r"expected context of shape \(1, L, 768\), got \(1, 77, 1280\).*CLIP ViT-L/14",
    ):
        sd(sample, 10, torch.zeros(1, 77, 1280, device="meta"))
    with pytest.raises(ValueError, match="pass context of shape"):
        sd(sample, 10)
    with pytest.raises(ValueError, match=r"expected latents of at least 1x1, got \(1, 4, 0, 16\)"):
        sd(torch.zeros(1, 4, 0, 16, device="meta"), 10, torch.zeros(1, 77, 768, device="meta"))
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, h, w\)"):
        sd(torch.zeros(1, 3, 16, 16, device="meta"), 10, torch.zeros(1, 77, 768, device="meta"))
    with pytest.raises(ValueError, match=r"one timestep or one per sample \(1,\)"):
        sd(sample, torch.tensor([1, 2]), torch.zeros(1, 77, 768, device="meta"))
    with pytest.raises(ValueError, match="unconditional"):
        celeba(torch.zeros(1, 3, 16, 16, device="meta"), 10, torch.zeros(1, 77, 768, device="meta"))


def test_sd2_style_config_is_refused():
    with pytest.raises(ValueError, match="SD 2.x"):
        config_from_diffusers(dict(SD_CONFIG, use_linear_projection=True, cross_attention_dim=1024))
    with pytest.raises(minildm.CheckpointError, match="SD 2.x UNet"):
        with torch.device("meta"):
            state = {k: v for k, v in UNet(UNetConfig(context_dim=1024)).state_dict().items()}
        load_unet(SD_V1, state)
