import pytest
import torch

from detkit.modeling.anchors import AnchorGenerator, octave_sizes, retinanet_anchor_sizes


def test_torchvision_layout_hand_computed():
    gen = AnchorGenerator(strides=[8], sizes=[(32.0,)], aspect_ratios=(0.5, 1.0, 2.0), round_base=True)
    base = gen.base_anchors(0)
    # ratio = h / w: 0.5 -> wide (w = 32 * sqrt 2 = 45.25 -> +-23, h = 22.6 -> +-11)
    assert base.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    (anchors,) = gen.grid_anchors([(2, 3)])
    assert anchors.shape == (2 * 3 * 3, 4)
    # location-major: rows 3..5 are the anchors of location (y=0, x=1), shifted by one stride
    torch.testing.assert_close(anchors[3:6], base + torch.tensor([8.0, 0, 8, 0]))
    torch.testing.assert_close(anchors[9:12], base + torch.tensor([0.0, 8, 0, 8]))  # (y=1, x=0)


def test_orders_and_offset():
    sizes = [(32.0, 64.0)]
    ratio_major = AnchorGenerator([16], sizes, (0.5, 2.0), order="ratio_major").base_anchors(0)
    size_major = AnchorGenerator([16], sizes, (0.5, 2.0), order="size_major").base_anchors(0)
    assert ratio_major.shape == size_major.shape == (4, 4)
    torch.testing.assert_close(ratio_major[[0, 2, 1, 3]], size_major)
    (centred,) = AnchorGenerator([16], [(16.0,)], (1.0,), offset=0.5).grid_anchors([(1, 1)])
    assert centred.tolist() == [[0.0, 0.0, 16.0, 16.0]]


def test_sizes_of_the_published_variants():
    assert retinanet_anchor_sizes(32, truncate=True)[0] == (32.0, 40.0, 50.0)  # torchvision
    assert retinanet_anchor_sizes(32, truncate=True)[4] == (512.0, 645.0, 812.0)
    tf = AnchorGenerator.from_anchor_size(levels=range(3, 8), anchor_size=3)
    assert tf.strides == [8, 16, 32, 64, 128]
    assert tf.sizes[0] == pytest.approx(octave_sizes(24.0))
    assert tf.sizes[4][2] == pytest.approx(609.6, abs=0.05)
    assert tf.num_anchors == 9


def test_areas_and_ratios_are_right():
    gen = AnchorGenerator([8, 16], retinanet_anchor_sizes(32)[:2])
    for level, anchors in enumerate(gen.grid_anchors([(4, 4), (2, 2)])):
        wh = anchors[:9, 2:] - anchors[:9, :2]
        areas = (wh[:, 0] * wh[:, 1]).sqrt().reshape(3, 3)  # ratio-major: rows are ratios
        torch.testing.assert_close(areas, torch.tensor(gen.sizes[level]).float().expand(3, 3))
        ratios = (wh[:, 1] / wh[:, 0]).reshape(3, 3)[:, 0]
        torch.testing.assert_close(ratios, torch.tensor([0.5, 1.0, 2.0]))


def test_image_over_grid_strides_follow_torchvision():
    # torchvision: stride = padded size // grid size per axis; at 800x1088, P7's 7x9 grid is 114 x 120 apart
    gen = AnchorGenerator(strides=[128], sizes=[(512.0,)], aspect_ratios=(1.0,), stride_mode="image_over_grid")
    anchors = gen.grid_anchors([(7, 9)], image_size=(800, 1088))[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (63, 2) x, y
    assert centres[1, 0].item() == 120 and centres[9, 1].item() == 114
    assert centres[-1].tolist() == [8 * 120, 6 * 114]
    nominal = AnchorGenerator(strides=[128], sizes=[(512.0,)], aspect_ratios=(1.0,)).grid_anchors([(7, 9)])[0]
    assert ((nominal[:, :2] + nominal[:, 2:]) / 2)[-1].tolist() == [8 * 128, 6 * 128]
    with pytest.raises(ValueError, match="padded image size"):
        gen.grid_anchors([(7, 9)])
