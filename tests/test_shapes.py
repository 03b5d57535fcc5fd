"""The shapes world: exact captions and held-out list, the drawing's geometry, and a scorer that is
right on freshly drawn images of every combination (and wrong when the caption is)."""

import numpy as np
import pytest

from minildm import shapes


def test_world_is_the_specified_one():
    assert len(shapes.all_triples()) == 6 * 3 * 8
    assert len(shapes.HELD_OUT) == 12 and len(set(shapes.HELD_OUT)) == 12
    assert set(shapes.HELD_OUT) <= set(shapes.all_triples())
    assert not set(shapes.HELD_OUT) & set(shapes.training_triples())
    assert len(shapes.training_triples()) == 144 - 12
    assert shapes.caption("red", "circle", "blue", "center") == "a red circle on a blue background"
    assert (
        shapes.caption("green", "triangle", "white", "left")
        == "a green triangle on the left side of a white background"
    )
    assert shapes.caption("blue", "square", None, "right") == "a blue square on the right side"
    assert shapes.caption("blue", "square", None, "center") == "a blue square"
    assert shapes.PALETTE["orange"] == (245, 130, 20) and shapes.PALETTE["black"] == (15, 15, 15)


def test_drawing_geometry():
    square = shapes.draw("red", "square", "white", 32, 32, 12)
    assert square.shape == (64, 64, 3) and square.dtype == np.uint8
    assert (
        tuple(square[32, 32]) == shapes.PALETTE["red"]
        and tuple(square[2, 2]) == shapes.PALETTE["white"]
    )
    red = np.all(square == shapes.PALETTE["red"], axis=-1)
    # pixels fully inside [20.5, 44.5): the rest are anti-aliased edge pixels
    assert red.sum() == 23 * 23
    edge = ~red & ~np.all(square == shapes.PALETTE["white"], axis=-1)
    assert edge.sum() > 0  # drawn supersampled: mixed colours at the border
    triangle = shapes.draw("blue", "triangle", "black", 32, 32, 14)
    weight = np.linalg.norm(triangle.astype(float) - shapes.PALETTE["black"], axis=-1)
    ys, xs = np.mgrid[0:64, 0:64]
    centroid = (np.sum(weight * xs) / weight.sum(), np.sum(weight * ys) / weight.sum())
    print(f"triangle centroid {centroid[0]:.2f}, {centroid[1]:.2f} (drawn at 32, 32)")
    # the centroid, not the box centre
    assert abs(centroid[0] - 32) < 0.3 and abs(centroid[1] - 32) < 0.3
    inside = weight > 0.5 * weight.max()
    assert inside[24].sum() < inside[36].sum()  # pointing up: narrower above the centre than below


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="not the shape's colour"):
        shapes.draw("red", "circle", "red", 32, 32, 12)
    with pytest.raises(ValueError, match="one of"):
        shapes.draw("white", "circle", "red", 32, 32, 12)
    with pytest.raises(ValueError, match=r"expected a \(64, 64, 3\) image"):
        shapes.read_image(np.zeros((32, 32, 3), np.uint8))
    # a pipeline's output_type="np" image, floats in [0, 1]: it used to read as "black, no shape"
    drawn = shapes.draw("red", "circle", "blue", 18, 32, 12)
    assert shapes.read_image(drawn)["shape"] == "circle"
    with pytest.raises(TypeError, match=r"expected a uint8 image \(0-255\), got float32"):
        shapes.read_image(drawn.astype(np.float32) / 255)


def test_scorer_reads_every_combination():
    images, scenes = shapes.every_combination(per_combination=2, seed=7)
    scores = shapes.score(images, scenes)
    print(shapes.format_scores(f"{len(images)} drawn images", scores))
    assert scores["all"] >= 0.99 and min(scores.values()) >= 0.99


