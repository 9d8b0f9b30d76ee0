"""The camera pattern (exact pixels, continuity across segments) and the negative guidance branch's conditioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from animate_inputs import PIPELINE_SIZE

from posegen_cli.longvideo.engine import warn_on_long_zoom
from posegen_cli.longvideo.plan import plan_segments
from posegen_cli.longvideo.segments import render_segments
from posegen_cli.longvideo.sources import BlankFrames, CameraFrames
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.pipelines.conditioning import condition_mask, paste_head_tail
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, release_generator
from posegen_cli.pipelines.vae import encode_video, frames_to_tensor
from posegen_cli.choices import CAMERA_MOTIONS
from posegen_cli.errors import phrase
from posegen_cli.pose.camera import PANS, ZOOMS, CameraMotion, camera_pattern, zoom_factor
from posegen_cli.pose.render import BODY_LINK_COLORS
from posegen_cli.report import Reporter

torch.set_num_threads(1)
PALETTE = [np.array(c, np.uint8) for c in BODY_LINK_COLORS]
BLACK = np.zeros(3, np.uint8)


def stroke_columns(frame: np.ndarray, row: int, columns: range) -> list[int]:
    return [x for x in columns if frame[row, x].any()]


def test_frame_zero_is_the_lattice_at_rest() -> None:
    frame = camera_pattern(0, CameraMotion("pan-left", 3, 30))
    assert frame.shape == (1280, 720, 3) and frame.dtype == np.uint8
    # cell (0, 0): left edge centred on pixel 30, 9 px wide, palette colour 0; top edge colour 1; corner: vertical wins
    assert stroke_columns(frame, 80, range(20, 40)) == list(range(26, 35))
    assert all(np.array_equal(frame[80, x], PALETTE[0]) for x in range(26, 35))
    assert np.array_equal(frame[30, 80], PALETTE[1]) and np.array_equal(frame[30, 30], PALETTE[0])
    assert np.array_equal(frame[80, 80], BLACK) and np.array_equal(frame[10, 80], BLACK)
    # cell (1, 0) has colour 3·1 = 3, cell (0, 1) colours 5 (sides) and 6 (top/bottom); right edge at 130
    assert np.array_equal(frame[80, 190], PALETTE[3])
    assert np.array_equal(frame[190, 80], PALETTE[6]) and np.array_equal(frame[240, 30], PALETTE[5])
    assert stroke_columns(frame, 80, range(120, 140)) == list(range(126, 135))
    # every motion starts from the same picture
    for kind in ("pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out"):
        assert np.array_equal(camera_pattern(0, CameraMotion(kind, 7, 24)), frame)


def test_pans_move_the_pattern_toward_the_pan() -> None:
    rest = camera_pattern(0, CameraMotion("pan-left", 3, 30))
    left = camera_pattern(10, CameraMotion("pan-left", 3, 30))
    # pan-left: the pattern slid 30 px left; the edge centred on 30 is now centred on column 0
    assert stroke_columns(left, 80, range(0, 12)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(left[:, :-30], rest[:, 30:])
    right = camera_pattern(10, CameraMotion("pan-right", 3, 30))
    assert stroke_columns(right, 80, range(50, 70)) == list(range(56, 65))
    np.testing.assert_array_equal(right[:, 30:], rest[:, :-30])
    down = camera_pattern(5, CameraMotion("pan-down", 2, 30))
    assert np.array_equal(down[40, 80], PALETTE[1]) and np.array_equal(down[30, 80], BLACK)
    np.testing.assert_array_equal(down[10:], rest[:-10])
    up = camera_pattern(5, CameraMotion("pan-up", 2, 30))
    assert np.array_equal(up[20, 80], PALETTE[1])
    np.testing.assert_array_equal(up[:-10], rest[10:])
    # fractional speeds sample the moving lattice at pixel centres: 2.5 px per frame, frame 2 -> 5 px
    np.testing.assert_array_equal(camera_pattern(2, CameraMotion("pan-left", 2.5, 30))[:, :-5], rest[:, 5:])


def test_zooms_scale_about_the_centre_per_second() -> None:
    zoom_in = camera_pattern(10, CameraMotion("zoom-in", 10, 10))
    # one second at 10 %/s: the pattern shrank by 1.1 about (360, 640); row 100 lies in cell row 0 (v' = 46.55)
    # columns 2-9 map to u' = -33.25 … -25.55, the right edge (130.5 in cell -1) ± 4; palette colour (3·-1) mod 23 = 20
    assert stroke_columns(zoom_in, 100, range(0, 14)) == list(range(2, 10))
    assert np.array_equal(zoom_in[100, 5], PALETTE[20])
    # the zoom depends on seconds, not frames
    np.testing.assert_array_equal(camera_pattern(30, CameraMotion("zoom-in", 10, 30)), zoom_in)
    # zoom-out at 50 %/s, one second: the pattern grew 1.5x about the centre; the edge at u' = 350.5 ± 4 (columns
    # 346-354 at rest) now spans u = 360 + (u' - 360)·1.5 = 339.75 … 351.75, columns 340-351
    zoom_out = camera_pattern(10, CameraMotion("zoom-out", 50, 10))
    assert stroke_columns(zoom_out, 700, range(300, 360)) == list(range(340, 352))
    assert stroke_columns(camera_pattern(0, CameraMotion("zoom-out", 50, 10)), 700, range(300, 360)) == list(range(346, 355))


def test_every_camera_choice_has_a_motion() -> None:
    assert set(CAMERA_MOTIONS) == {*PANS, *ZOOMS} and len(CAMERA_MOTIONS) == 6


def test_other_canvases_scale_to_the_same_area() -> None:
    # 288x512 is 0.4x the 720x1280 canvas: 2.5 canvas px per pixel, so the edge at 26.5-34.5 covers pixels 11-13
    small = camera_pattern(0, CameraMotion("pan-left", 3, 30), (512, 288))
    assert small.shape == (512, 288, 3)
    assert stroke_columns(small, 32, range(0, 20)) == [11, 12, 13]
    assert np.array_equal(small[32, 12], PALETTE[0])
    with pytest.raises(ValueError, match="positive canvas"):
        camera_pattern(0, CameraMotion("pan-left", 3, 30), (0, 10))
    with pytest.raises(ValueError, match="not one of"):
        CameraMotion("dolly", 3, 30)
    with pytest.raises(ValueError, match="positive"):
        CameraMotion("pan-left", 0, 30)


class WarningsReporter(Reporter):
    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_long_zooms_are_flagged() -> None:
    # 4 %/s for 20 s at 30 fps: 1.04 ** 20 = 2.19x, fine; for 40 s 4.8x: a warning naming the factor and the fix
    assert zoom_factor(CameraMotion("zoom-in", 4, 30), 600) == pytest.approx(1 / 1.04**20)
    assert zoom_factor(CameraMotion("pan-up", 4, 30), 600) == 1.0
    reporter = WarningsReporter()
    warn_on_long_zoom(CameraMotion("zoom-out", 4, 30), 601, reporter)
    assert reporter.warnings == []
    warn_on_long_zoom(CameraMotion("zoom-in", 4, 30), 1201, reporter)
    (message,) = reporter.warnings
    assert "4.8x over 1201 frames" in message and "--camera-speed" in phrase(message)


class RecordingRenderer:
    """Stands in for the models: records the negative pose frames every segment gets."""

    num_steps = 1

    def __init__(self) -> None:
        self.negative: dict[str, list[np.ndarray | None]] = {"anchor": [], "base": [], "transition": []}

    def _frames(self, kind: str, pose: np.ndarray, on_step, negative_pose: np.ndarray | None) -> np.ndarray:
        on_step(1)
        self.negative[kind].append(negative_pose)
        return pose

    def render_anchor(self, pose, hand, on_step, *, record, frames_needed=True, negative_pose=None):
        return self._frames("anchor", pose, on_step, negative_pose)

    def anchor_steps(self) -> int:
        return 0

    def render_base(self, pose, hand, on_step, *, negative_pose=None):
        return self._frames("base", pose, on_step, negative_pose)

    def render_transition(self, pose, hand, head, tail, on_step, *, negative_pose=None):
        return self._frames("transition", pose, on_step, negative_pose)

    def release_kv(self) -> None:
        pass


def test_segments_see_the_pattern_of_their_global_frames(tmp_path: Path) -> None:
    """Frames a transition shares with its neighbouring bases get exactly the same pattern: the phase is global."""
    size = (32, 16)
    plan = plan_segments(40, 13, 5, 4)
    camera = CameraFrames(CameraMotion("pan-right", 6, 30), size)
    renderer = RecordingRenderer()
    work = WorkDir.for_job([], {"test": "camera"}, tmp_path / "work")
    render_segments(
        plan, renderer, (BlankFrames(size), BlankFrames(size), camera), work, total_frames=40, frame_shape=size,
        overlap=(5, 4), reporter=Reporter(quiet=True),
    )  # fmt: skip
    (anchor,) = renderer.negative["anchor"]
    base_2, base_4 = renderer.negative["base"]
    transition_1, transition_3 = renderer.negative["transition"]
    # segment 1 covers timeline frames 8-20: its first 5 are the anchor's last 5, its last 4 segment 2's first 4
    np.testing.assert_array_equal(transition_1[:5], anchor[-5:])
    np.testing.assert_array_equal(transition_1[-4:], base_2[:4])
    np.testing.assert_array_equal(transition_3[:5], base_2[-5:])
    np.testing.assert_array_equal(transition_3[-4:], base_4[:4])
    # and each frame is the pure function of its timeline position, even in the mirror-padded tail (frames 40-47)
    starts = {0: anchor, 8: transition_1, 17: base_2, 25: transition_3, 34: base_4}
    for start, frames in starts.items():
        for k, frame in enumerate(frames):
            np.testing.assert_array_equal(frame, camera_pattern(start + k, camera.motion, size))
    assert not np.array_equal(anchor[0], anchor[1])

    # without a camera the renderer gets no negative frames at all
    plain = RecordingRenderer()
    work.remove()
    work = WorkDir.for_job([], {"test": "plain"}, tmp_path / "work")
    render_segments(
        plan, plain, (BlankFrames(size), BlankFrames(size)), work, total_frames=40, frame_shape=size, overlap=(5, 4),
        reporter=Reporter(quiet=True),
    )  # fmt: skip
    assert all(negative is None for calls in plain.negative.values() for negative in calls)


(H, W), F = PIPELINE_SIZE, 13


def frames(seed: int, n: int = F) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture
def recorded(pipe: PoseGenPipeline, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The real tiny DiT's forward, wrapped to keep the conditioning of every call (positive, then negative)."""
    calls: list[dict[str, torch.Tensor]] = []
    real = pipe.transformer.forward

    def forward(**kwargs):
        calls.append({k: kwargs[k].clone() for k in ("control_latents", "hand_latents", "encoder_hidden_states")})
        return real(**kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    pipe.use_variant("base")
    return calls


def test_negative_branch_gets_the_camera_and_the_positive_the_pose(pipe, embeds, recorded) -> None:
    pose, hand = frames(1), frames(2)
    camera = np.stack([camera_pattern(i, CameraMotion("pan-left", 8, 30), (H, W)) for i in range(F)])
    blank = np.zeros_like(hand)
    pipe(**embeds, pose_frames=pose, hand_frames=hand, negative_pose_frames=camera, negative_hand_frames=blank, num_inference_steps=2)
    assert len(recorded) == 4
    encoded = {name: encode_video(pipe.vae, frames_to_tensor(x)) for name, x in [("pose", pose), ("hand", hand), ("camera", camera), ("blank", blank)]}
    mask = condition_mask(F, 0, 0, H // 8, W // 8, torch.float32)
    for step in range(2):
        positive, negative = recorded[2 * step], recorded[2 * step + 1]
        assert torch.equal(positive["encoder_hidden_states"], embeds["prompt_embeds"])
        assert torch.equal(negative["encoder_hidden_states"], embeds["negative_prompt_embeds"])
        assert torch.equal(positive["control_latents"][:, 4:], encoded["pose"]) and torch.equal(positive["hand_latents"], encoded["hand"])
        assert torch.equal(negative["control_latents"][:, 4:], encoded["camera"]) and torch.equal(negative["hand_latents"], encoded["blank"])
        assert torch.equal(positive["control_latents"][0, :4], mask) and torch.equal(negative["control_latents"][0, :4], mask)


def test_transition_head_and_tail_reach_both_branches(pipe, embeds, recorded) -> None:
    pose, hand, camera = frames(3), frames(4), frames(5)
    head, tail = frames(6, 5), frames(7, 4)
    pipe(
        **embeds, pose_frames=pose, hand_frames=hand, head_frames=head, tail_frames=tail, negative_pose_frames=camera,
        negative_hand_frames=np.zeros_like(hand), num_inference_steps=1,
    )  # fmt: skip
    positive, negative = recorded
    assert torch.equal(positive["control_latents"][:, 4:], encode_video(pipe.vae, frames_to_tensor(paste_head_tail(pose, head, tail))))
    assert torch.equal(negative["control_latents"][:, 4:], encode_video(pipe.vae, frames_to_tensor(paste_head_tail(camera, head, tail))))
    blank_pasted = paste_head_tail(np.zeros_like(hand), head, tail)
    assert torch.equal(negative["hand_latents"], encode_video(pipe.vae, frames_to_tensor(blank_pasted)))
    assert torch.equal(negative["control_latents"][:, :4], positive["control_latents"][:, :4])


def test_without_negative_frames_nothing_changes(pipe, embeds, recorded) -> None:
    """No negative frames: both branches get the positive conditioning, as the release does, and the segment is the
    same, bit for bit, as when the negative branch is handed the positive frames explicitly."""
    pose, hand = frames(8), frames(9)
    plain = pipe(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=2, generator=release_generator(3)).frames
    for positive, negative in zip(recorded[::2], recorded[1::2]):
        assert torch.equal(positive["control_latents"], negative["control_latents"])
        assert torch.equal(positive["hand_latents"], negative["hand_latents"])
    explicit = pipe(
        **embeds, pose_frames=pose, hand_frames=hand, negative_pose_frames=pose, negative_hand_frames=hand, num_inference_steps=2,
        generator=release_generator(3),
    ).frames
    np.testing.assert_array_equal(plain, explicit)
    # a camera pattern does change the segment (the tiny DiT reads its conditioning)
    camera = np.stack([camera_pattern(i, CameraMotion("zoom-in", 20, 30), (H, W)) for i in range(F)])
    steered = pipe(
        **embeds, pose_frames=pose, hand_frames=hand, negative_pose_frames=camera, num_inference_steps=2, generator=release_generator(3)
    ).frames
    assert not np.array_equal(plain, steered)
    # one negative input alone: the other is the positive branch's
    recorded.clear()
    pipe(**embeds, pose_frames=pose, hand_frames=hand, negative_hand_frames=np.zeros_like(hand), num_inference_steps=1)
    assert torch.equal(recorded[0]["control_latents"], recorded[1]["control_latents"])
    assert not torch.equal(recorded[0]["hand_latents"], recorded[1]["hand_latents"])
