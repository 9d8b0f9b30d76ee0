"""A light CPU pose source: MediaPipe Pose + Hands (models inside the mediapipe 0.10.21 wheel) mapped onto
COCO-WholeBody 133 as spec pose.md §6 prescribes.

MediaPipe finds one person. Its hand labels assume a mirrored selfie, so hands are given to the
nearest body wrist instead, and every point of a hand takes that hand's handedness score (there are
no per-point hand scores). Small toes and the face have no counterpart and keep score 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

import numpy as np

from posegen_cli.errors import MissingModelError, option
from posegen_cli.pose.keypoints import box_from_points
from posegen_cli.pose.types import HAND_SIZE, LEFT_HAND_START, LEFT_WRIST, NUM_KEYPOINTS, RIGHT_HAND_START, RIGHT_WRIST, PersonPose

# (COCO index, MediaPipe Pose landmark index), spec §6.1 and §6.2.
COCO_FROM_MP_POSE: tuple[tuple[int, int], ...] = (
    (0, 0), (1, 2), (2, 5), (3, 7), (4, 8), (5, 11), (6, 12), (7, 13), (8, 14), (9, 15), (10, 16),
    (11, 23), (12, 24), (13, 25), (14, 26), (15, 27), (16, 28),
    (17, 31), (19, 29), (20, 32), (22, 30),
)  # fmt: skip
_WARM_UP_FRAME = np.zeros((64, 64, 3), np.uint8)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what MediaPipe's C++ side prints on start-up (TFLite and absl lines that mean nothing to users)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_mediapipe() -> ModuleType:
    """The optional dependency, or a MissingModelError that says how to get it."""
    try:
        import mediapipe
    except ImportError:
        raise MissingModelError(
            "the mediapipe backend needs the mediapipe package: pip install 'posegen[mediapipe]' "
            f"(mediapipe 0.10.21, which pins numpy<2), or use {option('backend')} sapiens on a GPU"
        ) from None
    return mediapipe


def assign_hands(hands: list[np.ndarray], left_wrist: np.ndarray, right_wrist: np.ndarray) -> tuple[int | None, int | None]:
    """Indices of the hands (21, 2) that go to the subject's left and right, by wrist distance.

    Two or more hands: the pair (left, right) with the smallest summed distance from each hand's root
    to its body wrist. One hand: the nearer wrist.
    """
    if not hands:
        return None, None
    wrists = (np.asarray(left_wrist, np.float64), np.asarray(right_wrist, np.float64))
    dist = np.array([[np.linalg.norm(h[0] - w) for w in wrists] for h in hands])
    if len(hands) == 1:
        return (0, None) if dist[0, 0] <= dist[0, 1] else (None, 0)
    pairs = [(i, j) for i in range(len(hands)) for j in range(len(hands)) if i != j]
    left, right = min(pairs, key=lambda ij: dist[ij[0], 0] + dist[ij[1], 1])
    return left, right


def coco_from_mediapipe(body: np.ndarray, hands: list[np.ndarray], hand_scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody keypoints (133, 2) and scores (133,) from MediaPipe output in pixels.

    ``body`` is (33, 3): x, y, visibility per Pose landmark; ``hands`` are (21, 2) pixel arrays with
    one handedness score each.
    """
    keypoints = np.zeros((NUM_KEYPOINTS, 2), np.float32)
    scores = np.zeros(NUM_KEYPOINTS, np.float32)
    for coco, mp_index in COCO_FROM_MP_POSE:
        keypoints[coco] = body[mp_index, :2]
        scores[coco] = body[mp_index, 2]
    left, right = assign_hands(hands, keypoints[LEFT_WRIST], keypoints[RIGHT_WRIST])
    for index, start in ((left, LEFT_HAND_START), (right, RIGHT_HAND_START)):
        if index is not None:
            keypoints[start : start + HAND_SIZE] = hands[index]
            scores[start : start + HAND_SIZE] = hand_scores[index]
    return keypoints, scores


class MediaPipePoseBackend:
    """PoseBackend over MediaPipe's legacy Pose and Hands solutions (model complexity 1, CPU).

    In video mode (``static_image_mode=False``) MediaPipe tracks and smooths landmarks across calls,
    so frames must arrive in order; use a fresh backend per video.
    """

    name = "mediapipe"

    def __init__(
        self,
        *,
        static_image_mode: bool = False,
        model_complexity: int = 1,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
    ) -> None:
        mp = import_mediapipe()
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=static_image_mode,
            model_complexity=model_complexity,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self._hands = mp.solutions.hands.Hands(
            static_image_mode=static_image_mode,
            model_complexity=1,
            max_num_hands=2,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        # MediaPipe releases the GIL while it runs, so hands and body can share the two cores.
        self._hand_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mediapipe-hands")
        # The graphs log on start-up and again when they first lock onto someone; hide both.
        self._first_person_pending = True
        with _native_stderr_silenced():
            self._pose.process(_WARM_UP_FRAME)
            self._hand_thread.submit(self._hands.process, _WARM_UP_FRAME).result()

    def _detect_one(self, frame: np.ndarray) -> list[PersonPose]:
        height, width = frame.shape[:2]
        frame = np.ascontiguousarray(frame)
        with _native_stderr_silenced() if self._first_person_pending else contextlib.nullcontext():
            hands_future = self._hand_thread.submit(self._hands.process, frame)
            found = self._pose.process(frame)
            hand_result = hands_future.result()
        if found.pose_landmarks is None:
            return []
        self._first_person_pending = False
        body = np.array([(lm.x * width, lm.y * height, lm.visibility) for lm in found.pose_landmarks.landmark], np.float32)
        hands: list[np.ndarray] = []
        hand_scores: list[float] = []
        for landmarks, handedness in zip(hand_result.multi_hand_landmarks or [], hand_result.multi_handedness or []):
            hands.append(np.array([(lm.x * width, lm.y * height) for lm in landmarks.landmark], np.float32))
            hand_scores.append(float(handedness.classification[0].score))
        keypoints, scores = coco_from_mediapipe(body, hands, hand_scores)
        return [
            PersonPose(
                keypoints=keypoints,
                scores=scores,
                box=box_from_points(keypoints, scores),
                box_score=float(scores[:17].mean()),
            )
        ]

    def detect(self, frames: Sequence[np.ndarray]) -> list[list[PersonPose]]:
        """At most one person per RGB frame (MediaPipe Pose is single-person)."""
        return [self._detect_one(frame) for frame in frames]

    def close(self) -> None:
        """Free MediaPipe's graphs (they hold threads and model buffers)."""
        self._hand_thread.shutdown(wait=True)
        self._pose.close()
        self._hands.close()
