"""The 2-D ResNet-50 feature extractor, its weight loading and batch-norm re-estimation.

The network is MONAI's ResNet (bottleneck blocks [3, 4, 6, 3], 7x7/2 stem, max-pool, no classifier) built
so that its parameter names are exactly torchvision's (``conv1``, ``bn1``, ``layerX.Y.{conv,bn}{1,2,3}``,
``layerX.0.downsample.{0,1}``): a torchvision-format ImageNet checkpoint loads without renaming once its
``fc.*`` entries are dropped, and torchvision itself (which cannot be installed beside the CPU torch build)
is never needed.

Weights (``build_extractor(weights)``):

- ``"imagenet"``: a local torchvision-format checkpoint, SHA-256 verified. Looked up in env
  ``PDL1_IMAGENET_WEIGHTS``, then in the torch hub cache (``$TORCH_HOME/hub/checkpoints``); when neither
  has it and downloads are allowed (``PDL1_OFFLINE`` unset), torch hub downloads it with hash checking.
- ``"file:PATH"``: any torchvision-format ResNet-50 checkpoint or a state_dict of this extractor.
- ``"random"``: seeded Kaiming initialisation. Announced with a WARNING and recorded (``WeightsInfo.kind``);
  follow it with :func:`recalibrate_batchnorm` on the training cohort (see there for why).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.nets import ResNet
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from core.errors import InputError
from core.manifest import sha256_file

log = logging.getLogger(__name__)

FEATURE_DIM = 2048
MIN_INPUT_SIZE = 32  # layer4 has stride 32: smaller inputs leave no spatial extent to pool
ENV_WEIGHTS = "PDL1_IMAGENET_WEIGHTS"
ENV_OFFLINE = "PDL1_OFFLINE"

# torchvision's published ResNet-50 ImageNet checkpoints; the hex in the name is the sha256 prefix.
IMAGENET_CHECKPOINTS: dict[str, str] = {
    "resnet50-0676ba61.pth": "IMAGENET1K_V2",
    "resnet50-11ad3fa6.pth": "IMAGENET1K_V1",
    "resnet50-19c8e357.pth": "IMAGENET1K_V1 (legacy file)",
}
IMAGENET_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention
_IGNORED_PREFIXES = ("fc.",)  # the ImageNet classifier is not part of the extractor
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")

HOW_TO_PROVIDE = (
    "Download torchvision's ResNet-50 ImageNet checkpoint on a machine with internet access, e.g. "
    f"{IMAGENET_URL} (IMAGENET1K_V1) or https://download.pytorch.org/models/resnet50-0676ba61.pth "
    "(IMAGENET1K_V2), keep its file name (the hex part is the start of its SHA-256 and is verified), and "
    f"either set {ENV_WEIGHTS}=/path/to/resnet50-XXXXXXXX.pth or copy it into "
    "$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/). Alternatively pass "
    "weights='file:/path/to/checkpoint.pth' (any torchvision-format ResNet-50), or weights='random' "
    "(seeded, with batch-norm re-estimation on the training cohort; recorded in the run metadata)."
)


class WeightsInfo(BaseModel):
    """Where the extractor's weights came from; written to run.json / extractor.json (JSON-serialisable)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["imagenet", "file", "random"]
    spec: str  # the weights argument as given
    source: str | None = None  # checkpoint path (None for random)
    sha256: str | None = None  # checkpoint file hash; for random, the initial state_dict hash
    seed: int | None = None
    bn_recalibrated: bool = False  # set by the feature stage after recalibrate_batchnorm
    details: dict[str, Any] = Field(default_factory=dict)  # load details, BN re-estimation, device


