"""minildm.attention_maps (issue 29): per-token cross-attention maps at image resolution, DAAM's
aggregation, on the embedded tiny SD. The colour and shape words of the 36 held-out prompts look
at the shape they drew; recording leaves the pipeline's image as it was."""

import numpy as np
import pytest
import torch

import minildm
from minildm import shapes
from minildm.unet import TransformerBlock

STEPS = 25
GUIDANCE = 4.0  # the embedded SD's scoring guidance (train/recipes.py SAMPLING)


@pytest.fixture(scope="module")
def pipe():
    return minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)


def draw_maps(pipe, prompt, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return minildm.attention_maps(
        pipe, prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator
    )


def test_colour_and_shape_words_look_at_the_shape_they_drew(pipe):
    """For each held-out (colour, shape, background) in each position: the share of the colour
    word's and the shape word's map that falls on the drawn shape, against the shape's share of
    the image (what a map spread evenly would put there)."""
    rows = []
    for colour, shape, background in shapes.HELD_OUT:
        for position in shapes.POSITIONS:
            prompt = shapes.caption(colour, shape, background, position)
            result = draw_maps(pipe, prompt)
            mask = shapes.shape_mask(np.asarray(result.image))
            if mask is None:  # nothing drawn: the words cannot look at it
                rows.append((prompt, None, None, None))
                continue
            area = mask.mean()
            on_shape = {}
            for word in (colour, shape):
                word_map = result.maps[result.tokens.index(word)].numpy()
                on_shape[word] = float(word_map[mask].sum() / word_map.sum())
            rows.append((prompt, area, on_shape[colour], on_shape[shape]))
    print(f"\n{'prompt':<62} area  colour  shape")
    for prompt, area, colour_share, shape_share in rows:
        if area is None:
            print(f"{prompt:<62} no shape drawn")
        else:
            print(f"{prompt:<62} {area:.2f}  {colour_share:.2f}    {shape_share:.2f}")
    drawn = [row for row in rows if row[1] is not None]
    colour_wins = sum(colour > area for _, area, colour, _ in drawn)
    shape_wins = sum(shape > area for _, area, _, shape in drawn)
    print(
        f"colour word above the area share in {colour_wins}/{len(rows)} prompts, shape word in "
        f"{shape_wins}/{len(rows)}"
    )
    assert len(rows) == 36
    assert colour_wins >= 0.8 * len(rows) and shape_wins >= 0.8 * len(rows)


def test_the_maps_are_reproducible_and_leave_the_image_as_it_was(pipe):
    prompt = "a blue square on the right side of a yellow background"
    first, second = draw_maps(pipe, prompt), draw_maps(pipe, prompt)
    assert torch.equal(first.maps, second.maps)
    untraced = pipe(
        prompt,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert np.array_equal(np.asarray(first.image), np.asarray(untraced))
    assert first.maps.shape == (len(first.tokens), 64, 64) and (first.maps >= 0).all()
    shares = first.shares
    print({token: round(share, 3) for token, share in shares.items()})
    assert abs(sum(shares.values()) - 1) < 1e-5
    assert {"<start>", "<end>", "<padding>", "blue", "square"} <= shares.keys()
    hooks = [
        len(m.attn2._forward_hooks) for m in pipe.unet.modules() if isinstance(m, TransformerBlock)
    ]
    assert hooks and not any(hooks)  # every recording hook removed


def test_the_ldm_pipeline_gets_maps_too_and_bad_prompts_are_refused(pipe):
    ldm = minildm.LDMTextToImagePipeline.from_pretrained(minildm.TINY_LDM)
    result = minildm.attention_maps(ldm, "a red circle on a blue background", num_inference_steps=4)
    print(result.tokens, {token: round(share, 3) for token, share in result.shares.items()})
    assert result.tokens == ["a", "red", "circle", "on", "a", "blue", "background"]
    assert result.maps.shape == (7, 64, 64)
    for prompt, words in [(["a", "b"], "takes one prompt"), ("red " * 40, "tokens, the text")]:
        with pytest.raises(ValueError, match=words):
            minildm.attention_maps(pipe, prompt, num_inference_steps=2)
