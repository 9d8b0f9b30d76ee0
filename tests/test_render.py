"""Exact pixels of the conditioning renderers against hand-derived expectations from spec pose.md §1-§2."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from posegen_cli.pose.render import overlay_pose, render_hand_normals, render_pose

# Palette values exactly as coco_wholebody_openpose.pkl (+ PoseGen's foot links) stores them, i.e. what the
# release drew into its array. The model decodes them reversed (cv2 writes the array as BGR), which is
# what the renderer must produce in an RGB frame.
PKL_BODY_LINK_PALETTE = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 225), (0, 170, 255), (0, 85, 255), (0, 0, 255), (255, 0, 170),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (0, 255, 0), (0, 255, 0), (0, 255, 0), (255, 128, 0),
    (255, 128, 0), (255, 128, 0),
]  # fmt: skip
# COCO-WholeBody endpoints of each body link (-1 = the neck), from the spec's §1.5 table.
COCO_BODY_LINKS = [
    (-1, 6), (-1, 5), (6, 8), (8, 10), (5, 7), (7, 9), (-1, 12), (12, 14), (14, 16), (-1, 11), (11, 13),
    (13, 15), (-1, 0), (0, 2), (2, 4), (0, 1), (1, 3), (15, 17), (15, 18), (15, 19), (16, 20), (16, 21), (16, 22),
]  # fmt: skip
# Decoded RGB of the hand rainbow, spec §1.7 last column.
DECODED_HAND_LINK_RGB = [
    (0, 0, 255), (0, 77, 255), (0, 153, 255), (0, 229, 255), (0, 255, 204), (0, 255, 128), (0, 255, 51),
    (25, 255, 0), (102, 255, 0), (179, 255, 0), (255, 255, 0), (255, 178, 0), (255, 102, 0), (255, 25, 0),
    (255, 0, 51), (255, 0, 128), (255, 0, 204), (230, 0, 255), (153, 0, 255), (77, 0, 255),
]  # fmt: skip
HAND_LOCAL_LINKS = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
                    (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]  # fmt: skip

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


def empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((133, 2), np.float32), np.zeros(133, np.float32)


def disk(cx: int, cy: int, h: int, w: int, r: int = 4) -> np.ndarray:
    """OpenCV's filled circle of radius r is exactly the pixels with dx^2 + dy^2 <= r^2."""
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def colours(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in img.reshape(-1, 3)}


def test_single_link_footprint_and_swapped_colour():
    # nose (0) at (20, 50) and left eye (1) at (100, 50): link "nose-L eye", palette (255,0,255), plus two dots.
    kp, sc = empty()
    kp[0] = (20.0, 50.0)
    kp[1] = (100.0, 50.0)
    sc[[0, 1]] = 0.9
    img = render_pose(kp, sc, 160, 100)
    assert img.shape == (100, 160, 3) and img.dtype == np.uint8
    magenta, nose_blue = (255, 0, 255), (0, 0, 255)
    assert colours(img) == {BLACK, magenta, nose_blue}
    # The nose dot is drawn over the link: exactly the radius-4 disk, in the nose colour (palette (255,0,0) decoded).
    assert np.array_equal(np.all(img == nose_blue, axis=2), disk(20, 50, 100, 160))
    # Stroke: minor semi-axis 4 -> exactly 9 rows at the middle of the link.
    col = np.nonzero(img[:, 60].any(axis=1))[0]
    assert col.tolist() == list(range(46, 55))
    # The ellipse's major axis spans the endpoints; the dots widen the ends by their radius.
    row = np.nonzero(img[50].any(axis=1))[0]
    assert row[0] == 16 and row[-1] == 104 and len(row) == 89
    ys, xs = np.nonzero(img.any(axis=2))
    assert ys.min() == 46 and ys.max() == 54 and xs.min() == 16 and xs.max() == 104


@pytest.mark.parametrize("link", range(23))
def test_every_body_link_has_the_reversed_palette_colour(link):
    a, b = COCO_BODY_LINKS[link]
    kp, sc = empty()
    # Place the link horizontally across a wide canvas; far endpoints keep the centre free of dots.
    start, end = np.array((40.0, 60.0)), np.array((200.0, 60.0))
    kp[b], sc[b] = end, 0.9
    if a == -1:  # the neck is the mean of both shoulders: mirror the other shoulder around it
        other = {5: 6, 6: 5}.get(b)
        if other is None:
            kp[5] = kp[6] = start
        else:
            kp[other] = 2 * start - end
        sc[5] = sc[6] = 0.9
    else:
        kp[a], sc[a] = start, 0.9
    img = render_pose(kp, sc, 240, 120)
    expected = PKL_BODY_LINK_PALETTE[link][::-1]
    assert tuple(int(v) for v in img[60, 120]) == expected


