"""bench.graph's input precision sensitivity: the perturbations (pure numpy), the measurement on a fake
session, and its rendering into BENCHMARKS.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is not an installed package (run from the repository root)
    sys.path.insert(0, str(ROOT))

from bench import common, graph, run_all  # noqa: E402
from core.preprocessing import PreprocessConfig  # noqa: E402

CONFIG = PreprocessConfig()  # ImageNet mean/std, the study's window
MEAN, STD = CONFIG.mean, CONFIG.std


def _network_input(shape: tuple[int, ...] = (2, 3, 3, 8, 8), seed: int = 0) -> np.ndarray:
    """Normalised inputs made the way preprocessing makes them: a [0, 1] window, 3 equal channels."""
    v = np.random.default_rng(seed).uniform(0, 1, (*shape[:-3], 1, *shape[-2:]))
    return graph.from_window(np.repeat(v, 3, axis=-3), MEAN, STD)


def test_window_round_trip_uses_the_given_mean_and_std() -> None:
    x = _network_input()
    assert np.allclose(graph.from_window(graph.to_window(x, MEAN, STD), MEAN, STD), x, atol=1e-6)
    v = graph.to_window(x, MEAN, STD)
    assert v.min() >= -1e-6 and v.max() <= 1 + 1e-6
    # channel axis is -3: channel 0 of a zero window is -mean/std of channel 0, not of another channel
    zero = graph.from_window(np.zeros((3, 2, 2)), MEAN, STD)
    assert np.allclose(zero[:, 0, 0], [-m / s for m, s in zip(MEAN, STD)])


def test_fp16_input_equals_a_float16_cast() -> None:
    x = _network_input()
    out = graph.fp16_input(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.array_equal(out, x.astype(np.float16).astype(np.float32))
    assert 0 < np.abs(out - x).max() <= np.abs(x).max() * 2.0**-11  # half an fp16 ulp, relative


def test_gaussian_noise_has_its_sigma_and_repeats_with_the_seed() -> None:
    x = _network_input((4, 3, 3, 32, 32))
    a = graph.gaussian_noise(x, 1e-4, np.random.default_rng(7))
    b = graph.gaussian_noise(x, 1e-4, np.random.default_rng(7))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    d = (a.astype(np.float64) - x).ravel()
    assert abs(d.std() - 1e-4) < 5e-6 and abs(d.mean()) < 5e-6
    assert not np.array_equal(graph.gaussian_noise(x, 1e-4, np.random.default_rng(8)), a)


def test_uint8_window_input_has_256_levels_per_channel_and_rounds_to_the_nearest() -> None:
    x = _network_input((4, 3, 3, 32, 32))
    out = graph.uint8_window_input(x, MEAN, STD)
    assert out.dtype == np.float32 and out.shape == x.shape
    v, q = graph.to_window(x, MEAN, STD), graph.to_window(out, MEAN, STD)
    for c in range(3):
        assert len(np.unique(q[..., c, :, :])) <= 256
        levels = q[..., c, :, :] * 255
        assert np.abs(levels - np.rint(levels)).max() < 1e-3  # on the uint8 lattice
    assert np.abs(q - v).max() <= 0.5 / 255 + 1e-6  # within half a step
    assert np.abs(q - v).max() > 0.4 / 255  # and it does quantise
    assert np.allclose(graph.uint8_window_input(out, MEAN, STD), out, atol=1e-6)  # idempotent


def test_uint8_window_input_clips_outside_the_window() -> None:
    x = graph.from_window(np.array([-0.3, 0.0, 1.0, 1.7]).reshape(1, 1, 4) * np.ones((3, 1, 1)), MEAN, STD)
    q = graph.to_window(graph.uint8_window_input(x, MEAN, STD), MEAN, STD)
    assert np.allclose(q, np.array([0.0, 0.0, 1.0, 1.0]) * np.ones((3, 1, 1)), atol=1e-6)


def test_input_perturbations_are_the_four_named_and_seeded() -> None:
    x = _network_input()
    first = {k: fn(x) for k, fn in graph.input_perturbations(MEAN, STD, seed=3).items()}
    again = {k: fn(x) for k, fn in graph.input_perturbations(MEAN, STD, seed=3).items()}
    assert list(first) == ["noise 1e-6", "noise 1e-4", "fp16 input", "uint8 window input"]
    assert list(first) == list(graph.PERTURBATIONS)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    # the two noise levels draw from different streams (not one stream scaled)
    d6, d4 = first["noise 1e-6"] - x, first["noise 1e-4"] - x
    assert np.abs(d6).max() < 1e-5 < np.abs(d4).max()
    assert abs(np.corrcoef(d6.ravel(), d4.ravel())[0, 1]) < 0.2


class _FakeSession:
    """ONNX Runtime stand-in: P = sigmoid(gain · (patient mean of the input - offset)), counting calls."""

    def __init__(self, gain: float, offset: float = 0.0) -> None:
        self.gain, self.offset = gain, offset
        self.calls = 0

    def prob(self, x: np.ndarray) -> np.ndarray:
        m = x.astype(np.float64).mean(axis=(1, 2, 3, 4))
        return 1 / (1 + np.exp(-self.gain * (m - self.offset)))

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert outputs == ["probability"] and feeds["slices"].dtype == np.float32
        self.calls += 1
        return [self.prob(feeds["slices"])]


def _parts(x: np.ndarray, config: PreprocessConfig | None = CONFIG) -> common.ModelParts:
    n = len(x)
    ev = common.EvalSet(
        ids=np.array([f"p{i}" for i in range(n)]),
        slices=x,
        labels=np.arange(n) % 2,
        cohorts=np.array(["training", "validation"])[np.arange(n) // (n // 2)],
        reference=np.zeros(n),
    )
    return common.ModelParts(
        source="test",
        extractor=None,
        indices=np.arange(2),
        pipeline=None,
        linear=None,
        n_slices=x.shape[1],
        image_size=x.shape[-1],
        calibration=x,
        eval_set=ev,
        preprocess=config,
    )


def test_input_sensitivity_on_a_fake_session() -> None:
    x = _network_input((8, 2, 3, 16, 16))
    sess = _FakeSession(gain=500.0, offset=float(x.mean()))
    sens = graph.input_sensitivity(_parts(x), sess, seed=1)
    assert sess.calls == 5 * 2  # unperturbed + 4 perturbations, 8 patients in batches of 4
    assert list(sens["perturbations"]) == list(graph.PERTURBATIONS)
    assert sens["n_patients"] == 8 and sens["seed"] == 1
    assert sens["preprocessing"]["mean"] == list(MEAN)
    assert sens["preprocessing"]["window_mg_ml"] == [-0.5, 6.0]
    assert sens["preprocessing"]["uint8_step_mg_ml"] == pytest.approx(6.5 / 255, abs=1e-6)
    ref = sess.prob(x)
    for name, fn in graph.input_perturbations(MEAN, STD, seed=1).items():
        probs = np.concatenate([sess.prob(fn(x[:4])), sess.prob(fn(x[4:]))])  # same batches, same draws
        v = sens["perturbations"][name]
        assert v["max_abs_dprob"] == pytest.approx(np.abs(probs - ref).max(), rel=1e-6)
        assert set(v["cohorts"]) == {"training", "validation"}
        assert all(c["n"] == 4 and c["abs_dauc"] is not None for c in v["cohorts"].values())
    p = sens["perturbations"]
    assert 0 < p["noise 1e-6"]["max_abs_dprob"] < p["noise 1e-4"]["max_abs_dprob"]
    assert p["uint8 window input"]["max_abs_dprob"] > 0
    again = graph.input_sensitivity(_parts(x), _FakeSession(gain=500.0, offset=float(x.mean())), seed=1)
    assert again == sens  # fixed seed


def test_input_sensitivity_takes_mean_and_std_from_the_run_config() -> None:
    """Inputs exactly on the uint8 lattice of THIS config's window: the uint8 transfer changes nothing.
    With ImageNet mean/std (not this config's) it would."""
    config = PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), window_mg_ml=(0.0, 5.1))
    levels = np.random.default_rng(2).integers(0, 256, (8, 1, 1, 8, 8)) / 255
    x = graph.from_window(np.repeat(np.repeat(levels, 3, axis=2), 2, axis=1), config.mean, config.std)
    sens = graph.input_sensitivity(_parts(x, config), _FakeSession(gain=50.0))
    assert sens["perturbations"]["uint8 window input"]["max_abs_dprob"] < 1e-6
    assert sens["preprocessing"]["uint8_step_mg_ml"] == pytest.approx(0.02)
    assert sens["preprocessing"]["std"] == [0.25, 0.25, 0.25]


