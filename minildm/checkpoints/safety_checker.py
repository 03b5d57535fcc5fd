"""The safety checker's checkpoints: diffusers' `StableDiffusionSafetyChecker` files (the hub's
`safety_checker/` folder, its CLIP image tower nested once or twice under `vision_model.`) <->
minildm's `SafetyChecker` (minildm/safety_checker.py).

Here: the config translation (`config_from_diffusers`, reading the tower's config with
checkpoints/clip.py's `vision_config_from_diffusers`), the key map (`KEY_RULES`, built on
`VISION_KEY_RULES`), the hints for weights that do not fit, and the loader `load_safety_checker`.
"""

import torch

from minildm.checkpoints.clip import VISION_KEY_RULES, vision_config_from_diffusers
from minildm.checkpoints.weights import load_into, remap_keys
from minildm.safety_checker import SafetyChecker, SafetyCheckerConfig

# --- Config translation -----------------------------------------------------------------------


def config_from_diffusers(config: dict) -> SafetyCheckerConfig:
    """From the safety checker's `config.json`: a transformers CLIPConfig. Only its
    `vision_config` and `projection_dim` matter; its `text_config` describes a text tower the
    checker does not have."""
    if "vision_config" not in config:
        raise ValueError(
            "expected the CLIPConfig of a safety_checker/ folder, with a 'vision_config'; "
            "this config.json has none"
        )
    return SafetyCheckerConfig(
        vision=vision_config_from_diffusers(config["vision_config"]),
        projection_dim=config.get(
            "projection_dim", 512
        ),  # absent: transformers' CLIPConfig default
    )


# --- Official weights ----------------------------------------------------------------------------
# The vision tower's key map, for keys under `vision_model.`: hub files (saved by transformers 4)
# nest transformers' CLIPVisionModel twice, `vision_model.vision_model.encoder.layers.0...`;
# transformers 5 saves it once, `vision_model.encoder.layers.0...`; ours is
# `vision_model.layers.0...`.
KEY_RULES = [
    *[
        (r"^vision_model\." + pattern.removeprefix("^"), "vision_model." + replacement)
        for pattern, replacement in VISION_KEY_RULES
    ],
    (r"^concept_embeds_weights$", "concept_thresholds"),
    (r"^special_care_embeds_weights$", "special_care_thresholds"),
]
# an arange buffer of transformers 4
DROPPED_KEYS = [r"vision_model\.(vision_model\.)?embeddings\.position_ids"]


def _mismatch_hint(missing, unexpected, mismatched):
    checker_parts = ("concept", "special_care", "visual_projection")
    if missing and all(k.startswith(checker_parts) for k in missing):
        return (
            "a CLIP vision model without the safety checker's projection and concept embeddings: "
            "use the safety_checker/ folder of a Stable Diffusion repo"
        )
    if any("text_model" in k for k in unexpected):
        return "a whole CLIPModel (text and image towers), not the safety checker"
    if "visual_projection.weight" in mismatched:
        (got_p, got_width), (want_p, want_width) = mismatched["visual_projection.weight"]
        return (
            f"the checkpoint projects {got_width} -> {got_p}, the config {want_width} -> {want_p}: "
            "config.json belongs to another model"
        )
    return None


def load_safety_checker(
    config: SafetyCheckerConfig,
    state_dict: dict,
    device=None,
    dtype=None,
) -> SafetyChecker:
    with torch.device("meta"):
        model = SafetyChecker(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES, DROPPED_KEYS)
    return load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="safety checker",
        hint=_mismatch_hint,
    )
