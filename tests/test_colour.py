"""Colour histograms beside the embedding: images that differ plainly in colour or brightness are kept apart."""
import numpy as np
import pytest
from PIL import Image

import image_similarity
from image_similarity.search.colour import COLOUR_DIM, colour_histograms, with_colour


def noisy(rng, low, high):
    return Image.fromarray(rng.integers(low, high, (48, 64, 3)).astype(np.uint8))


def flat(rng, value, stripes=False):
    pixels = np.full((48, 64, 3), value, np.uint8)
    if stripes:
        pixels[::8] = 255 - value
    return Image.fromarray(np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8))


def bright_and_dark_images():
    rng = np.random.default_rng(0)
    return {"white/noise": noisy(rng, 128, 256), "black/noise": noisy(rng, 0, 128), "white/flat": flat(rng, 235),
            "black/flat": flat(rng, 20), "white/stripes": flat(rng, 235, True), "black/stripes": flat(rng, 20, True)}


def test_histograms_are_unit_rows_that_tell_white_from_black():
    rng = np.random.default_rng(0)
    pixels = np.stack([np.asarray(image).transpose(2, 0, 1) for image in
                       (noisy(rng, 200, 256), noisy(rng, 200, 256), noisy(rng, 0, 56))])
    histograms = colour_histograms(pixels)
    assert histograms.shape == (3, COLOUR_DIM) and histograms.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(histograms, axis=1), 1, atol=1e-6)
    assert histograms[0] @ histograms[1] > 0.99 and histograms[0] @ histograms[2] < 0.01
    joined = with_colour(np.ones((3, 5)), histograms, 0.3)
    np.testing.assert_allclose(1 - joined[0] @ joined[2], 0.3 * (1 - histograms[0] @ histograms[2]), atol=1e-6)
    with pytest.raises(ValueError, match="uint8 array of shape"):
        colour_histograms(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="colour weight must be in"):
        with_colour(np.ones((3, 5)), histograms, 1.0)


def test_plain_colour_and_brightness_decide_the_nearest_neighbour():
    images = bright_and_dark_images()
    # The embedding alone pairs each image with its opposite brightness (same texture, other colour).
    alone = image_similarity.create(list(images.values()), keys=list(images), n_workers=0, colour_weight=0.0)
    edges = alone.similarity_graph(k=1)
    assert any(a.split("/")[0] != b.split("/")[0] for a, b in zip(edges["from"], edges["to"]))
    model = image_similarity.create(list(images.values()), keys=list(images), n_workers=0)
    edges = model.similarity_graph(k=1)
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in zip(edges["from"], edges["to"])), edges
    found = model.query(images["white/noise"], k=2)
    assert list(found["reference"]) == ["white/noise", "white/flat"]
