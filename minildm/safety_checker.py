"""Stable Diffusion's safety checker: does a generated image lie close to one of 17 hidden concepts?

The Stable Diffusion v1 release (the model of Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", arXiv:2112.10752) shipped an NSFW filter beside the model, in
CompVis/stable-diffusion's txt2img script and in diffusers' pipelines: `safety_checker/` of the hub
repos. It is not described in the paper; Rando et al. 2022, "Red-Teaming the Stable Diffusion Safety
Filter" (arXiv:2210.04610), analysed it. It works in CLIP's joint image-text space:

1. The image is preprocessed as for CLIP (resize, center crop to 224x224, normalise) and embedded by
   CLIP ViT-L/14's image tower plus its projection: one 768-vector per image.
2. That vector is compared by cosine similarity with 17 "concept" and 3 "special care" embeddings.
   They were computed from texts that were not published; only the embeddings ship.
3. Each concept has its own threshold (the hub calls them `*_embeds_weights`); a score is the
   cosine similarity minus the threshold.
4. If any special-care score is above 0, every concept threshold is lowered by 0.01 for that image.
5. The image is flagged if any concept score is above 0.

Policy. diffusers replaces a flagged image with a black one and logs a warning. minildm never alters
or hides an image: the checker only reports a flag per image, and the pipelines return the flags as
`nsfw_content_detected`; what to do with them is the caller's decision.

Matches diffusers' `StableDiffusionSafetyChecker` (pipelines/stable_diffusion/safety_checker.py),
whose key names the key map (checkpoints/safety_checker.py) reads. Shapes: B images, P projection
width (768).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from minildm.clip import CLIPVisionConfig, CLIPVisionModel

CONCEPTS = 17  # fixed by the released weights, not by the config
SPECIAL_CARE_CONCEPTS = 3
SPECIAL_CARE_ADJUSTMENT = (
    0.01  # how much lower every concept threshold goes once a special-care concept fires
)

# CLIPImageProcessor's settings in the hub's feature_extractor/preprocessor_config.json of
# CompVis/stable-diffusion-v1-4:
# the mean and standard deviation of CLIP's training images, per RGB channel.
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SafetyCheckerConfig:
    """Defaults: the hub's safety_checker/config.json of CompVis/stable-diffusion-v1-4."""

    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 768


