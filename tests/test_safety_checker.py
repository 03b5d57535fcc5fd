"""Safety checker: the CLIP vision tower against transformers' CLIPVisionModel, the checker against
diffusers' StableDiffusionSafetyChecker, and the preprocessing against CLIPImageProcessor."""

import copy

import numpy as np
import pytest
import torch
from conftest import max_relative_error, oracle, randomize_
from safetensors.torch import save_file

from minildm.checkpoints.clip import load_clip_vision_model, vision_config_from_diffusers
from minildm.checkpoints.safety_checker import (
    DROPPED_KEYS,
    KEY_RULES,
    config_from_diffusers,
    load_safety_checker,
)
from minildm.checkpoints.weights import (
    CheckpointError,
    find_weights_file,
    read_config,
    read_state_dict,
    remap_keys,
)
from minildm.clip import CLIPVisionConfig, CLIPVisionModel
from minildm.safety_checker import (
    CLIP_MEAN,
    CLIP_STD,
    SafetyChecker,
    SafetyCheckerConfig,
    preprocess,
)

TOLERANCE = 1e-5  # fp32, max abs error relative to the output's max abs value
# A small tower at the real image and patch size, so that the real preprocessing feeds it (257 tokens).
SMALL_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
# in the config, unused by the checker
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
OFFICIAL_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
OFFICIAL_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
)
# the hub's feature_extractor/preprocessor_config.json of CompVis/stable-diffusion-v1-4
PREPROCESSOR_CONFIG = dict(
    crop_size=224,
    size=224,
    resample=3,
    do_center_crop=True,
    do_normalize=True,
    do_resize=True,
    do_convert_rgb=True,
    image_mean=list(CLIP_MEAN),
    image_std=list(CLIP_STD),
)
# the hub's LFS pointer of safety_checker/model.safetensors, CompVis/stable-diffusion-v1-4
# at 133a221
SAFETY_CHECKER_FILE_SIZE = 1_215_981_830


