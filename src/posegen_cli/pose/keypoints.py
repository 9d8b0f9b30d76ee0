"""Keypoint tracks on disk (our npz, OpenPose JSON) and the choice of one person per frame.

A track is one person's 133 COCO-WholeBody points per frame in source pixels. Frames where nobody was
found hold zero scores, so they render as black frames, exactly like a missing detection.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from posegen_cli.errors import InputError, OptionError, option
from posegen_cli.fsutil import atomic_dir, atomic_path
from posegen_cli.pose.types import FACE_SIZE, FACE_START, HAND_SIZE, LEFT_HAND_START, NUM_KEYPOINTS, RIGHT_HAND_START, PersonPose
from posegen_cli.video._ffmpeg import fps_arg

NPZ_KEYS = ("keypoints", "scores", "fps", "width", "height", "backend")


@dataclass
class KeypointTrack:
    """One person per frame: keypoints (F, 133, 2) and scores (F, 133), float64.

    Float64 like the release's ``pose.pkl``: a float32 copy of a Sapiens coordinate can round up onto
    the next integer, which moves the rendered point a pixel, and a given score of exactly 0.7 would
    fall below the hand threshold.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    fps: Fraction
    width: int
    height: int
    backend: str

    def __post_init__(self) -> None:
        self.keypoints = np.asarray(self.keypoints, dtype=np.float64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        f = len(self.keypoints)
        if self.keypoints.shape != (f, NUM_KEYPOINTS, 2) or self.scores.shape != (f, NUM_KEYPOINTS):
            raise ValueError(f"a keypoint track needs (F, 133, 2) and (F, 133), got {self.keypoints.shape} and {self.scores.shape}")

    @property
    def frame_count(self) -> int:
        return len(self.keypoints)

    def frames_without_person(self) -> int:
        return int((~(self.scores > 0).any(axis=1)).sum())


# ---------------------------------------------------------------------------------------------------
# Person choice


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes (continuous areas; 0 for empty boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def select_person(people: list[PersonPose], previous_box: np.ndarray | None = None, *, track: bool = False) -> PersonPose | None:
    """The release's choice, the highest ``box_score``; with ``track``, the best box overlap with the last pick.

    When the followed person has no overlapping box (left the frame), tracking falls back to the
    highest score, so a single-person video never loses its subject for good.
    """
    if not people:
        return None
    if track and previous_box is not None:
        overlaps = [box_iou(p.box, previous_box) for p in people]
        best = int(np.argmax(overlaps))
        if overlaps[best] > 0:
            return people[best]
    return max(people, key=lambda p: p.box_score)


SWITCH_MAX_IOU = 0.1
"""Consecutive boxes of the followed person overlapping less than this (IoU) are not obviously the same person ..."""
SWITCH_JUMP = 0.5
"""... and if the box centre also moved more than this share of the larger box side, it is an identity switch."""


@dataclass(frozen=True)
class PersonChoice:
    """Whom to follow: ``index`` counts people left to right from 1 in the first frame anyone is seen;
    ``point`` (x, y in source pixels) picks the person whose box holds it there (else the nearest box centre).
    Neither: the largest box (ties: the higher box score), the person who fills the frame."""

    index: int | None = None
    point: tuple[float, float] | None = None

    def describe(self) -> str:
        if self.index is not None:
            return f"person {self.index} from the left"
        if self.point is not None:
            return f"the person at ({self.point[0]:g}, {self.point[1]:g})"
        return "the largest person"


def parse_person(text: str | None) -> PersonChoice:
    """``None``/``""`` (the largest), ``"N"`` (1-based, left to right) or ``"X,Y"`` (source pixels); OptionError else."""
    if text is None or not text.strip():
        return PersonChoice()
    value = text.strip()
    if re.fullmatch(r"\d+", value) and int(value) >= 1:
        return PersonChoice(index=int(value))
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)", value):
        return PersonChoice(point=(float(match.group(1)), float(match.group(2))))
    raise OptionError(
        "person", text,
        problem=f"{text!r} is neither a number from 1 (left to right) nor a pixel position X,Y (e.g. {option('person')} 2 or {option('person')} 640,360)",
    )  # fmt: skip


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float64)