def test_scorer_says_no_to_wrong_captions():
    images, scenes = shapes.every_combination(per_combination=1, seed=8)
    names = {
        "colour": shapes.SHAPE_COLOURS,
        "shape": shapes.SHAPES,
        "background": shapes.BACKGROUNDS,
        "position": tuple(shapes.POSITIONS),
    }
    for attribute, choices in names.items():
        wrong = [
            dict(s, **{attribute: choices[(choices.index(s[attribute]) + 1) % len(choices)]})
            for s in scenes
        ]
        scores = shapes.score(images, wrong)
        print(f"captions with the wrong {attribute}: {attribute} {scores[attribute]:.3f}")
        assert scores[attribute] <= 0.01 and scores["all"] <= 0.01
    blank = np.full((4, 64, 64, 3), 128, np.uint8)  # nothing drawn: no shape is read
    assert shapes.read_image(blank[0])["shape"] is None


def test_read_scene_accepts_drawings_and_refuses_what_is_not_one_clean_shape():
    images, scenes = shapes.every_combination(1, seed=7)
    accepted = [shapes.read_scene(image) for image in images]
    print(
        f"read_scene: {sum(a is not None for a in accepted)}/{len(images)} fresh drawings accepted"
    )
    assert all(a is not None for a in accepted)
    assert all(
        a == {k: s[k] for k in shapes.ATTRIBUTES} for a, s in zip(accepted, scenes, strict=True)
    )
    blank = np.full((64, 64, 3), shapes.PALETTE["gray"], dtype=np.uint8)
    assert shapes.read_scene(blank) is None  # no shape at all
    two_colours = images[0].copy()
    mask = np.any(images[0] != images[0][0, 0], axis=-1)  # the shape's pixels
    ys, xs = np.nonzero(mask)
    left = mask & (np.arange(64)[None, :] < xs.mean())
    two_colours[left] = (0, 255, 255)  # half of it in a colour of no palette entry
    assert shapes.read_scene(two_colours) is None
    blob = np.full((64, 64, 3), shapes.PALETTE["white"], dtype=np.uint8)
    blob[20:44, 10:54] = shapes.PALETTE["red"]  # a 24 x 44 bar: no template overlaps it 0.8
    assert shapes.read_scene(blob) is None


def test_vocabulary_is_the_words_of_the_captions():
    """The twenty words a training caption can hold (the world's spec: nine colours, three shapes,
    two side words, and the frame "a ... on the ... side of a ... background"), and the words of a
    prompt outside them, each once, in order."""
    colours = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray"}
    frame = {"a", "on", "the", "side", "of", "background", "left", "right"}
    expected = colours | {"circle", "square", "triangle"} | frame
    print(f"{len(shapes.VOCABULARY)} words: {sorted(shapes.VOCABULARY)}")
    assert shapes.VOCABULARY == expected
    every_caption = [
        shapes.caption(c, s, b, p)
        for c, s, b in shapes.all_triples()
        for p in shapes.POSITIONS
        for b in (b, None)
    ]
    assert not any(shapes.unknown_words(text) for text in every_caption)
    assert shapes.unknown_words("a photograph of a cat") == ["photograph", "cat"]
    assert shapes.shape_words("A red Circle and a blue square, and a circle") == [
        "circle",
        "square",
        "circle",
    ]
    assert shapes.shape_words("a red circle on a blue background") == ["circle"]
    assert shapes.unknown_words("A RED Circle, on a blue background.") == []
    assert shapes.unknown_words("3 cats and a cat in the centre") == [
        "3",
        "cats",
        "and",
        "cat",
        "in",
        "centre",
    ]


