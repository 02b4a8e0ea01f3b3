"""The parity measure of the exporter (absolute below one, relative above) and how the
runner divides the machine's cores among its instances."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.fakes import load_runner

from flowserve.export.exporter.parity import scaled_gap


def test_scaled_gap_is_absolute_below_one_and_relative_above():
    assert scaled_gap([0.5, -0.2], [0.5001, -0.2]) == pytest.approx(1e-4)
    assert scaled_gap([-250.025], [-250.0]) == pytest.approx(1e-4)  # 0.025 off at 250: relative
    assert scaled_gap([1.0, 3.0], [1.0, 2.0]) == pytest.approx(0.5)
    assert np.isnan(scaled_gap([np.nan], [1.0]))


def test_scaled_gap_forgives_four_times_float32s_own_spread():
    assert scaled_gap([0.53, 0.2], [0.5, 0.2], spread=[0.01, 0.0]) == 0.0  # 0.03 off where float32 strays 0.01
    assert scaled_gap([0.55, 0.2], [0.5, 0.2], spread=[0.01, 0.0]) == pytest.approx(0.01)
    assert scaled_gap([0.2, 0.2001], [0.2, 0.2], spread=[0.01, 0.0]) == pytest.approx(1e-4)  # spread is per point


@pytest.mark.parametrize("parameter, instances, expected", [
    ("0", [1], None), ("0", [2], "half"), ("", [1, 1], "half"), ("3", [2], 3),
])
def test_the_runner_divides_the_cores_among_the_instances_unless_told(monkeypatch, parameter, instances, expected):
    cores = 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    config = {"parameters": {"intra_op_num_threads": {"string_value": parameter}},
              "instance_group": [{"count": count} for count in instances]}
    threads = load_runner(monkeypatch)._threads(config)
    assert threads == {None: cores, "half": cores // 2}.get(expected, expected)
