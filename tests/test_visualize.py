"""Drawing detections: class colours on the box edges, thresholds, tags inside the image, atomic PNG writes."""
import numpy as np
import pytest
import torch
from PIL import Image

from detkit.utils.visualize import class_colour, draw_detections, draw_ground_truth, save_image_atomic

GREY = (128, 128, 128)
NAMES = ["person", "car", "dog", "a rather long class name"]


@pytest.fixture
def image():
    return Image.new("RGB", (200, 160), GREY)


def test_box_edges_take_the_class_colour_and_the_inside_stays(image):
    out = draw_detections(image, [[20, 40, 120, 130]], [2], [0.9], NAMES)
    pixels = out.load()
    for xy in [(20, 85), (120, 85), (70, 40), (70, 130)]:  # left, right, top, bottom edges
        assert pixels[xy] == class_colour(2), xy
    assert pixels[70, 85] == GREY
    tag = np.asarray(out)[25:40, 20:80]  # the tag sits above the box
    assert (tag == class_colour(2)).all(-1).any() and not (tag == GREY).all(-1).all()
    assert image.getpixel((20, 85)) == GREY  # the input is untouched


def test_boxes_below_threshold_or_beyond_max_are_not_drawn(image):
    boxes = [[10, 30, 60, 80], [100, 30, 150, 80], [10, 100, 60, 150]]
    out = draw_detections(image, boxes, [0, 1, 2], [0.9, 0.2, 0.5], NAMES, score_threshold=0.3, max_boxes=1)
    assert out.getpixel((10, 55)) == class_colour(0)
    assert out.getpixel((100, 55)) == GREY  # score 0.2 < 0.3
    assert out.getpixel((10, 125)) == GREY  # third-best of three with max_boxes=1
    out = draw_detections(image, boxes, [0, 1, 2], [0.9, 0.2, 0.5], NAMES, score_threshold=0.3)
    assert out.getpixel((10, 125)) == class_colour(2)


def test_no_detections_give_an_unchanged_copy(image):
    out = draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0), NAMES)
    assert out is not image and np.array_equal(np.asarray(out), np.asarray(image))
    out = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_tensor_and_array_inputs_match_pil_and_numpy(image):
    boxes, labels, scores = [[20, 40, 120, 130], [5, 5, 50, 50]], [1, 3], [0.8, 0.95]
    expected = np.asarray(draw_detections(image, np.array(boxes), np.array(labels), np.array(scores), NAMES))
    array = np.asarray(image).copy()
    out = draw_detections(torch.from_numpy(array), torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels),
                          torch.tensor(scores), NAMES)
    assert np.array_equal(np.asarray(out), expected)
    assert np.array_equal(array, np.asarray(image))
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(array.astype(np.float32), boxes, labels, scores)


def test_tags_stay_inside_the_image(image):
    # a box in the top-right corner with a long name: the tag moves below the top edge and left of the box
    out = np.asarray(draw_detections(image, [[170, 0, 199, 40]], [3], [0.99], NAMES))
    colour = class_colour(3)
    left_of_box = out[:, :170]
    assert (left_of_box == colour).all(-1).any()
    assert out.shape == (160, 200, 3)


def test_odd_boxes_do_not_fail(image):
    boxes = [[-30, -30, 400, 400], [50, 50, 50, 50], [90, 90, 60, 60], [float("nan"), 0, 10, 10]]
    out = draw_detections(image, boxes, [0, 1, 2, 7], [0.9] * 4, {0: "zero"})
    assert out.getpixel((0, 80)) == class_colour(0)  # clipped to the border, so still visible


def test_ground_truth_uses_the_same_colours(image):
    out = draw_ground_truth(image, torch.tensor([[30.0, 50, 90, 120]]), torch.tensor([1]), NAMES)
    assert out.getpixel((30, 85)) == class_colour(1)


def test_save_image_atomic_writes_png(tmp_path, image):
    drawn = draw_detections(image, [[20, 40, 120, 130]], [2], [0.9], NAMES)
    path = save_image_atomic(drawn, tmp_path / "viz" / "pred.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG" and np.array_equal(np.asarray(saved), np.asarray(drawn))
    assert [p.name for p in path.parent.iterdir()] == ["pred.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="png"):
        save_image_atomic(drawn, tmp_path / "pred.jpg")
