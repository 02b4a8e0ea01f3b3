"""The page at / of the HTTP API, opened in a real headless Chromium (Debian's ``chromium``):
it lists the flows and draws, through the HTTP API, samples over the density of a 2-D flow
and a grid of images of an image flow."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from helpers.fakes import UNCONDITIONAL, InMemoryBackend, fake_answer, serve_and_call, write_metadata

from flowserve.server.gateway.app import GatewayConfig

PLANE = "moons"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(url: str) -> str:
    """The DOM of ``url`` once its scripts and their fetches are done (10 s of virtual time)."""
    assert CHROMIUM, "the tests need Debian's chromium: scripts/setup.sh --test installs it"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def config(tmp_path) -> GatewayConfig:
    write_metadata(tmp_path, PLANE, family="realnvp", event_shape=(2,), noise_dim=2)
    write_metadata(tmp_path, UNCONDITIONAL, family="glow", noise_dim=4)  # 1x2x2 images
    return GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=None, http_port=0)


def test_the_page_lists_the_flows_and_draws_samples_density_and_images(config):
    def calls(target: str, http: str) -> list[str]:
        return [rendered(f"{http}/"), rendered(f"{http}/?flow={UNCONDITIONAL}")]

    (plane, images), registry = serve_and_call(config, calls, InMemoryBackend(fake_answer, max_batch_size=512))
    assert re.findall(r'<tr class="flow[^"]*" data-flow="([^"]+)"', plane) == sorted([PLANE, UNCONDITIONAL])
    assert 'class="flow chosen" data-flow="moons"' in plane  # a 2-D flow is drawn first
    assert plane.count('class="sample"') == 500
    assert plane.count('class="density-cell"') == 48 * 48
    assert "moons: 500 samples, over log p on a 48x48 grid" in plane
    assert images.count('class="image"') == 36 and f"{UNCONDITIONAL}: 36 samples" in images
    count = registry.get_sample_value
    http = {"code": "OK", "protocol": "http"}
    assert count("flowserve_requests_total", {"method": "Sample", "model": PLANE, **http}) == 1
    assert count("flowserve_requests_total", {"method": "LogLikelihood", "model": PLANE, **http}) == 1