def reference_image_processor():
    """transformers' CLIPImageProcessor from SD v1-4's settings. Without torchvision it falls back to its
    PIL backend (and says so); that is also the backend CLIPImageProcessor used before transformers 5."""
    transformers = oracle("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.CLIPImageProcessor(**PREPROCESSOR_CONFIG)
    finally:
        transformers.logging.set_verbosity(verbosity)


def hub_layout(state: dict) -> dict:
    """The key layout of the hub files (written by transformers 4): transformers' CLIPVisionModel
    nested in its wrapper, `vision_model.vision_model.`, and the `position_ids` buffer."""
    hub = {
        ("vision_model." + k if k.startswith("vision_model.") else k): v.contiguous()
        for k, v in state.items()
    }
    hub["vision_model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    return hub


def random_images(sizes, seed=0) -> list:
    """uint8 (H, W, 3) images: each its own base colour (a random tower's class token mostly sees an
    image's average), with a colour wave and noise on top."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        base = rng.uniform(30, 225, size=3)
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        wave = np.stack(
            [
                np.sin(rng.uniform(2, 12) * x + c) * np.cos(rng.uniform(2, 12) * y - c)
                for c in range(3)
            ],
            axis=-1,
        )
        images.append(
            (base + 30 * wave + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
        )
    return images


# --- the vision tower ----------------------------------------------------------------------------


def test_vision_tower_matches_transformers():
    transformers = oracle("transformers")
    config = transformers.CLIPVisionConfig(**SMALL_VISION)
    reference = randomize_(transformers.CLIPVisionModel(config).eval())
    pixel_values = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values).pooler_output
    ours_config = vision_config_from_diffusers(config.to_dict())
    assert ours_config == CLIPVisionConfig(width=32, layers=2, heads=4, mlp_width=64)
    # transformers 5 saves the tower without a prefix; hub files (transformers 4) with `vision_model.`
    state = reference.state_dict()
    old_layout = {"vision_model." + k: v for k, v in state.items()} | {
        "vision_model.embeddings.position_ids": torch.arange(257)[None]
    }
    for layout, weights in [("transformers 5", state), ("transformers 4", old_layout)]:
        ours = load_clip_vision_model(ours_config, weights)
        with torch.no_grad():
            got = ours(pixel_values)
        error = max_relative_error(got, expected)
        print(
            f"CLIP vision tower (small, {layout} keys): max relative error {error:.2e} (tolerance {TOLERANCE:.0e})"
        )
        assert got.shape == (3, 32) and error < TOLERANCE


def test_official_size_keys_and_parameter_count():
    """On the meta device: every key of diffusers' checker at SD v1-4's size maps onto ours with its
    shape, and the parameter count agrees with the hub file's size."""
    transformers, diffusers_checker = (
        oracle("transformers"),
        oracle("diffusers.pipelines.stable_diffusion.safety_checker"),
    )
    config = transformers.CLIPConfig(
        vision_config=OFFICIAL_VISION, text_config=OFFICIAL_TEXT, projection_dim=768
    )
    with torch.device("meta"):
        reference = diffusers_checker.StableDiffusionSafetyChecker(config)
        ours = SafetyChecker(config_from_diffusers(config.to_dict()))
    assert ours.config == SafetyCheckerConfig()  # the defaults are SD v1-4's
    theirs = {k: v.shape for k, v in hub_layout(reference.state_dict()).items()}
    weights, _ = remap_keys(theirs, KEY_RULES, DROPPED_KEYS)
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    assert weights == expected, weights.keys() ^ expected.keys()
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 303_981_588
    header = SAFETY_CHECKER_FILE_SIZE - 4 * count  # fp32: 4 bytes a parameter; the rest is JSON
    print(
        f"safety checker: {len(expected)} tensors, {count:,} parameters; "
        f"hub model.safetensors = 4 x that + {header:,} bytes of header"
    )
    assert 0 < header < 100_000


# --- the checker ---------------------------------------------------------------------------------

IMAGE_SIZES = [(256, 320), (300, 240), (224, 224), (512, 384)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' checker at a small size with random weights, its concept embeddings and thresholds
    chosen so that the four test images exercise every path:

    image 0: flagged by a concept directly;
    image 1: flagged by nothing;
    image 2: a special-care concept fires, and a concept 0.005 short of its threshold is then over it;
    image 3: the same 0.005 shortfall without special care: not flagged.
    """
    transformers, diffusers_checker = (
        oracle("transformers"),
        oracle("diffusers.pipelines.stable_diffusion.safety_checker"),
    )
    config = transformers.CLIPConfig(
        vision_config=SMALL_VISION, text_config=SMALL_TEXT, projection_dim=16
    )
    model = randomize_(diffusers_checker.StableDiffusionSafetyChecker(config).eval())
    images_uint8 = random_images(IMAGE_SIZES)
    pixel_values = torch.cat(
        [
            reference_image_processor()(image, return_tensors="pt").pixel_values
            for image in images_uint8
        ]
    )
    with torch.no_grad():
        pooled = model.vision_model(pixel_values).pooler_output
        embeds = torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)  # (4, 16)
        cosine = embeds @ embeds.T  # how alike the test images are
        # (4,): 1 - the closest other image's cosine
        margin = 1 - cosine.fill_diagonal_(-1).max(dim=1).values
        assert margin.min() > 0.01, f"test images too alike to separate: {margin}"
        # special care concept 0 = image 2's own direction, its threshold between image 2 and the others
        model.special_care_embeds[0] = embeds[2]
        # cosines are <= 1: 2.0 never fires
        model.special_care_embeds_weights[:] = torch.tensor([1 - margin[2] / 2, 2.0, 2.0])
        model.concept_embeds[:3] = embeds[[0, 2, 3]]
        model.concept_embeds_weights[:] = 2.0
        model.concept_embeds_weights[:3] = torch.tensor([1 - margin[0] / 2, 1.005, 1.005])
    folder = tmp_path_factory.mktemp("safety") / "safety_checker"
    model.save_pretrained(folder)
    with torch.no_grad():
        # diffusers blacks out the copy's flagged images
        _, flags = model(clip_input=pixel_values, images=pixel_values.clone())
    assert flags == [True, False, True, False]
    return dict(
        model=model,
        folder=folder,
        pixel_values=pixel_values,
        images_uint8=images_uint8,
        flags=flags,
    )


def reference_scores(model, pixel_values):
    """diffusers' scores, built from its own cosine_distance, before its rounding and per-image loop."""
    cosine_distance = oracle("diffusers.pipelines.stable_diffusion.safety_checker").cosine_distance
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values).pooler_output)
        special = (
            cosine_distance(image_embeds, model.special_care_embeds)
            - model.special_care_embeds_weights
        )
        adjustment = 0.01 * (special.round(decimals=3) > 0).any(dim=1, keepdim=True)
        return special, cosine_distance(
            image_embeds, model.concept_embeds
        ) - model.concept_embeds_weights + adjustment


def compare(ours: SafetyChecker, reference, label: str):
    flags = ours(reference["pixel_values"])
    special, concepts = ours.scores(reference["pixel_values"])
    expected_special, expected_concepts = reference_scores(
        reference["model"], reference["pixel_values"]
    )
    error = max(
        (special - expected_special).abs().max().item(),
        (concepts - expected_concepts).abs().max().item(),
    )
    print(
        f"safety checker ({label}): flags {flags} (diffusers {reference['flags']}), "
        f"max score difference {error:.1e} (tolerance 1e-5)"
    )
    assert flags == reference["flags"]
    assert error < 1e-5


def test_checker_matches_diffusers(reference):
    state = reference["model"].state_dict()  # transformers 5's names
    ours = load_safety_checker(config_from_diffusers(reference["model"].config.to_dict()), state)
    compare(ours, reference, "state dict")
    special, concepts = ours.scores(reference["pixel_values"])
    # the paths the fixture promises: image 2 is flagged only thanks to the special-care adjustment
    assert (special.round(decimals=3) > 0).any(dim=1).tolist() == [False, False, True, False]
    assert concepts[2, 1].item() == pytest.approx(0.005, abs=1e-4) and concepts[
        3, 2
    ].item() == pytest.approx(-0.005, abs=1e-4)


def test_scores_are_rounded_like_diffusers(reference):
    """diffusers rounds each score to 3 decimals before comparing it with 0: 0.0003 over a threshold
    is no flag, 0.002 over is one. Image 3 against concept 2 (its own direction; no special care)."""
    model = copy.deepcopy(reference["model"])
    pixel_values = reference["pixel_values"]
    _, concepts = reference_scores(model, pixel_values)
    cosine = concepts[3, 2] + model.concept_embeds_weights[2]
    for over, flagged in [(0.0003, False), (0.002, True)]:
        with torch.no_grad():
            model.concept_embeds_weights[2] = cosine - over
            _, expected = model(clip_input=pixel_values, images=pixel_values.clone())
        ours = load_safety_checker(
            config_from_diffusers(model.config.to_dict()), model.state_dict()
        )
        assert ours(pixel_values)[3] == expected[3] == flagged


def test_saved_by_diffusers_and_hub_layout(reference, tmp_path):
    folder = reference["folder"]
    config = config_from_diffusers(read_config(folder))
    compare(
        load_safety_checker(config, read_state_dict(find_weights_file(folder))),
        reference,
        "diffusers save_pretrained folder",
    )
    save_file(hub_layout(reference["model"].state_dict()), tmp_path / "model.safetensors")
    compare(
        load_safety_checker(config, read_state_dict(tmp_path / "model.safetensors")),
        reference,
        "hub layout, vision_model.vision_model.",
    )


def test_check_preprocesses_like_the_pipeline(reference):
    """check() on [0, 1] float images of several sizes gives diffusers' flags for CLIPImageProcessor's input."""
    ours = load_safety_checker(
        config_from_diffusers(reference["model"].config.to_dict()), reference["model"].state_dict()
    )
    flags = [
        ours.check(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
        for image in reference["images_uint8"]
    ]
    assert flags == reference["flags"]


# --- preprocessing -------------------------------------------------------------------------------


def test_preprocessing_equals_clip_image_processor():
    """uint8 images of non-square sizes, shrunk and enlarged. Both resize with PIL's 8-bit bicubic, so
    only the float arithmetic of the normalisation may differ: tolerance 1e-5 (the values are ~2)."""
    processor = reference_image_processor()
    sizes = [(300, 451), (451, 300), (224, 224), (100, 150), (768, 512), (225, 1000)]
    worst = 0.0
    for image in random_images(sizes, seed=1):
        expected = processor(image, return_tensors="pt").pixel_values
        as_uint8 = torch.from_numpy(image).permute(2, 0, 1)[None]  # (1, 3, H, W)
        got = preprocess(as_uint8)
        assert got.shape == expected.shape == (1, 3, 224, 224)
        # [0, 1] floats round back to the same 8 bits
        assert torch.equal(preprocess(as_uint8.float() / 255), got)
        worst = max(worst, (got - expected).abs().max().item())
    print(
        f"preprocessing vs {type(processor).__name__}: max abs difference {worst:.1e} "
        f"over {len(sizes)} images (tolerance 1e-5)"
    )
    assert worst < 1e-5


# --- errors that teach ---------------------------------------------------------------------------


def test_bad_inputs_are_refused():
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(width=32, layers=1, heads=4, mlp_width=64))
    with pytest.raises(ValueError, match=r"channels last\? use \.permute"):
        preprocess(torch.rand(1, 64, 64, 3))
    with pytest.raises(ValueError, match="3 colour channels"):
        preprocess(torch.rand(2, 4, 64, 64))
    with pytest.raises(ValueError, match=r"add the batch dimension"):
        preprocess(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\[-1, 1\]: use \(x / 2 \+ 0\.5\)"):
        preprocess(torch.rand(1, 3, 64, 64) * 2 - 1)
    with pytest.raises(ValueError, match=r"add the batch dimension"):
        tower(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="colour channels"):
        tower(torch.zeros(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"224x224 images, got 256x256.*preprocess"):
        tower(torch.zeros(1, 3, 256, 256))


def test_wrong_checkpoint_is_named():
    """A plain CLIP vision tower is not a safety checker: the error names what is missing and why."""
    config = SafetyCheckerConfig(
        vision=CLIPVisionConfig(width=32, layers=1, heads=4, mlp_width=64), projection_dim=16
    )
    with torch.device("meta"):
        state = SafetyChecker(config).state_dict()
    tower_only = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    with pytest.raises(
        CheckpointError,
        match=r"(?s)missing from the checkpoint \(5: concept_embeds.*without the safety checker's projection",
    ):
        load_safety_checker(config, tower_only)
