"""The images copy only what .dockerignore admits, and the Triton image puts the runner
where Triton looks for it."""

from __future__ import annotations

from pathlib import Path

from helpers.deploy import DEPLOY

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


def copied_sources(dockerfile: Path) -> list[str]:
    """Sources of the COPY instructions that read the build context."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_images_copy_only_what_the_dockerignore_admits():
    admitted = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")]
    for dockerfile in DOCKERFILES:
        for source in copied_sources(dockerfile):
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert any(source == a or source.startswith(a + "/") for a in admitted), source


def test_triton_image_installs_the_runner_where_triton_looks_for_it():
    from flowserve.contract.spec import RUNNER_BACKEND

    text = (DEPLOY / "docker" / "triton.Dockerfile").read_text()
    assert f"COPY server/triton/runner/model.py /opt/tritonserver/backends/{RUNNER_BACKEND}/model.py" in text
