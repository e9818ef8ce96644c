"""ResNet-50 extractor: torchvision checkpoint compatibility, weight specs, pooling and BN re-estimation."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from core.errors import InputError
from core.network import (
    ENV_OFFLINE,
    ENV_WEIGHTS,
    PatientFeatureNet,
    ResNet50Extractor,
    build_extractor,
    recalibrate_batchnorm,
    state_dict_sha256,
)


def torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision's resnet50().state_dict() names and shapes, written out independently of our model."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    in_ch = 64
    for li, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, in_ch, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (width * 4, width, 1, 1)
            bn(f"{p}.bn3", width * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (width * 4, in_ch, 1, 1)
                bn(f"{p}.downsample.1", width * 4)
            in_ch = width * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def torchvision_checkpoint(seed: int = 3) -> dict[str, torch.Tensor]:
    """A torchvision-layout state_dict with random values (BN variances positive), fc included."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnet50_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    return torchvision_checkpoint()


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory: pytest.TempPathFactory, tv_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tv.pth"
    torch.save(tv_state, path)
    return path


@pytest.fixture(autouse=True)
def _isolated_weights_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real ImageNet file and no download can leak into these tests."""
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(ENV_OFFLINE, "1")


def assert_loaded(extractor: ResNet50Extractor, state: dict[str, torch.Tensor]) -> None:
    ours = extractor.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            assert key not in ours
        else:
            assert torch.equal(ours[key], value.to(ours[key].dtype)), key


def test_parameter_names_and_shapes_are_torchvision_layout() -> None:
    expected = {k: v for k, v in torchvision_resnet50_shapes().items() if not k.startswith("fc.")}
    ours = {k: tuple(v.shape) for k, v in ResNet50Extractor().state_dict().items()}
    assert ours == expected


def test_file_checkpoint_loads_every_tensor_and_records_hash(
    tv_file: Path, tv_state: dict[str, torch.Tensor]
) -> None:
    extractor, info = build_extractor(f"file:{tv_file}")
    assert_loaded(extractor, tv_state)
    assert not extractor.training
    assert info.kind == "file" and info.source == str(tv_file)
    assert info.sha256 == sha256(tv_file)
    assert info.details["ignored_keys"] == ["fc.bias", "fc.weight"]
    info.model_dump_json()  # JSON-serialisable


def test_own_state_dict_round_trips(tmp_path: Path) -> None:
    first, _ = build_extractor("random", seed=5)
    path = tmp_path / "extractor.pt"
    torch.save({"state_dict": first.state_dict()}, path)
    second, info = build_extractor(f"file:{path}", seed=0)
    assert state_dict_sha256(second) == state_dict_sha256(first)
    assert info.kind == "file"


def test_legacy_checkpoint_without_num_batches_tracked_loads(
    tmp_path: Path, tv_state: dict[str, torch.Tensor]
) -> None:
    legacy = {f"module.{k}": v for k, v in tv_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    extractor, info = build_extractor(f"file:{path}")
    assert_loaded(extractor, {k: v for k, v in tv_state.items() if not k.endswith("num_batches_tracked")})
    assert info.details["filled_num_batches_tracked"] == 53


@pytest.mark.parametrize("key", ["layer3.2.bn2.running_var", "layer1.0.downsample.0.weight"])
def test_missing_key_is_an_error_naming_it(
    tmp_path: Path, tv_state: dict[str, torch.Tensor], key: str
) -> None:
    path = tmp_path / "broken.pth"
    torch.save({k: v for k, v in tv_state.items() if k != key}, path)
    with pytest.raises(InputError, match="missing keys") as err:
        build_extractor(f"file:{path}")
    assert key in str(err.value)


def test_unexpected_key_and_wrong_shape_are_errors(tmp_path: Path, tv_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "extra.pth"
    torch.save({**tv_state, "layer5.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(InputError, match=r"unexpected keys \['layer5.0.conv1.weight'\]"):
        build_extractor(f"file:{path}")
    torch.save({**tv_state, "bn1.weight": torch.zeros(32)}, path)
    with pytest.raises(InputError, match=r"'bn1.weight' has shape \(32,\), expected \(64,\)"):
        build_extractor(f"file:{path}")


def test_imagenet_from_env_file_named_with_hash_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tv_file: Path, tv_state: dict[str, torch.Tensor]
) -> None:
    named = tmp_path / f"resnet50-{sha256(tv_file)[:8]}.pth"
    named.write_bytes(tv_file.read_bytes())
    monkeypatch.setenv(ENV_WEIGHTS, str(named))
    extractor, info = build_extractor("imagenet")
    assert_loaded(extractor, tv_state)
    assert info.kind == "imagenet" and info.sha256 == sha256(tv_file)
    assert info.details["found"] == f"env {ENV_WEIGHTS}"
    assert info.details["torchvision_release"] is None  # not one of torchvision's published files


def test_imagenet_wrong_hash_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tv_file: Path
) -> None:
    wrong = tmp_path / "resnet50-deadbeef.pth"
    wrong.write_bytes(tv_file.read_bytes())
    monkeypatch.setenv(ENV_WEIGHTS, str(wrong))
    with pytest.raises(InputError, match="SHA-256 mismatch"):
        build_extractor("imagenet")


def test_imagenet_in_hub_cache_is_hash_checked(tmp_path: Path, tv_file: Path) -> None:
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet50-0676ba61.pth").write_bytes(tv_file.read_bytes())  # right name, wrong content
    with pytest.raises(InputError, match="SHA-256 mismatch") as err:
        build_extractor("imagenet")
    assert "resnet50-0676ba61.pth" in str(err.value)


def test_imagenet_without_hash_in_name_is_refused(monkeypatch: pytest.MonkeyPatch, tv_file: Path) -> None:
    monkeypatch.setenv(ENV_WEIGHTS, str(tv_file))
    with pytest.raises(InputError, match="no SHA-256 prefix"):
        build_extractor("imagenet")


def test_imagenet_absent_offline_says_how_to_provide_it() -> None:
    with pytest.raises(InputError) as err:
        build_extractor("imagenet")
    text = str(err.value)
    assert ENV_WEIGHTS in text and "hub/checkpoints" in text and "file:" in text and ENV_OFFLINE in text


def test_imagenet_failed_download_says_how_to_provide_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_OFFLINE)
    calls = []

    def no_network(url: str, **kwargs: object) -> None:
        calls.append((url, kwargs))
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(InputError, match=r"download failed.*network is unreachable.*PDL1_IMAGENET_WEIGHTS"):
        build_extractor("imagenet")
    assert calls and calls[0][1]["check_hash"] is True


def test_unknown_spec_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown weights spec"):
        build_extractor("imagenet21k")
    with pytest.raises(InputError, match="not found"):
        build_extractor(f"file:{tmp_path / 'nope.pth'}")


def test_random_is_seeded_logged_recorded_and_leaves_global_rng(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="core.network"):
        a, info_a = build_extractor("random", seed=1)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    b, info_b = build_extractor("random", seed=1)
    _, info_c = build_extractor("random", seed=2)
    assert state_dict_sha256(a) == state_dict_sha256(b) == info_a.sha256 == info_b.sha256
    assert info_c.sha256 != info_a.sha256
    assert info_a.kind == "random" and info_a.seed == 1 and not info_a.bn_recalibrated
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def random_extractor() -> ResNet50Extractor:
    return build_extractor("random", seed=0)[0]


def test_feature_shapes_for_any_size_at_least_32(random_extractor: ResNet50Extractor) -> None:
    x = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        assert random_extractor.feature_maps(x).shape == (2, 2048, 1, 2)
        assert random_extractor(x).shape == (2, 2048)
    with pytest.raises(InputError, match="at least 32x32"):
        random_extractor(torch.randn(1, 3, 16, 64))
    with pytest.raises(InputError, match=r"\[B,3,H,W\]"):
        random_extractor(torch.randn(1, 1, 64, 64))


def test_forward_is_global_average_of_feature_maps(random_extractor: ResNet50Extractor) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        maps = random_extractor.feature_maps(x)
        pooled = random_extractor(x)
    torch.testing.assert_close(pooled, maps.mean(dim=(2, 3)))


def test_patient_feature_net_is_mean_over_slices(random_extractor: ResNet50Extractor) -> None:
    x = torch.randn(2, 3, 3, 64, 64)
    net = PatientFeatureNet(random_extractor)
    with torch.inference_mode():
        got = net(x)
        per_slice = torch.stack([random_extractor(x[i]) for i in range(2)])  # [N,S,2048]
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, per_slice.mean(dim=1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])
    with pytest.raises(InputError, match=r"\[N,S,3,H,W\]"):
        net(x[0])


def calibration_batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 64, 64, generator=g) * 3 + 1 for _ in range(2)]


def test_batchnorm_recalibration_changes_only_stats_and_is_deterministic() -> None:
    a, _ = build_extractor("random", seed=0)
    b, _ = build_extractor("random", seed=0)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    details = recalibrate_batchnorm(a, calibration_batches())
    recalibrate_batchnorm(b, calibration_batches())
    assert state_dict_sha256(a) == state_dict_sha256(b)
    assert details["n_images"] == 8 and details["n_batches"] == 2 and details["n_bn_layers"] == 53
    after = a.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.split(".")[-1] in {"running_mean", "running_var", "num_batches_tracked"} for k in changed
    )
    assert not a.training and all(
        m.momentum == 0.1 for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_batchnorm_recalibration_standardises_channels_on_the_calibration_data() -> None:
    """What makes random-weight features usable: after re-estimation each BN normalises its channels, the
    deep activations no longer blow up, and the pooled features vary with the image instead of being a
    large constant offset."""
    extractor, _ = build_extractor("random", seed=0)
    x = torch.cat(calibration_batches())
    seen: dict[str, torch.Tensor] = {}
    for name in ("bn1", "layer4.2.bn3"):  # clone: the following ReLU works in place
        hook = lambda m, i, o, name=name: seen.__setitem__(name, o.detach().clone())  # noqa: E731
        extractor.get_submodule(name).register_forward_hook(hook)

    def observe() -> tuple[dict[str, torch.Tensor], float]:
        with torch.inference_mode():
            feats = extractor(x)
        return dict(seen), float(feats.std(dim=0).mean() / feats.mean(dim=0).abs().mean())

    raw, raw_cv = observe()
    recalibrate_batchnorm(extractor, calibration_batches())
    cal, cal_cv = observe()
    per_channel = cal["bn1"].transpose(0, 1).reshape(64, -1)
    assert per_channel.mean(dim=1).abs().max() < 1e-3
    torch.testing.assert_close(per_channel.std(dim=1), torch.ones(64), atol=0.01, rtol=0)
    assert raw["layer4.2.bn3"].abs().mean() > 5 > 1.5 > cal["layer4.2.bn3"].abs().mean()
    assert cal_cv > 3 * raw_cv


def test_batchnorm_recalibration_without_data_is_an_error(random_extractor: ResNet50Extractor) -> None:
    fresh, _ = build_extractor("random", seed=0)
    with pytest.raises(InputError, match="no training slices"):
        recalibrate_batchnorm(fresh, [])
