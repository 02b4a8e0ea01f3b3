"""A Triton that fails to load its models stops the launcher with its log."""

from __future__ import annotations

import pytest
from helpers.processes import processes_mentioning

from flowserve.server.triton.launcher import (
    TritonLaunchError,
    TritonServer,
)


def test_triton_loading_none_of_its_models_stops_the_launcher_with_each_reason(tmp_path):
    repo = tmp_path / "repo"
    for name in ("broken", "also-broken"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text('backend: "no_such_backend"\nmax_batch_size: 1\n')
    server = TritonServer(repo, tmp_path / "work")
    with pytest.raises(TritonLaunchError, match="Triton loaded none of the 2 model") as info:
        server.start(ready_timeout=60)
    for name in ("broken", "also-broken"):
        assert f"  {name}: " in str(info.value) and "no_such_backend" in str(info.value)
    assert str(server.log_path) in str(info.value)
    assert processes_mentioning(str(repo)) == []