class ResNet50Extractor(ResNet):
    """ResNet-50 trunk (MONAI) without classifier: layer4 maps and their global average (2048-d)."""

    def __init__(self) -> None:
        super().__init__(
            block="bottleneck",
            layers=[3, 4, 6, 3],
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=False,
            shortcut_type="B",
            feed_forward=False,  # no fc: the extractor ends at the pooled layer4 features
            bias_downsample=False,  # torchvision's 1x1 projection convs have no bias
        )

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B,3,H,W]`` (H, W >= 32) -> layer4 output ``[B,2048,ceil(H/32),ceil(W/32)]``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected a [B,3,H,W] tensor, got shape {tuple(x.shape)}", field="slices")
        if not torch.jit.is_tracing() and min(x.shape[2], x.shape[3]) < MIN_INPUT_SIZE:
            raise InputError(
                f"slices must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {tuple(x.shape[2:])}",
                field="slices",
            )
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B,3,H,W]`` -> global-average-pooled layer4 features ``[B,2048]``."""
        return self.feature_maps(x).mean(dim=(2, 3))


class PatientFeatureNet(nn.Module):
    """Per-patient feature: the mean over a patient's S slices of the per-slice 2048-d GAP features."""

    def __init__(self, extractor: ResNet50Extractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N,S,3,H,W]`` -> ``[N,2048]``; all N*S slices go through the trunk in one pass."""
        if x.ndim != 5:
            raise InputError(f"expected [N,S,3,H,W] slices, got shape {tuple(x.shape)}", field="slices")
        n, s = x.shape[0], x.shape[1]
        feats = self.extractor(x.reshape(n * s, x.shape[2], x.shape[3], x.shape[4]))
        return feats.reshape(n, s, feats.shape[-1]).mean(dim=1)


# --------------------------------------------------------------------------------------------- weights


def state_dict_sha256(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Hash of a state_dict's names, dtypes, shapes and values: identifies the weights actually used
    (e.g. after batch-norm re-estimation), independent of how they were serialised."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_torchvision_state(
    extractor: ResNet50Extractor, state: Mapping[str, Any], *, source: str | None = None
) -> dict[str, Any]:
    """Load a torchvision-format ResNet-50 (or our own) state_dict strictly; returns load details.

    ``fc.*`` is ignored, a ``module.`` prefix (DataParallel) is stripped, and a missing
    ``num_batches_tracked`` (pre-2018 checkpoints) is set to 0. Anything else missing, unexpected or of
    the wrong shape is an :class:`InputError` naming the key.
    """
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise InputError("checkpoint holds no state_dict", source=source, field="weights")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if not isinstance(value, torch.Tensor):
            raise InputError(f"entry {key!r} is not a tensor", source=source, field="weights")
        cleaned[name] = value
    ignored = sorted(k for k in cleaned if k.startswith(_IGNORED_PREFIXES))
    for k in ignored:
        del cleaned[k]

    expected = extractor.state_dict()
    filled = []
    for key in expected:
        if key not in cleaned and key.endswith("num_batches_tracked"):
            cleaned[key] = torch.zeros_like(expected[key])
            filled.append(key)
    missing = [k for k in expected if k not in cleaned]
    unexpected = [k for k in cleaned if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        problem = "not a torchvision-format ResNet-50 checkpoint: " + "; ".join(parts)
        raise InputError(problem, source=source, field="weights")
    for key, ref in expected.items():
        if tuple(cleaned[key].shape) != tuple(ref.shape):
            raise InputError(
                f"key {key!r} has shape {tuple(cleaned[key].shape)}, expected {tuple(ref.shape)}",
                source=source,
                field="weights",
            )
    extractor.load_state_dict({k: v.to(expected[k].dtype) for k, v in cleaned.items()}, strict=True)
    return {"ignored_keys": ignored, "filled_num_batches_tracked": len(filled)}


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/non-torch files
        raise InputError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", source=str(path)) from exc


def _verify_name_hash(path: Path, digest: str) -> str | None:
    """torch hub convention: ``name-<sha256 prefix>.ext``. Returns the prefix, raises on mismatch."""
    m = _HASH_IN_NAME.search(path.name)
    if m is None:
        return None
    if not digest.startswith(m.group(1)):
        raise InputError(
            f"SHA-256 mismatch: file name says {m.group(1)}..., file content is {digest[:16]}... "
            "(corrupted or wrong file)",
            source=str(path),
            field="weights",
        )
    return m.group(1)


def _find_imagenet_checkpoint() -> tuple[Path, str]:
    """Return (path, how found). Env var first, then the torch hub cache; raises when absent."""
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise InputError(f"{ENV_WEIGHTS} points to a missing file. {HOW_TO_PROVIDE}", source=str(path))
        return path, f"env {ENV_WEIGHTS}"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in IMAGENET_CHECKPOINTS:
        if (hub / name).is_file():
            return hub / name, "torch hub cache"
    if os.environ.get(ENV_OFFLINE):
        raise InputError(
            f"ImageNet ResNet-50 weights not found ({ENV_WEIGHTS} unset, none in {hub}) and downloads are "
            f"disabled ({ENV_OFFLINE} is set). {HOW_TO_PROVIDE}",
            field="weights",
        )
    try:
        log.info("downloading ResNet-50 ImageNet weights from %s (hash-checked)", IMAGENET_URL)
        torch.hub.load_state_dict_from_url(IMAGENET_URL, map_location="cpu", check_hash=True, progress=False)
    except Exception as exc:
        raise InputError(
            f"ImageNet ResNet-50 weights not found ({ENV_WEIGHTS} unset, none in {hub}) and the download "
            f"failed ({type(exc).__name__}: {exc}). {HOW_TO_PROVIDE}",
            field="weights",
        ) from exc
    return hub / Path(IMAGENET_URL).name, "downloaded by torch hub"


def _random_extractor(seed: int) -> ResNet50Extractor:
    """Seeded construction without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet50Extractor()