def test_the_fine_tuning_extension_is_drawn_and_read_like_the_world():
    """Pink and the star (what fine-tuning teaches; the embedded models never saw them): fresh
    drawings of all 228 extended combinations in every position read right at least 99% of the
    time per attribute; they take no part in the training triples or the vocabulary; the default
    scorer never answers pink or star."""
    assert len(shapes.extended_triples()) == 6 * 4 * 8 + 4 * 9  # pink on any of the nine
    assert set(shapes.all_triples()) < set(shapes.extended_triples())
    assert not {"pink", "star"} & shapes.VOCABULARY
    assert all("pink" not in t and "star" not in t for t in shapes.training_triples())
    images, scenes = shapes.every_combination(per_combination=2, seed=11, extended=True)
    scores = shapes.score(images, scenes, extended=True)
    print(shapes.format_scores(f"{len(images)} extended drawings", scores))
    assert min(scores.values()) >= 0.99
    new = [i for i, s in enumerate(scenes) if s["colour"] == "pink" or s["shape"] == "star"]
    new_scores = shapes.score(images[new], [scenes[i] for i in new], extended=True)
    print(shapes.format_scores(f"{len(new)} with pink or a star", new_scores))
    assert min(new_scores.values()) >= 0.99
    star = shapes.draw("pink", "star", "white", 32, 32, 14)
    read = shapes.read_image(star, extended=True)
    assert (read["colour"], read["shape"]) == ("pink", "star")
    old_reading = shapes.read_image(star)  # the default scorer knows only the world's own
    assert old_reading["colour"] != "pink" and old_reading["shape"] != "star"


def test_other_drawings_keep_away_from_pink_and_stars():
    """The tiny SD's autoencoder also sees other colours and outlines (shapes.other_drawing): two
    flat colours per drawing, neither pink nor near it, some outlines concave, and none that the
    scorer's star template fits as it fits a drawn star."""
    drawings = shapes.other_drawings(300, seed=3)
    assert drawings.shape == (300, 64, 64, 3) and drawings.dtype == np.uint8
    assert np.array_equal(drawings, shapes.other_drawings(300, seed=3))
    assert not np.array_equal(drawings, shapes.other_drawings(300, seed=4))
    pink = np.array(shapes.NEW_COLOURS["pink"], dtype=np.float64)
    palette = np.array(list(shapes.PALETTE.values()), dtype=np.float64)
    nearest_to_pink, concave, best_star_fit = np.inf, 0, 0.0
    for image in drawings:
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        fill, background = colours[np.argsort(counts)[-2:]].astype(np.float64)  # most: background
        for rgb in (background, fill):
            to_pink = np.linalg.norm(rgb - pink)
            assert to_pink > shapes.PINK_GAP
            assert to_pink > np.linalg.norm(rgb - palette, axis=1).min()
            nearest_to_pink = min(nearest_to_pink, to_pink)
        # concave: some row or column of the shape is two runs of pixels or more, as a star's
        # points make (a shallow dent leaves each one run, so this counts fewer than there are)
        mask = np.linalg.norm(image - background, axis=-1) > np.linalg.norm(image - fill, axis=-1)
        runs = [np.diff(m.astype(np.int8), axis=1, prepend=0, append=0) for m in (mask, mask.T)]
        concave += int(any(((r == 1).sum(axis=1) > 1).any() for r in runs))
        if mask.sum() >= 20:
            best_star_fit = max(best_star_fit, shapes._overlaps(mask, ("star",))["star"])
    stars, scenes = shapes.every_combination(1, seed=0, extended=True)
    drawn_star_fit = min(
        shapes._overlaps(shapes.shape_mask(image), ("star",))["star"]
        for image, scene in zip(stars, scenes, strict=True)
        if scene["shape"] == "star"
    )
    print(
        f"nearest fill or background to pink: {nearest_to_pink:.1f} (PINK_GAP {shapes.PINK_GAP}); "
        f"concave outlines {concave}/300; star template fits them at most {best_star_fit:.3f}, "
        f"drawn stars at least {drawn_star_fit:.3f}"
    )
    assert 30 <= concave <= 120  # a quarter of the outlines are drawn concave
    assert best_star_fit < 0.8 < drawn_star_fit