def choose_person(people: list[PersonPose], choice: PersonChoice, frame: int = 0) -> PersonPose:
    """The person ``choice`` names among ``people`` (not empty); InputError when there are fewer than ``index``."""
    if choice.index is not None:
        by_x = sorted(people, key=lambda p: float(_centre(p.box)[0]))
        if choice.index > len(by_x):
            raise InputError(
                f"{option('person')} {choice.index}: frame {frame}, the first with anyone in it, shows {len(by_x)} "
                f"{'person' if len(by_x) == 1 else 'people'} (choose 1 to {len(by_x)}, or a pixel position X,Y)"
            )
        return by_x[choice.index - 1]
    if choice.point is not None:
        x, y = choice.point
        holding = [p for p in people if p.box[0] <= x <= p.box[2] and p.box[1] <= y <= p.box[3]]
        if holding:
            return min(holding, key=lambda p: float((p.box[2] - p.box[0]) * (p.box[3] - p.box[1])))
        return min(people, key=lambda p: float(np.linalg.norm(_centre(p.box) - (x, y))))
    return max(people, key=lambda p: (float((p.box[2] - p.box[0]) * (p.box[3] - p.box[1])), p.box_score))


class PersonFollower:
    """Chooses one person per frame.

    With ``track`` (the default) the person ``choice`` names in the first frame anyone is seen is followed:
    each frame takes the detection overlapping the last followed box most, else the one whose centre is
    nearest. Without it, the release's choice: the highest ``box_score`` in every frame. ``people_seen`` is
    the most people any one frame showed.
    """

    def __init__(self, track: bool = True, choice: PersonChoice | None = None) -> None:
        self.track = track
        self.choice = choice or PersonChoice()
        self.previous_box: np.ndarray | None = None
        self.people_seen = 0
        self.frame = 0
        self.first_frame: int | None = None
        self.first_people: list[PersonPose] = []

    def pick(self, people: list[PersonPose]) -> PersonPose | None:
        self.people_seen = max(self.people_seen, len(people))
        frame, self.frame = self.frame, self.frame + 1
        if not people:
            return None
        if not self.track:
            person = select_person(people)
        elif self.previous_box is None:
            person = choose_person(people, self.choice, frame)
            self.first_frame, self.first_people = frame, list(people)
        else:
            previous = self.previous_box
            overlaps = [box_iou(p.box, previous) for p in people]
            best = int(np.argmax(overlaps))
            if overlaps[best] > 0:
                person = people[best]
            else:
                person = min(people, key=lambda p: float(np.linalg.norm(_centre(p.box) - _centre(previous))))
        self.previous_box = person.box
        return person


def identity_switches(keypoints: np.ndarray, scores: np.ndarray, threshold: float = 0.3) -> list[int]:
    """Frames where the followed person's body (points 0-22 scoring ``threshold`` or more) jumps to another place.

    A frame switches when its body box overlaps the last seen one by less than ``SWITCH_MAX_IOU`` and its centre
    moved more than ``SWITCH_JUMP`` of the larger box side: one person cannot do that from one frame to the next.
    Frames with nobody are skipped. Returns frame indices, ascending.
    """
    switches: list[int] = []
    previous: np.ndarray | None = None
    for frame, (kp, sc) in enumerate(zip(keypoints, scores)):
        seen = sc[:23] >= threshold
        if seen.sum() < 2:
            continue
        box = box_from_points(kp[:23], np.where(seen, 1.0, 0.0))
        if previous is not None:
            side = max(previous[2] - previous[0], previous[3] - previous[1], box[2] - box[0], box[3] - box[1])
            if box_iou(box, previous) < SWITCH_MAX_IOU and np.linalg.norm(_centre(box) - _centre(previous)) > SWITCH_JUMP * side:
                switches.append(frame)
        previous = box
    return switches