def test_neck_takes_mean_score_of_the_shoulders():
    kp, sc = empty()
    kp[5] = (100.0, 100.0)  # left shoulder, below threshold
    kp[6] = (200.0, 100.0)  # right shoulder
    sc[5], sc[6] = 0.2, 0.5  # neck score 0.35 >= 0.3
    img = render_pose(kp, sc, 300, 200)
    # neck dot at (150, 100): palette (255,85,0) -> decoded (0,85,255)
    assert tuple(img[100, 150]) == (0, 85, 255)
    # right shoulder dot (palette (255,170,0)) is drawn, left shoulder is not
    assert tuple(img[100, 200]) == (0, 170, 255)
    assert tuple(img[100, 100]) == BLACK
    # neck-R shoulder link (palette (255,0,0)) drawn between them; neck-L shoulder link absent
    assert tuple(img[100, 175]) == (0, 0, 255)
    assert tuple(img[100, 125]) == BLACK


def test_body_dot_drawn_over_its_link():
    kp, sc = empty()
    kp[0] = (50.0, 50.0)
    kp[2] = (50.0, 10.0)  # right eye straight above the nose: link nose-R eye palette (255,0,170)
    sc[[0, 2]] = 1.0
    img = render_pose(kp, sc, 100, 100)
    assert tuple(img[30, 50]) == (170, 0, 255)  # link middle
    assert tuple(img[48, 50]) == (0, 0, 255)  # inside the nose dot: the dot wins
    assert tuple(img[12, 50]) == (255, 0, 170)  # inside the right-eye dot (palette (170,0,255))


def test_body_threshold_edge_is_inclusive():
    kp, sc = empty()
    kp[0] = (30.0, 30.0)
    sc[0] = np.float32(0.3)
    assert tuple(render_pose(kp, sc, 60, 60)[30, 30]) == (0, 0, 255)
    sc[0] = np.nextafter(np.float32(0.3), np.float32(0))
    assert not render_pose(kp, sc, 60, 60).any()


def test_hand_threshold_edge_is_compared_in_float64_and_separate_from_body():
    # The release compares float64 scores with 0.7: float32(0.7) = 0.69999998... is below it, the next float32 is not.
    kp, sc = empty()
    kp[91] = (20.0, 30.0)
    kp[92] = (60.0, 30.0)
    sc[[91, 92]] = np.nextafter(np.float32(0.7), np.float32(1))
    img = render_pose(kp, sc, 80, 60)
    assert tuple(img[30, 40]) == (0, 0, 255)
    exact = np.where(sc > 0, 0.7, 0.0)  # float64 0.7 itself passes
    assert tuple(render_pose(kp, exact, 80, 60)[30, 40]) == (0, 0, 255)
    sc[92] = np.float32(0.7)
    assert not render_pose(kp, sc, 80, 60).any()  # 0.69999998 would pass the body threshold but not the hand one


def test_neck_mean_is_float64_like_the_release():
    # float32 would round (0.29999998 + 0.30000001) / 2 up to 0.30000001 and draw the neck; float64 keeps it below 0.3.
    kp, sc = empty()
    kp[5], kp[6] = (40.0, 50.0), (120.0, 50.0)
    sc[5] = np.nextafter(np.float32(0.3), np.float32(0))
    sc[6] = np.float32(0.3)
    img = render_pose(kp, sc, 160, 100)
    assert tuple(img[50, 80]) == BLACK  # no neck dot, no neck-R shoulder link
    assert tuple(img[50, 120]) == (0, 170, 255)  # the right shoulder itself passes


def test_float64_coordinates_are_truncated_without_float32_rounding():
    # 99.999999 rounds to 100.0 in float32; the release truncates the float64 value to 99.
    kp = np.zeros((133, 2), np.float64)
    sc = np.zeros(133, np.float64)
    kp[0] = (99.999999, 20.0)
    sc[0] = 0.9
    img = render_pose(kp, sc, 200, 40)
    assert np.array_equal(np.all(img == (0, 0, 255), axis=2), disk(99, 20, 40, 200))


