"""A Triton that fails to load its models stops the launcher with its log."""

from __future__ import annotations

import pytest
from helpers.processes import processes_mentioning

from flowserve.server.triton.launcher import (
    TritonLaunchError,
    TritonServer,
)


def test_triton_failing_to_load_reports_its_log(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('backend: "no_such_backend"\nmax_batch_size: 1\n')
    server = TritonServer(repo, tmp_path / "work")
    with pytest.raises(TritonLaunchError, match="failed to load model 'broken'") as info:
        server.start(ready_timeout=60)
    assert "tritonserver exited" in str(info.value)
    assert server.log_path.exists()
    assert processes_mentioning(str(repo)) == []