def frame_ranges(frames: list[int] | np.ndarray) -> str:
    """``[3, 4, 5, 9]`` as ``"3-5, 9"`` (for messages naming frames)."""
    frames = sorted(int(f) for f in frames)
    parts: list[str] = []
    start = prev = None
    for f in [*frames, None]:
        if start is not None and (f is None or f != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if f is not None and start is None:
            start = f
        prev = f
    return ", ".join(parts)


def box_from_points(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The tight x1, y1, x2, y2 box of the points with a positive score (zeros when there are none)."""
    seen = keypoints[scores > 0]
    if len(seen) == 0:
        return np.zeros(4, np.float32)
    return np.concatenate([seen.min(axis=0), seen.max(axis=0)]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# npz


def save_npz(track: KeypointTrack, path: str | Path) -> Path:
    """Write ``keypoints.npz`` atomically; ``fps`` is a float for other tools, ``fps_exact`` the fraction."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            keypoints=track.keypoints,
            scores=track.scores,
            fps=np.float64(track.fps),
            fps_exact=np.array(fps_arg(track.fps)),
            width=np.int64(track.width),
            height=np.int64(track.height),
            backend=np.array(track.backend),
        )
    return path


def load_npz(path: str | Path) -> KeypointTrack:
    """Read a ``keypoints.npz``; InputError naming the file when it is not one of ours."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise InputError(f"{path} lacks {', '.join(missing)}: not a posegen keypoints.npz (make one with posegen extract-pose)")
            fps = Fraction(str(data["fps_exact"])) if "fps_exact" in data.files else Fraction(float(data["fps"])).limit_denominator(1001)
            return KeypointTrack(
                keypoints=data["keypoints"],
                scores=data["scores"],
                fps=fps,
                width=int(data["width"]),
                height=int(data["height"]),
                backend=str(data["backend"]),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read keypoints from {path}: {exc} (pass a keypoints.npz written by posegen extract-pose)") from None


# ---------------------------------------------------------------------------------------------------
# OpenPose JSON (BODY_25 body, 70-point face, 21-point hands, flat x, y, confidence lists)

# COCO-WholeBody index for each BODY_25 point; -1 marks the derived neck (1) and mid-hip (8).
BODY25_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, -1, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 18, 19, 20, 21, 22)
# The same for OpenPose's 18-point COCO body model, accepted on input.
COCO18_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_OPENPOSE_FACE_POINTS = 70  # 68 iBUG points plus two pupils, which COCO-WholeBody lacks


def _flat(points: np.ndarray, scores: np.ndarray) -> list[float]:
    # JSON keeps every float64 digit, so a round trip changes nothing.
    return np.concatenate([points, scores[:, None]], axis=1).astype(np.float64).ravel().tolist()


def person_to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> dict:
    """One OpenPose ``people`` entry; the neck and mid-hip are the means of the shoulders and hips."""
    body = np.zeros((25, 3), np.float64)
    for op, coco in enumerate(BODY25_FROM_COCO):
        if coco >= 0:
            body[op] = (*keypoints[coco], scores[coco])
    for op, (a, b) in ((1, (5, 6)), (8, (11, 12))):
        if scores[a] > 0 and scores[b] > 0:
            body[op] = (*((keypoints[a] + keypoints[b]) / 2), (scores[a] + scores[b]) / 2)
    face = np.zeros((_OPENPOSE_FACE_POINTS, 3), np.float64)
    face[:FACE_SIZE, :2] = keypoints[FACE_START : FACE_START + FACE_SIZE]
    face[:FACE_SIZE, 2] = scores[FACE_START : FACE_START + FACE_SIZE]
    left = slice(LEFT_HAND_START, LEFT_HAND_START + HAND_SIZE)
    right = slice(RIGHT_HAND_START, RIGHT_HAND_START + HAND_SIZE)
    return {
        "person_id": [-1],
        "pose_keypoints_2d": _flat(body[:, :2], body[:, 2]),
        "face_keypoints_2d": _flat(face[:, :2], face[:, 2]),
        "hand_left_keypoints_2d": _flat(keypoints[left], scores[left]),
        "hand_right_keypoints_2d": _flat(keypoints[right], scores[right]),
        "pose_keypoints_3d": [],
        "face_keypoints_3d": [],
        "hand_left_keypoints_3d": [],
        "hand_right_keypoints_3d": [],
    }


def _triples(entry: dict, key: str, allowed: tuple[int, ...], source: Path) -> np.ndarray | None:
    values = entry.get(key) or []
    if len(values) == 0:
        return None
    if len(values) % 3 or len(values) // 3 not in allowed:
        raise InputError(
            f"{source}: {key} has {len(values)} numbers; expected {' or '.join(str(3 * n) for n in allowed)} (x, y, confidence per point)"
        )
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(arr).all():
        raise InputError(f"{source}: {key} contains NaN or infinity (write 0, 0, 0 for a missing point)")
    return arr


def person_from_openpose(entry: dict, source: Path) -> PersonPose:
    """COCO-WholeBody points from one OpenPose entry (BODY_25 or 18-point body); the neck is re-derived."""
    keypoints = np.zeros((NUM_KEYPOINTS, 2), np.float64)
    scores = np.zeros(NUM_KEYPOINTS, np.float64)
    body = _triples(entry, "pose_keypoints_2d", (25, 18), source)
    if body is not None:
        table = BODY25_FROM_COCO if len(body) == 25 else COCO18_FROM_COCO
        for op, coco in enumerate(table):
            if coco >= 0:
                keypoints[coco], scores[coco] = body[op, :2], body[op, 2]
    face = _triples(entry, "face_keypoints_2d", (FACE_SIZE, _OPENPOSE_FACE_POINTS), source)
    if face is not None:
        keypoints[FACE_START : FACE_START + FACE_SIZE] = face[:FACE_SIZE, :2]
        scores[FACE_START : FACE_START + FACE_SIZE] = face[:FACE_SIZE, 2]
    for key, start in (("hand_left_keypoints_2d", LEFT_HAND_START), ("hand_right_keypoints_2d", RIGHT_HAND_START)):
        hand = _triples(entry, key, (HAND_SIZE,), source)
        if hand is not None:
            keypoints[start : start + HAND_SIZE], scores[start : start + HAND_SIZE] = hand[:, :2], hand[:, 2]
    body_scores = scores[:23]
    return PersonPose(
        keypoints=keypoints,
        scores=scores,
        box=box_from_points(keypoints, scores),
        box_score=float(body_scores[body_scores > 0].mean()) if (body_scores > 0).any() else 0.0,
    )


def openpose_frame_name(index: int) -> str:
    """OpenPose's own per-frame naming, so its tools and ours sort the files the same way."""
    return f"frame_{index:012d}_keypoints.json"


def write_openpose_json(track: KeypointTrack, folder: str | Path) -> Path:
    """One OpenPose JSON per frame into ``folder`` (replaced atomically); empty ``people`` where nobody was found."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for i, (kp, sc) in enumerate(zip(track.keypoints, track.scores)):
            people = [person_to_openpose(kp, sc)] if (sc > 0).any() else []
            (tmp / openpose_frame_name(i)).write_text(json.dumps({"version": 1.3, "people": people}))
    return folder


def _frame_number(path: Path) -> tuple[int, str]:
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def openpose_files(source: str | Path) -> list[Path]:
    """The per-frame JSON files of a folder in frame order (the last number in each name), or one file."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InputError(f"keypoints not found: {source} (pass a keypoints.npz, an OpenPose JSON file or a folder of them)")
    files = sorted(source.glob("*.json"), key=_frame_number)
    if not files:
        raise InputError(f"{source} holds no .json files (expected one OpenPose JSON per frame)")
    return files


def read_openpose_frame(path: Path) -> list[PersonPose]:
    """Everyone in one OpenPose JSON file, highest mean body confidence first."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read OpenPose JSON {path}: {exc} (fix or re-export the file)") from None
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise InputError(f'{path} is not an OpenPose keypoints file: it has no "people" list')
    people = [person_from_openpose(entry, path) for entry in data["people"] if isinstance(entry, dict)]
    return sorted(people, key=lambda p: -p.box_score)


def load_keypoints(
    source: str | Path, *, fps: Fraction, width: int, height: int, track: bool = True, choice: PersonChoice | None = None
) -> KeypointTrack:
    """A track from a ``.npz`` of ours, or from OpenPose JSON (one file or a folder, one file per frame).

    OpenPose files carry no frame size or rate, so they take ``fps``, ``width`` and ``height`` (the
    video's); with several people in a frame the same choice as for detections applies.
    """
    source = Path(source)
    if source.suffix == ".npz":
        if not source.is_file():
            raise InputError(f"keypoints not found: {source} (check the path)")
        return load_npz(source)
    follower = PersonFollower(track, choice)
    keypoints, scores = [], []
    for path in openpose_files(source):
        person = follower.pick(read_openpose_frame(path))
        keypoints.append(person.keypoints if person else np.zeros((NUM_KEYPOINTS, 2)))
        scores.append(person.scores if person else np.zeros(NUM_KEYPOINTS))
    return KeypointTrack(np.stack(keypoints), np.stack(scores), fps, width, height, "openpose-json")