def test_body_link_length_uses_numpy_int64_power():
    # The release takes ((dy)**2 + (dx)**2) ** 0.5 on numpy int64; where that is not exactly 102.0 for
    # a 90 x 48 link, the semi-axis is int(101.99999999999999 / 2) = 50 and the ellipse one pixel shorter per end.
    if (np.int64(48) ** 2 + np.int64(90) ** 2) ** 0.5 == 102.0:
        pytest.skip("this numpy's int64 power is exact for 10404, so it cannot tell the two apart")
    kp, sc = empty()
    kp[15], kp[17] = (10.0, 100.0), (100.0, 52.0)  # left ankle - left big toe, palette (0,255,0)
    sc[[15, 17]] = 0.9
    img = render_pose(kp, sc, 120, 120)
    link = np.all(img == (0, 255, 0), axis=2)
    expected = np.zeros((120, 120, 3), np.uint8)
    poly = cv2.ellipse2Poly((55, 76), (50, 4), int(np.degrees(np.arctan2(48, -90))), 0, 360, 1)
    cv2.fillConvexPoly(expected, poly, (0, 255, 0))
    for x, y in ((10, 100), (100, 52)):
        cv2.circle(expected, (x, y), 4, (0, 128, 255), -1)
    assert np.array_equal(link, np.all(expected == (0, 255, 0), axis=2))


def test_hand_points_first_then_links_and_only_endpoints_of_valid_links():
    kp, sc = empty()
    kp[91] = (30.0, 30.0)  # left hand root
    kp[92] = (70.0, 30.0)  # thumb1: link 0, colour (0,0,255)
    kp[110] = (50.0, 70.0)  # pinky3 alone: above threshold but in no valid link
    sc[[91, 92, 110]] = 0.95
    img = render_pose(kp, sc, 100, 100)
    link = (0, 0, 255)
    # A 2-px cv2 line: three rows thick inside, caps reach one pixel beyond the endpoints on the centre row.
    expected = np.zeros((100, 100), bool)
    expected[30, 29:72] = True
    expected[29, 30:71] = True
    expected[31, 30:71] = True
    assert np.array_equal(np.all(img == link, axis=2), expected)
    # White dots under the line: the disk minus the line pixels.
    white = disk(30, 30, 100, 100) | disk(70, 30, 100, 100)
    assert np.array_equal(np.all(img == WHITE, axis=2), white & ~expected)
    assert colours(img) == {BLACK, WHITE, link}


@pytest.mark.parametrize("link", range(20))
def test_hand_rainbow_colours_right_hand(link):
    a, b = HAND_LOCAL_LINKS[link]
    kp, sc = empty()
    kp[112 + a] = (20.0, 40.0)
    kp[112 + b] = (100.0, 40.0)
    sc[[112 + a, 112 + b]] = 0.9
    img = render_pose(kp, sc, 120, 80)
    assert tuple(int(v) for v in img[40, 60]) == DECODED_HAND_LINK_RGB[link]


def test_right_hand_drawn_after_left_hand_and_over_body():
    kp, sc = empty()
    # Body: nose-L eye link through (50, 40); left hand link 0 and right hand link 4 overlap on the same row.
    kp[0], kp[1] = (10.0, 40.0), (90.0, 40.0)
    kp[91], kp[92] = (20.0, 40.0), (80.0, 40.0)
    kp[112], kp[117] = (30.0, 40.0), (70.0, 40.0)
    sc[:] = 0.0
    sc[[0, 1, 91, 92, 112, 117]] = 0.9
    img = render_pose(kp, sc, 100, 80)
    assert tuple(img[40, 50]) == (0, 255, 204)  # right hand root-index1 on top
    assert tuple(img[40, 75]) == (0, 0, 255)  # only the left hand's line there
    assert tuple(img[44, 50]) == (255, 0, 255)  # body link below the 2-px hand lines


def test_body_wrist_and_hand_root_are_separate_points():
    kp, sc = empty()
    kp[9] = (20.0, 20.0)  # left wrist (body), palette (0,255,85) -> (85,255,0)
    sc[9] = 0.5
    kp[91], kp[92] = (60.0, 60.0), (60.0, 90.0)
    sc[[91, 92]] = 0.8
    img = render_pose(kp, sc, 100, 100)
    assert tuple(img[20, 20]) == (85, 255, 0)
    assert tuple(img[57, 60]) == WHITE  # root dot above the line's start


