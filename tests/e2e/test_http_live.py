"""The README's ``curl`` examples, run as printed against the live ``flowserve serve`` (real
Triton), and their numbers against the same calls over gRPC."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import requests
from helpers.flows import LARGE_CHUNKS
from helpers.processes import hermetic_env

from flowserve.server.client import FlowClient

README = Path(__file__).resolve().parents[2] / "README.md"
PRINTED_ADDRESS, PRINTED_FLOW = "localhost:8501", "realnvp-moons"


def readme_commands() -> list[str]:
    """The commands of the README's block of HTTP examples, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    (block,) = [block for block in blocks if f"{PRINTED_ADDRESS}/v1/models" in block]
    return [command.strip() for command in block.replace("\\\n", " ").splitlines() if command.strip()]


def test_the_readmes_curl_examples_work_and_agree_with_grpc(live_server, tmp_path):
    commands = readme_commands()
    assert len(commands) == 7
    address = live_server.http_url.removeprefix("http://")
    env = hermetic_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    outputs = []
    for command in commands:  # the live server's address and flow stand in for the printed ones
        done = subprocess.run(command.replace(PRINTED_ADDRESS, address).replace(PRINTED_FLOW, LARGE_CHUNKS),
                              shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    listed, sampled, scored, stream_lines, _, _, printed = outputs
    assert LARGE_CHUNKS in [model["name"] for model in json.loads(listed)["models"]]
    x = np.array([[0.5, 0.25], [1.0, -0.5]], np.float32)
    with FlowClient(live_server.target, timeout=30) as client:
        samples = client.sample(LARGE_CHUNKS, 3, seed=7)
        log_prob = client.log_likelihood(LARGE_CHUNKS, x)
    sampled = json.loads(sampled)
    assert sampled["seed"] == 7
    np.testing.assert_array_equal(np.float32(sampled["samples"]), samples.x)  # the same bits as over gRPC
    np.testing.assert_array_equal(np.float32(sampled["log_prob"]), samples.log_prob)
    np.testing.assert_array_equal(np.float32(json.loads(scored)["log_prob"]), log_prob)
    assert stream_lines.strip() == "5"  # 5000 rows in chunks of the model's max_batch_size, 1024
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy")["log_prob"], log_prob)
    assert printed.strip() == str(log_prob)


def test_a_stream_over_http_gives_the_rows_of_grpcs_stream(live_server):
    answer = requests.post(f"{live_server.http_url}/v1/models/{LARGE_CHUNKS}/sample-stream", timeout=60,
                           json={"num_samples": 2500, "seed": 3, "return_log_prob": True})
    lines = [json.loads(line) for line in answer.text.splitlines()]
    with FlowClient(live_server.target, timeout=30) as client:
        chunks = list(client.sample_stream(LARGE_CHUNKS, 2500, seed=3))
    assert [line["first_row"] for line in lines] == [chunk.first_row for chunk in chunks] == [0, 1024, 2048]
    for line, chunk in zip(lines, chunks):
        np.testing.assert_array_equal(np.float32(line["samples"]), chunk.x)
        np.testing.assert_array_equal(np.float32(line["log_prob"]), chunk.log_prob)
