"""The flow-match schedule against the release's numbers (port.md §4.4) and the bf16 update/guidance arithmetic."""

from __future__ import annotations

import pytest
import torch

from posegen_cli.pipelines.scheduling import (
    euler_step,
    guided_velocity,
    make_scheduler,
    model_timestep,
    set_release_timesteps,
)

SPEC_SIGMAS = [
    1.0,
    0.99173546,
    0.98290592,
    0.97345138,
    0.96330279,
    0.95238101,
    0.94059408,
    0.92783505,
    0.91397852,
    0.89887637,
    0.88235289,
    0.86419749,
    0.84415585,
    0.82191771,
    0.79710150,
    0.76923072,
    0.73770487,
    0.70175433,
    0.66037738,
    0.61224484,
    0.55555552,
    0.48780486,
    0.40540537,
    0.30303031,
    0.17241378,
]
SPEC_BF16_TIMESTEPS = [
    1000,
    992,
    984,
    972,
    964,
    952,
    940,
    928,
    912,
    900,
    884,
    864,
    844,
    820,
    796,
    768,
    736,
    700,
    660,
    612,
    556,
    488,
    406,
    304,
    172,
]


def release_sigmas(n: int, shift: float) -> torch.Tensor:
    """DiffSynth's formula, written from the spec: s = linspace(1, 0, n+1)[:-1] in float32, shift*s / (1 + (shift-1)*s)."""
    s = torch.linspace(1, 0, n + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def test_sigmas_match_the_release_table():
    scheduler = make_scheduler()
    set_release_timesteps(scheduler, 25)
    assert scheduler.sigmas.dtype == torch.float32
    assert len(scheduler.sigmas) == 26 and scheduler.sigmas[-1].item() == 0.0
    assert scheduler.sigmas[:-1].tolist() == pytest.approx(SPEC_SIGMAS, abs=5e-8)
    assert torch.equal(scheduler.sigmas[:-1], release_sigmas(25, 5.0))


def test_timesteps_fed_to_the_model_are_bf16_rounded():
    scheduler = make_scheduler()
    set_release_timesteps(scheduler, 25)
    assert torch.equal(scheduler.timesteps, release_sigmas(25, 5.0) * 1000)
    fed = [model_timestep(t, torch.bfloat16, "cpu") for t in scheduler.timesteps]
    assert all(t.shape == (1,) and t.dtype == torch.bfloat16 for t in fed)
    assert [t.item() for t in fed] == SPEC_BF16_TIMESTEPS
    assert scheduler.timesteps[1].item() == pytest.approx(991.7355, abs=1e-4)


def test_other_step_counts_follow_the_same_formula():
    scheduler = make_scheduler()
    set_release_timesteps(scheduler, 4)
    assert torch.equal(scheduler.sigmas, torch.cat([release_sigmas(4, 5.0), torch.zeros(1)]))
    with pytest.raises(ValueError, match="at least 1"):
        set_release_timesteps(scheduler, 0)


def test_default_diffusers_spacing_would_differ():
    """The reason for passing the unshifted sigmas: ``set_timesteps(25)`` gives another second sigma."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(25)
    assert abs(scheduler.sigmas[1].item() - SPEC_SIGMAS[1]) > 1e-4


def test_euler_step_stays_in_bf16_and_matches_the_release_arithmetic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 4, 4, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 16, 3, 4, 4, generator=g).to(torch.bfloat16)
    sigmas = release_sigmas(25, 5.0)
    out = euler_step(x, v, sigmas[3], sigmas[4])
    assert out.dtype == torch.bfloat16
    # The release: sample + model_output * (sigma_ - sigma) with 0-dim float32 sigmas (no promotion of bf16).
    expected = x + v * (sigmas[4] - sigmas[3])
    assert torch.equal(out, expected)
    # The last step goes to sigma 0.
    last = euler_step(x, v, sigmas[24], torch.tensor(0.0))
    assert torch.equal(last, x + v * (0 - sigmas[24]))
    # An fp32 update rounded afterwards differs on some elements: the dtype of the update matters.
    fp32 = (x.float() + v.float() * (sigmas[4] - sigmas[3]).item()).to(torch.bfloat16)
    assert not torch.equal(fp32, out)


def test_guidance_formula():
    pos = torch.tensor([1.0, 2.0, -1.0], dtype=torch.bfloat16)
    neg = torch.tensor([0.5, 2.0, 1.0], dtype=torch.bfloat16)
    out = guided_velocity(pos, neg, 5.0)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [3.0, 2.0, -9.0]
    assert torch.equal(guided_velocity(pos, neg, 1.0), pos)