class SafetyChecker(nn.Module):
    """(pixel_values [B, 3, 224, 224]) -> one flag per image; `check(images)` preprocesses first."""

    def __init__(self, config: SafetyCheckerConfig = SafetyCheckerConfig()):
        super().__init__()
        self.config = config
        P = config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision)
        # into CLIP's joint image-text space
        self.visual_projection = nn.Linear(config.vision.width, P, bias=False)
        self.concept_embeds = nn.Parameter(torch.zeros(CONCEPTS, P))
        self.special_care_embeds = nn.Parameter(torch.zeros(SPECIAL_CARE_CONCEPTS, P))
        self.concept_thresholds = nn.Parameter(torch.zeros(CONCEPTS))
        self.special_care_thresholds = nn.Parameter(torch.zeros(SPECIAL_CARE_CONCEPTS))

    def scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(special-care scores [B, 3], concept scores [B, 17]): cosine similarity minus threshold,
        the concept scores already raised by the special-care adjustment where it applies.
        (diffusers' loop also adds the 0.01 to the special-care scores after the first that fires;
        that changes no flag, so the special-care scores here are left as measured.)

        Computed in float32 whatever the model's dtype: the scores are compared with 0 at a
        resolution of 0.001, which float16's rounding (about 0.001 relative) would blur. (diffusers
        takes the cosine in the model's dtype, then casts to float32.)
        """
        image_embeds = self.visual_projection(self.vision_model(pixel_values))  # (B, P)
        image = F.normalize(image_embeds.float(), dim=-1)  # unit length: a dot product is a cosine
        special_care_directions = F.normalize(self.special_care_embeds.float(), dim=-1)
        concept_directions = F.normalize(self.concept_embeds.float(), dim=-1)
        special_care_cosine = image @ special_care_directions.T  # (B, 3)
        concept_cosine = image @ concept_directions.T  # (B, 17)
        special_care_scores = special_care_cosine - self.special_care_thresholds.float()
        special_care = _above_zero(special_care_scores).any(dim=1, keepdim=True)  # (B, 1)
        adjustment = SPECIAL_CARE_ADJUSTMENT * special_care
        concept_scores = concept_cosine - self.concept_thresholds.float() + adjustment
        return special_care_scores, concept_scores

    def forward(self, pixel_values: torch.Tensor) -> list[bool]:
        """has_nsfw_concept: one flag per image. Nothing about the images is changed."""
        _, concept_scores = self.scores(pixel_values)
        return _above_zero(concept_scores).any(dim=1).tolist()

    def check(self, images: torch.Tensor) -> list[bool]:
        """Flags for images as the pipelines make them: [B, 3, H, W] in [0, 1] (or uint8), any
        size."""
        weight = self.visual_projection.weight
        return self(preprocess(images).to(device=weight.device, dtype=weight.dtype))


def _above_zero(scores: torch.Tensor) -> torch.Tensor:
    """diffusers rounds every score to 3 decimals before comparing it with 0, so a score must exceed
    0.0005 to count; we do the same, so that the flags agree."""
    return torch.round(scores, decimals=3) > 0


# --- Preprocessing: what CLIPImageProcessor does with SD v1-4's preprocessor_config.json ---------


def preprocess(images: torch.Tensor, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """[B, 3, H, W] images, float in [0, 1] or uint8 -> CLIP pixel values [B, 3, size, size].

    1. Round to 8 bits, as the pipeline does when it hands the feature extractor PIL images.
    2. Resize so that the shorter side is `size` (the longer becomes int(size * long / short),
       truncated), bicubic, with PIL as CLIPImageProcessor does. PIL widens the kernel when
       shrinking (antialiasing), computes in fixed point, and clips and rounds its output to 8
       bits. torch's F.interpolate(..., mode="bicubic", antialias=True) is the same filter in
       float: clamped and rounded, it is within 1 level of 255 of PIL on smooth images; unclamped,
       on noise, it overshoots by tens of levels. So PIL it is: the result then equals
       CLIPImageProcessor's.
    3. Crop the central size x size square (offsets (H - size) // 2 and (W - size) // 2).
    4. Scale to [0, 1] and normalise each channel with CLIP's mean and standard deviation.
    """
    check_images(images)
    if images.dtype != torch.uint8:
        # the same float32 rounding as numpy's
        images = (images.detach().float().cpu() * 255).round().to(torch.uint8)
    crops = []
    for image in images.cpu().permute(0, 2, 3, 1).numpy():  # (H, W, 3) uint8 each
        height, width = image.shape[:2]
        short = min(height, width)
        long = max(height, width)
        new_long = int(size * long / short)
        if height <= width:
            new_height, new_width = size, new_long
        else:
            new_height, new_width = new_long, size
        # PIL takes (width, height)
        resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC))
        top = (new_height - size) // 2
        left = (new_width - size) // 2
        crops.append(resized[top : top + size, left : left + size])
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def check_images(images):
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"expected images as a torch tensor [B, 3, H, W], got {type(images).__name__}"
        )
    if images.ndim != 4 or images.shape[0] == 0:
        one = " (one image: add the batch dimension, images[None])" if images.ndim == 3 else ""
        raise ValueError(
            f"expected images [B, 3, H, W] with B >= 1, got shape {tuple(images.shape)}{one}"
        )
    if images.shape[1] != 3:
        layout = " (channels last? use .permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        raise ValueError(
            "expected 3 colour channels (RGB) in dimension 1, "
            f"got shape {tuple(images.shape)}{layout}"
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"expected float images in [0, 1] or uint8 images, got {images.dtype}")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(
                "expected images in [0, 1], got values in "
                f"[{images.min().item():.3g}, {images.max().item():.3g}]; "
                "the autoencoder decodes to [-1, 1]: use (x / 2 + 0.5).clamp(0, 1)"
            )
