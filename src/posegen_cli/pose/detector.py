"""Person boxes for Sapiens without mmdet/mmcv: RTMDet-m (the exact checkpoint PoseGen uses) in plain PyTorch.

Option A of pose.md §4. The network mirrors mmdet's CSPNeXt + CSPNeXtPAFPN + RTMDetSepBNHead module for
module, so the released state dict loads with ``strict=True``; pre- and post-processing follow mmdet's test
pipeline and Sapiens' ``process_one_image_bbox`` (score > 0.3, NMS 0.3 with "+1" areas).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from posegen_cli.errors import MissingModelError

DETECTOR_INPUT = 640
PAD_VALUE = 114
DETECTOR_MEAN = (103.53, 116.28, 123.675)
DETECTOR_STD = (57.375, 57.12, 58.395)
"""BGR statistics applied in the given channel order; PoseGen feeds RGB, so R gets B's statistics."""
STRIDES = (8, 16, 32)
SCORE_THR = 0.05
NMS_PRE = 1000
MAX_PER_IMG = 100
BOX_THR = 0.3
NMS_THR = 0.3
DETECTOR_FILE = "rtmdet_m_8xb32-100e_coco-obj365-person-235e8209.pth"


class ConvModule(nn.Module):
    """Conv (no bias) + BatchNorm + SiLU, with mmcv's ``conv``/``bn`` attribute names."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    def __init__(self, channels: int, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3)
        self.conv2 = DepthwiseSeparable(channels, channels, 5)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.act = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class CSPLayer(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, add_identity: bool, channel_attention: bool) -> None:
        super().__init__()
        mid = int(cout * 0.5)
        self.main_conv = ConvModule(cin, mid, 1)
        self.short_conv = ConvModule(cin, mid, 1)
        self.final_conv = ConvModule(2 * mid, cout, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, add_identity) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1)
        if self.attention is not None:
            out = self.attention(out)
        return self.final_conv(out)


class SPPBottleneck(nn.Module):
    def __init__(self, channels: int, kernels: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvModule(channels, mid, 1)
        self.poolings = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in kernels])
        self.conv2 = ConvModule(mid * (len(kernels) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class CSPNeXt(nn.Module):
    """The P5 backbone; returns the stride 8, 16 and 32 features."""

    _ARCH = ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False), (512, 1024, 3, False, True))

    def __init__(self, deepen: float, widen: float) -> None:
        super().__init__()
        stem = int(64 * widen)
        self.stem = nn.Sequential(ConvModule(3, stem // 2, 3, 2), ConvModule(stem // 2, stem // 2, 3), ConvModule(stem // 2, stem, 3))
        for i, (cin, cout, blocks, identity, spp) in enumerate(self._ARCH):
            cin, cout = int(cin * widen), int(cout * widen)
            layers: list[nn.Module] = [ConvModule(cin, cout, 3, 2)]
            if spp:
                layers.append(SPPBottleneck(cout))
            layers.append(CSPLayer(cout, cout, max(round(blocks * deepen), 1), identity, channel_attention=True))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stage2(self.stage1(self.stem(x)))
        c3 = x
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return c3, c4, c5


class CSPNeXtPAFPN(nn.Module):
    def __init__(self, channels: tuple[int, int, int], out_channels: int, num_blocks: int) -> None:
        super().__init__()
        self.reduce_layers = nn.ModuleList([ConvModule(channels[2], channels[1], 1), ConvModule(channels[1], channels[0], 1)])
        self.top_down_blocks = nn.ModuleList(
            [CSPLayer(channels[1] * 2, channels[1], num_blocks, False, False), CSPLayer(channels[0] * 2, channels[0], num_blocks, False, False)]
        )
        self.downsamples = nn.ModuleList([ConvModule(channels[0], channels[0], 3, 2), ConvModule(channels[1], channels[1], 3, 2)])
        self.bottom_up_blocks = nn.ModuleList(
            [CSPLayer(channels[0] * 2, channels[1], num_blocks, False, False), CSPLayer(channels[1] * 2, channels[2], num_blocks, False, False)]
        )
        self.out_convs = nn.ModuleList([ConvModule(c, out_channels, 3) for c in channels])

    def forward(self, feats: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        c3, c4, c5 = feats
        r5 = self.reduce_layers[0](c5)
        t4 = self.top_down_blocks[0](torch.cat([nn.functional.interpolate(r5, scale_factor=2.0, mode="nearest"), c4], 1))
        r4 = self.reduce_layers[1](t4)
        t3 = self.top_down_blocks[1](torch.cat([nn.functional.interpolate(r4, scale_factor=2.0, mode="nearest"), c3], 1))
        b4 = self.bottom_up_blocks[0](torch.cat([self.downsamples[0](t3), r4], 1))
        b5 = self.bottom_up_blocks[1](torch.cat([self.downsamples[1](b4), r5], 1))
        return [conv(f) for conv, f in zip(self.out_convs, (t3, b4, b5))]


class RTMDetSepBNHead(nn.Module):
    """Per-level BN, convs shared across levels (the same Conv2d objects, as in mmdet), exp on distances."""

    def __init__(self, channels: int, num_classes: int = 1, stacked_convs: int = 2) -> None:
        super().__init__()
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for _ in STRIDES:
            self.cls_convs.append(nn.ModuleList([ConvModule(channels, channels, 3) for _ in range(stacked_convs)]))
            self.reg_convs.append(nn.ModuleList([ConvModule(channels, channels, 3) for _ in range(stacked_convs)]))
        for level in range(1, len(STRIDES)):
            for i in range(stacked_convs):
                self.cls_convs[level][i].conv = self.cls_convs[0][i].conv
                self.reg_convs[level][i].conv = self.reg_convs[0][i].conv
        self.rtm_cls = nn.ModuleList([nn.Conv2d(channels, num_classes, 1) for _ in STRIDES])
        self.rtm_reg = nn.ModuleList([nn.Conv2d(channels, 4, 1) for _ in STRIDES])

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scores, distances = [], []
        for level, (x, stride) in enumerate(zip(feats, STRIDES)):
            cls_feat, reg_feat = x, x
            for layer in self.cls_convs[level]:
                cls_feat = layer(cls_feat)
            for layer in self.reg_convs[level]:
                reg_feat = layer(reg_feat)
            scores.append(self.rtm_cls[level](cls_feat))
            distances.append(self.rtm_reg[level](reg_feat).exp() * stride)
        return scores, distances


class RTMDet(nn.Module):
    """RTMDet with mmdet's parameter names (``backbone.*``, ``neck.*``, ``bbox_head.*``); m = deepen 0.67, widen 0.75."""

    def __init__(self, deepen: float = 0.67, widen: float = 0.75, num_classes: int = 1) -> None:
        super().__init__()
        channels = (int(256 * widen), int(512 * widen), int(1024 * widen))
        self.backbone = CSPNeXt(deepen, widen)
        self.neck = CSPNeXtPAFPN(channels, channels[0], max(round(3 * deepen), 1))
        self.bbox_head = RTMDetSepBNHead(channels[0], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.bbox_head(self.neck(self.backbone(x)))


def load_rtmdet(path: str | Path, device: torch.device, deepen: float = 0.67, widen: float = 0.75) -> RTMDet:
    """Build RTMDet and load an mmdet checkpoint (``{"state_dict": ...}`` or a bare state dict) strictly."""
    path = Path(path)
    if not path.is_file():
        raise MissingModelError(f"person detector checkpoint not found: {path} (run `posegen download sapiens-detector`)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingModelError(f"person detector checkpoint {path} cannot be read: {reason} (delete it and download it again)") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise MissingModelError(f"person detector checkpoint {path} holds no state dict (delete it and download it again)")
    # mmdet checkpoints may carry preprocessor or EMA entries; only the network's own keys must match.
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in {"backbone", "neck", "bbox_head"}}
    model = RTMDet(deepen, widen)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MissingModelError(f"person detector checkpoint {path} does not match RTMDet-m: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def letterbox(frame: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Keep-ratio resize into 640x640 (mmcv rounding), padded bottom/right with 114; returns (w, h) scale factors."""
    height, width = frame.shape[:2]
    s = DETECTOR_INPUT / max(height, width)
    new_w, new_h = int(width * s + 0.5), int(height * s + 0.5)
    resized = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((DETECTOR_INPUT, DETECTOR_INPUT, 3), PAD_VALUE, dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, (new_w / width, new_h / height)


def decode_detections(
    scores: list[torch.Tensor], distances: list[torch.Tensor], scale_factor: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """One image's head outputs (per level (1, H, W) logits and (4, H, W) distances) to (n, 5) boxes in frame pixels.

    mmdet 3's order with ``nms=None``: per level score > 0.05 and top 1000, clipped to ``shape`` (the
    padded 640x640 input: mmcv's Pad overwrites ``img_shape``), multiplied by float32(1 / scale factor)
    (mmdet's ``scale_boxes``, which can differ from a division in the last bit), boxes of zero width or
    height dropped, then all levels sorted and the best 100 kept.
    """
    kept_scores, kept_boxes = [], []
    for logit, dist, stride in zip(scores, distances, STRIDES):
        prob = logit[0].float().sigmoid().flatten()
        d = dist.float().reshape(4, -1).T
        h, w = logit.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, device=prob.device), torch.arange(w, device=prob.device), indexing="ij")
        priors = torch.stack([xs.flatten(), ys.flatten()], dim=-1).float() * stride
        valid = torch.nonzero(prob > SCORE_THR).flatten()
        top = prob[valid].sort(descending=True)
        keep = valid[top.indices[:NMS_PRE]]
        p, dd = priors[keep], d[keep]
        kept_boxes.append(torch.stack([p[:, 0] - dd[:, 0], p[:, 1] - dd[:, 1], p[:, 0] + dd[:, 2], p[:, 1] + dd[:, 3]], dim=-1))
        kept_scores.append(top.values[:NMS_PRE])
    boxes = torch.cat(kept_boxes)
    probs = torch.cat(kept_scores)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, shape[0])
    boxes = boxes * torch.tensor([1 / scale_factor[0], 1 / scale_factor[1]] * 2, device=boxes.device)
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, probs = boxes[nonempty], probs[nonempty]
    order = probs.sort(descending=True).indices[:MAX_PER_IMG]
    out = torch.cat([boxes[order], probs[order, None]], dim=1)
    return out.cpu().numpy().astype(np.float32)


def nms_plus_one(dets: np.ndarray, threshold: float = NMS_THR) -> list[int]:
    """Sapiens' greedy NMS: areas with the +1 pixel convention, suppress overlaps above ``threshold``."""
    x1, y1, x2, y2, score = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = score.argsort()[::-1]
    keep: list[int] = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


def select_person_boxes(dets: np.ndarray, box_thr: float = BOX_THR, nms_thr: float = NMS_THR) -> np.ndarray:
    """Sapiens' ``process_one_image_bbox``: score above ``box_thr``, then NMS; highest score first."""
    dets = dets[dets[:, 4] > box_thr]
    return dets[nms_plus_one(dets, nms_thr)] if len(dets) else dets.reshape(0, 5)


class RTMDetPersonDetector:
    """The detector PoseGen runs before Sapiens pose (``sapiens-detector`` in the model table)."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        models_dir: str | Path | None = None,
        *,
        checkpoint: str | Path | None = None,
        deepen: float = 0.67,
        widen: float = 0.75,
    ) -> None:
        self.device = torch.device(device)
        if checkpoint is None:
            from posegen_cli.hub import model_path

            checkpoint = model_path("sapiens-detector", models_dir) / DETECTOR_FILE
        self.model = load_rtmdet(checkpoint, self.device, deepen, widen)

    @torch.inference_mode()
    def boxes(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Person boxes per RGB frame, (n, 5) x1, y1, x2, y2, score.

        Float32 throughout: PoseGen calls mmdet's ``inference_detector`` outside the autocast that wraps
        only the pose model. Frames go through in one batch (BatchNorm is in eval mode, so batching
        changes nothing).
        """
        mean = torch.tensor(DETECTOR_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(DETECTOR_STD, device=self.device).view(1, 3, 1, 1)
        if len(frames) == 0:
            return []
        boxed = [letterbox(frame) for frame in frames]
        images = np.stack([image for image, _ in boxed])
        x = (torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() - mean) / std
        scores, distances = self.model(x)
        return [
            select_person_boxes(decode_detections([s[i] for s in scores], [d[i] for d in distances], factors, images.shape[1:3]))
            for i, (_, factors) in enumerate(boxed)
        ]