def build_extractor(weights: str, *, seed: int = 0) -> tuple[ResNet50Extractor, WeightsInfo]:
    """Build the extractor in eval mode with ``weights`` = ``"imagenet"``, ``"file:PATH"`` or ``"random"``."""
    extractor = _random_extractor(seed)
    if weights == "random":
        log.warning(
            "ResNet-50 weights: RANDOM (seeded Kaiming init, seed=%d); no pretrained weights are used. "
            "Re-estimate batch-norm statistics on the training cohort before extracting features.",
            seed,
        )
        info = WeightsInfo(
            kind="random",
            spec=weights,
            seed=seed,
            sha256=state_dict_sha256(extractor),
            details={"init": "monai ResNet kaiming_normal_(fan_out, relu); BN weight=1, bias=0"},
        )
        return extractor.eval(), info
    if weights == "imagenet":
        path, found = _find_imagenet_checkpoint()
        kind: Literal["imagenet", "file"] = "imagenet"
    elif weights.startswith("file:"):
        path, found = Path(weights[len("file:") :]).expanduser(), "file"
        if not path.is_file():
            raise InputError("weights file not found", source=str(path), field="weights")
        kind = "file"
    else:
        raise InputError(
            f"unknown weights spec {weights!r}; use 'imagenet', 'file:PATH' or 'random'", field="weights"
        )
    digest = sha256_file(path)
    prefix = _verify_name_hash(path, digest)
    if kind == "imagenet" and prefix is None:
        raise InputError(
            "cannot verify the ImageNet checkpoint: its name carries no SHA-256 prefix "
            "(torchvision names it resnet50-<first hex of sha256>.pth); keep the original name, or use "
            f"weights='file:{path}'",
            source=str(path),
            field="weights",
        )
    details = load_torchvision_state(extractor, _read_checkpoint(path), source=str(path))
    details["found"] = found
    release = IMAGENET_CHECKPOINTS.get(path.name)  # the name's hash prefix was verified above
    if kind == "imagenet":
        details["torchvision_release"] = release
        if release is None:
            log.warning("ImageNet checkpoint %s is not one of torchvision's published files", path.name)
    log.info("ResNet-50 weights: %s from %s (sha256 %s)", kind, path, digest[:12])
    info = WeightsInfo(kind=kind, spec=weights, source=str(path), sha256=digest, seed=seed, details=details)
    return extractor.eval(), info


# ------------------------------------------------------------------------------------ batch-norm stats


def recalibrate_batchnorm(
    extractor: nn.Module, batches: Iterable[torch.Tensor], *, momentum: float | None = None
) -> dict[str, Any]:
    """Re-estimate every BatchNorm's running mean/var from ``batches`` (training-cohort slices only).

    Why: with random conv weights the stored BN statistics (mean 0, var 1) do not match the actual
    activations, so through 16 residual blocks the activations explode or collapse and the pooled
    features are dominated by scale rather than image content. Re-estimating the statistics on real
    slices standardises every channel, so the global-average-pooled features become comparable texture
    statistics. (Same procedure as ``torch.optim.swa_utils.update_bn``.) Only running statistics change,
    no learned parameter does, and only training data are used, so validation cohorts stay unseen.

    ``momentum=None`` gives the cumulative average over batches (equal weight per batch); deterministic
    for the same slices, order and batching. Returns details for the run metadata; leaves eval mode.
    """
    bns = [m for m in extractor.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("the network has no batch-norm layers to recalibrate")
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = momentum
    n_batches = n_images = 0
    extractor.train()
    try:
        with torch.no_grad():
            for batch in batches:
                extractor(batch)
                n_batches += 1
                n_images += int(batch.shape[0])
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        extractor.eval()
    if n_batches == 0:
        raise InputError("no training slices to re-estimate batch-norm statistics", field="training cohort")
    log.info("re-estimated batch-norm statistics on %d slices in %d batches", n_images, n_batches)
    return {
        "n_batches": n_batches,
        "n_images": n_images,
        "momentum": momentum,
        "n_bn_layers": len(bns),
        "method": "cumulative average of batch statistics" if momentum is None else "exponential average",
    }