def test_input_sensitivity_skips_with_a_reason() -> None:
    x = _network_input((4, 1, 3, 8, 8))
    no_run = _parts(x)
    no_run.eval_set = None
    assert "no run patients" in graph.input_sensitivity(no_run, _FakeSession(1.0))["skipped"]
    assert "fp32" in graph.input_sensitivity(_parts(x), None)["skipped"]
    assert "preprocessing" in graph.input_sensitivity(_parts(x, None), _FakeSession(1.0))["skipped"]


def _sensitivity_block() -> dict[str, Any]:
    x = _network_input((8, 2, 3, 16, 16))
    return graph.input_sensitivity(_parts(x), _FakeSession(gain=500.0, offset=float(x.mean())))


def test_render_input_sensitivity_table() -> None:
    sens = _sensitivity_block()
    sens["perturbations"]["noise 1e-6"]["max_abs_dprob"] = 1e-5  # within the gate
    sens["perturbations"]["uint8 window input"]["max_abs_dprob"] = 0.2  # beyond it
    lines = run_all._render_input_sensitivity(sens)
    text = "\n".join(lines)
    assert text.startswith("Input precision sensitivity of the ONNX Runtime fp32 graph on the same 8 run")
    assert "window [-0.5, 6.0] mg/mL, uint8 step 0.0255 mg/mL" in text
    header = next(i for i, line in enumerate(lines) if line.startswith("| input perturbation"))
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[header + 2 : header + 6]}
    assert list(rows) == list(graph.PERTURBATIONS)
    assert rows["noise 1e-6"].endswith("| no |") and "1.00e-05" in rows["noise 1e-6"]
    assert rows["uint8 window input"].endswith("| yes |") and "| 0.200 |" in rows["uint8 window input"]
    assert "training " in rows["fp16 input"] and "validation " in rows["fp16 input"]


def test_render_input_sensitivity_skipped_and_absent() -> None:
    assert run_all._render_input_sensitivity({}) == []
    lines = run_all._render_input_sensitivity({"skipped": "no run patients (random weights)"})
    assert lines[0] == "Input precision sensitivity: not measured (no run patients (random weights))."
