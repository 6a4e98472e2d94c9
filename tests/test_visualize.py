import numpy as np
from PIL import Image

from bmask_jax.evaluation.visualize import draw_instances, save_image

H, W = 128, 128
NAMES = ["person", "car", "dog"]


def _scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 20.0, 50.0, 60.0], [60.0, 15.0, 100.0, 50.0]])
    masks = np.zeros((2, H, W), bool)
    masks[0, 25:55, 15:45] = True
    masks[1, 20:45, 65:95] = True
    boundaries = np.zeros_like(masks)
    for i in range(2):
        m = masks[i]
        inner = m.copy()
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        boundaries[i] = m & ~inner
    return image, boxes, np.array([0, 1]), np.array([0.93, 0.71]), masks, boundaries


def test_draw_changes_instances_only():
    image, boxes, classes, scores, masks, boundaries = _scene()
    before = image.copy()
    out = draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # input untouched
    # mask interiors (away from labels, boxes and boundaries) are tinted
    for i, (y0, y1, x0, x1) in enumerate([(30, 50, 20, 40), (25, 40, 70, 90)]):
        region = (slice(y0, y1), slice(x0, x1))
        assert (out[region] != image[region]).any(axis=-1).mean() > 0.95, i
    # far from any instance: bottom-right corner unchanged
    np.testing.assert_array_equal(out[80:, 105:], image[80:, 105:])
    np.testing.assert_array_equal(out[100:, :], image[100:, :])


def test_boundaries_drawn_distinct_from_fill():
    image, boxes, classes, scores, masks, boundaries = _scene()
    with_b = draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries)
    without = draw_instances(image, boxes, classes, scores, masks, NAMES)
    # the left / bottom edges of mask 0 are not covered by its box outline or label
    edge = np.zeros((H, W), bool)
    edge[30:54, 15] = True
    edge[54, 16:44] = True
    assert boundaries[0][edge].all()
    colours = with_b[edge]
    assert (colours == colours[0]).all()  # one opaque boundary colour
    assert (with_b[edge] != without[edge]).any(axis=-1).all()
    # deterministic
    np.testing.assert_array_equal(
        with_b, draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries))


def test_empty_and_threshold():
    image, boxes, classes, scores, masks, boundaries = _scene()
    out = draw_instances(image, np.zeros((0, 4)), np.zeros((0,), int), np.zeros((0,)),
                         np.zeros((0, H, W), bool), NAMES, np.zeros((0, H, W), bool))
    np.testing.assert_array_equal(out, image)
    out = draw_instances(image, np.zeros((0, 4)), np.zeros((0,), int), None, None, NAMES)
    np.testing.assert_array_equal(out, image)
    # all below the threshold -> nothing drawn
    out = draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries,
                         score_threshold=0.95)
    np.testing.assert_array_equal(out, image)
    # only the first (0.93) survives: the second instance's mask interior stays unchanged
    out = draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries,
                         score_threshold=0.8)
    assert (out[30:50, 20:40] != image[30:50, 20:40]).any()
    np.testing.assert_array_equal(out[25:40, 70:90], image[25:40, 70:90])
    np.testing.assert_array_equal(out[22:, 55:], image[22:, 55:])  # below the first label


def test_no_scores_no_masks_boxes_and_labels(tmp_path):
    image, boxes, classes, _, _, _ = _scene()
    out = draw_instances(image, boxes, classes, None, None, NAMES)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[35, 10] != image[35, 10]).any()  # left box edge
    np.testing.assert_array_equal(out[30:50, 20:40], image[30:50, 20:40])  # no fill
    path = tmp_path / "a" / "vis.png"
    save_image(path, out)
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), out)


def test_small_images_are_drawn_upscaled():
    image, boxes, classes, scores, masks, boundaries = _scene()
    out = draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries, min_size=512)
    assert out.shape == (512, 512, 3)                         # 128 px x 4
    # away from instances, every pixel is the input pixel repeated 4 x 4
    np.testing.assert_array_equal(out[400:, 420:], np.repeat(np.repeat(image[100:, 105:], 4, 0), 4, 1))
    # mask 0's left boundary column (x = 15) becomes columns 60..63, all boundary-coloured
    edge = out[32 * 4:52 * 4, 15 * 4:16 * 4].reshape(-1, 3)
    assert (edge == edge[0]).all() and (edge[0] != image[40, 15]).any()
    # the label text is drawn at the upscaled image's font size, not the 128 px one
    small = draw_instances(image, boxes, classes, scores, masks, NAMES, boundaries)
    big_label = (out[:80 * 4, :] != np.repeat(np.repeat(small[:80], 4, 0), 4, 1)).any(-1)
    assert big_label.any()
    # 100 x 300: k = 2 (600 >= 512); large images are left as they are
    wide = np.zeros((100, 300, 3), np.uint8)
    assert draw_instances(wide, np.zeros((0, 4)), [], None, None, NAMES, min_size=512).shape == (200, 600, 3)
    assert draw_instances(np.zeros((600, 80, 3), np.uint8), np.zeros((0, 4)), [], None, None, NAMES,
                          min_size=512).shape == (600, 80, 3)