def test_face_is_never_drawn():
    kp, sc = empty()
    kp[23:91] = np.stack([np.linspace(5, 95, 68), np.full(68, 50)], axis=1)
    sc[23:91] = 1.0
    assert not render_pose(kp, sc, 100, 100).any()


def test_feet_are_drawn():
    kp, sc = empty()
    kp[15], kp[17] = (20.0, 50.0), (80.0, 50.0)  # left ankle - left big toe: palette (0,255,0)
    sc[[15, 17]] = 0.9
    img = render_pose(kp, sc, 100, 100)
    assert tuple(img[50, 50]) == (0, 255, 0)
    assert tuple(img[50, 80]) == (0, 128, 255)  # foot point: palette (255,128,0)


def test_off_canvas_points_are_clipped_not_dropped():
    kp, sc = empty()
    kp[0] = (-50.0, 30.0)
    kp[1] = (150.0, 30.0)
    sc[[0, 1]] = 0.9
    img = render_pose(kp, sc, 100, 60)
    assert (img[30] == (255, 0, 255)).all()  # the link crosses the whole canvas
    assert np.array_equal(np.nonzero(img[:, 50].any(axis=1))[0], np.arange(26, 35))


def test_truncation_toward_zero_of_negative_coordinates():
    kp, sc = empty()
    kp[0] = (-3.9, 10.7)  # int() -> (-3, 10): the disk reaches x = 1
    sc[0] = 0.9
    img = render_pose(kp, sc, 20, 20)
    assert np.array_equal(np.all(img == (0, 0, 255), axis=2), disk(-3, 10, 20, 20))


def test_unusable_coordinates_count_as_missing():
    kp, sc = empty()
    kp[0] = (np.nan, 10.0)
    kp[1] = (40.0, 10.0)
    kp[2] = (1e12, 5.0)
    sc[[0, 1, 2]] = 0.9
    img = render_pose(kp, sc, 60, 30)
    # Only the left-eye dot remains: the NaN nose and the out-of-range right eye are not detected.
    assert np.array_equal(img.any(axis=2), disk(40, 10, 30, 60))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="133"):
        render_pose(np.zeros((17, 2)), np.zeros(17), 10, 10)


def test_hand_normals_mask_and_truncating_encoding():
    normals = np.zeros((4, 5, 3), np.float32)
    normals[..., 2] = 1.0
    normals[0, 0] = (0.0, 0.0, 2.0)  # -> (0, 0, 1 - 5e-6): codes (127, 127, 254), never 255
    normals[1, 1] = (-3.0, 0.0, 0.0)  # -> codes (0, 127, 127)
    normals[2, 2] = (0.6, 0.0, 0.8)  # unit: codes (int(0.8*255)=203, 127, int(0.9*255)=229)
    seg = np.zeros((4, 5), np.int64)
    seg[0, 0] = 5  # Left_Hand
    seg[1, 1] = 14  # Right_Hand
    seg[2, 2] = 14
    seg[3, 3] = 4  # Left_Foot: not a hand
    seg[3, 4] = 13  # Right_Foot: not a hand
    out = render_hand_normals(normals, seg)
    expected = np.zeros((4, 5, 3), np.uint8)
    expected[0, 0] = (127, 127, 254)
    expected[1, 1] = (0, 127, 127)
    expected[2, 2] = (203, 127, 229)
    assert out.dtype == np.uint8
    assert np.array_equal(out, expected)


def test_hand_normals_accept_encoded_codes():
    codes = np.full((3, 3, 3), 200, np.uint8)
    seg = np.array([[5, 0, 0], [0, 14, 0], [0, 0, 1]])
    out = render_hand_normals(codes, seg)
    assert not out[2, 2].any()  # class 1 (Apparel) is dropped
    assert np.array_equal(out.any(axis=2), np.isin(seg, (5, 14)))
    assert (out[seg == 5] == 200).all()


def test_hand_normals_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="segmentation"):
        render_hand_normals(np.zeros((4, 4, 3), np.float32), np.zeros((4, 5), np.int64))


def test_overlay_keeps_frame_where_nothing_is_drawn():
    frame = np.full((4, 4, 3), 90, np.uint8)
    pose = np.zeros((4, 4, 3), np.uint8)
    pose[1, 2] = (0, 0, 255)
    out = overlay_pose(frame, pose)
    expected = frame.copy()
    expected[1, 2] = (0, 0, 255)
    assert np.array_equal(out, expected)
