"""FlowMetadata, the one owner of ``<flow>.flowserve.json``: defaults, validation, the
file's JSON, atomic writes, and reading a whole repository."""

from __future__ import annotations

import json
import logging

import pytest

from flowserve.contract.metadata import SCHEMA_VERSION, FlowMetadata, metadata_path, read_all
from flowserve.contract.spec import DENSITY, GENERATION

MODELS = {DENSITY: "f-density", GENERATION: "f-generation"}


def test_defaults_follow_the_event_shape():
    meta = FlowMetadata(name="f", family="realnvp", event_shape=[1, 2, 3], models=MODELS)
    assert meta.event_shape == (1, 2, 3) and meta.dim == 6
    assert meta.noise_dim == 6 and meta.context_shape == () and meta.context_dim == 0
    assert (meta.log_likelihood, meta.support) == ("exact", None)
    assert (meta.version, meta.format, meta.backend, meta.extra) == (None, None, None, {})  # the file does not say
    assert [(t.name, t.dims) for t in meta.spec(DENSITY).inputs] == [("x", (6,))]
    assert [(t.name, t.dims) for t in meta.spec(GENERATION).inputs] == [("z", (6,))]


def test_noise_and_context_shape_the_directions():
    meta = FlowMetadata(name="f", family="vae", event_shape=(4,), models=MODELS, noise_dim=9,
                        context_shape=(2, 5), log_likelihood="lower_bound", support=[0, 16])
    assert meta.context_dim == 10 and meta.support == (0.0, 16.0)
    assert [(t.name, t.dims) for t in meta.spec(GENERATION).inputs] == [("z", (9,)), ("context", (10,))]
    assert [(t.name, t.dims) for t in meta.spec(GENERATION).outputs] == [("x", (4,)), ("log_prob", ())]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "Not A Name", "invalid flow name"),
    ("family", "", "family must be"),
    ("event_shape", [], "event_shape is empty"),
    ("event_shape", [2, 0], "event_shape must be a list of positive integers"),
    ("context_shape", 3, "context_shape must be a list"),
    ("noise_dim", 0, "noise_dim must be a positive integer"),
    ("noise_dim", 2.0, "noise_dim must be a positive integer"),
    ("log_likelihood", "approximate", "log_likelihood must be one of"),
    ("models", {DENSITY: "d"}, "models must map"),
    ("support", [1, 0], "support must be [low, high]"),
    ("support", [0, True], "support must be [low, high]"),
    ("support_box", {"low": [0, 0]}, "support_box must be {'low': [...], 'high': [...]}"),
    ("support_box", {"low": [0], "high": [1, 1]}, "low is [0]"),
    ("support_box", {"low": [0, float("nan")], "high": [1, 1]}, "low is [0, nan]"),
    ("support_box", {"low": [0, 2], "high": [1, 1]}, "low is not below high everywhere"),
    ("support_box", {"low": [None, None], "high": [None, None]}, "every side is open"),
    ("version", 0, "version must be an integer >= 1"),
])
def test_a_field_that_breaks_the_schema_is_refused_by_name(field, value, message):
    fields = {"name": "f", "family": "maf", "event_shape": [2], "models": MODELS, field: value}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FlowMetadata(**fields)


def test_a_support_box_has_a_bound_or_null_per_value_and_round_trips(tmp_path):
    box = {"low": [-1, None], "high": [1.5, 0]}
    meta = FlowMetadata(name="f", family="sbi", event_shape=[2], models=MODELS, support_box=box)
    assert meta.support_box == {"low": [-1.0, None], "high": [1.5, 0.0]}
    assert FlowMetadata.read(meta.write(tmp_path)) == meta
    assert json.loads(meta.listing()["support_box.low"]) == [-1.0, None]


def test_the_file_round_trips_and_leaves_out_unset_fields(tmp_path):
    meta = FlowMetadata(name="f", family="maf", event_shape=(2,), models=MODELS, dataset="moons",
                        metrics={"test_log_likelihood": -1.25}, parity_max_diff={"density_log_prob": 3e-6})
    path = meta.write(tmp_path)
    assert path == metadata_path(tmp_path, "f") == tmp_path / "f.flowserve.json"
    document = json.loads(path.read_text())
    assert document["schema"] == SCHEMA_VERSION and document["event_shape"] == [2]
    assert document["noise_dim"] == 2 and document["context_shape"] == []
    assert "support" not in document and "exported_at" not in document
    assert FlowMetadata.read(path) == meta
    assert [p.name for p in tmp_path.iterdir()] == ["f.flowserve.json"]  # no staging file left


def test_rewriting_replaces_the_file(tmp_path):
    FlowMetadata(name="f", family="maf", event_shape=(2,), models=MODELS).write(tmp_path)
    FlowMetadata(name="f", family="maf", event_shape=(3,), models=MODELS, version=2).write(tmp_path)
    assert read_all(tmp_path)["f"].event_shape == (3,) and read_all(tmp_path)["f"].version == 2


@pytest.mark.parametrize(("document", "message"), [
    ([1, 2], "does not hold a JSON object"),
    ({"schema": 0, "name": "f"}, "unsupported metadata schema 0"),
    ({"schema": SCHEMA_VERSION, "name": "f", "family": "maf"}, r"missing keys \['event_shape', 'models'\]"),
    ({"schema": SCHEMA_VERSION, "name": 7, "family": "maf", "event_shape": [2], "models": MODELS}, "expected"),
])
def test_from_dict_refuses_documents_that_break_the_schema(document, message):
    with pytest.raises(ValueError, match=message):
        FlowMetadata.from_dict(document)


def test_keys_it_does_not_know_are_kept_listed_and_written_back():
    document = {"schema": SCHEMA_VERSION, "name": "f", "family": "maf", "event_shape": [2], "models": MODELS,
                "added_later": {"by": "hand"}}
    meta = FlowMetadata.from_dict(document)
    assert meta.extra == {"added_later": {"by": "hand"}}
    assert meta.listing()["added_later.by"] == "hand"
    assert FlowMetadata.from_dict(meta.to_dict()) == meta and meta.to_dict()["added_later"] == {"by": "hand"}


def test_read_all_skips_bad_files_and_names_them(tmp_path, caplog):
    FlowMetadata(name="good", family="maf", event_shape=(2,), models=MODELS).write(tmp_path)
    (tmp_path / "torn.flowserve.json").write_text("{ half")
    (tmp_path / "other.json").write_text("{}")  # not a metadata file
    with caplog.at_level(logging.WARNING):
        flows = read_all(tmp_path)
    assert list(flows) == ["good"]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["not serving flow 'torn'"]


def test_listing_flattens_everything_but_name_and_models():
    meta = FlowMetadata(name="f", family="maf", event_shape=(2,), models=MODELS, dataset="moons",
                        metrics={"test_log_likelihood": -1.5}, checksums={DENSITY: "sha256:ab"})
    listing = meta.listing()
    assert listing["metrics.test_log_likelihood"] == "-1.5" and listing["checksums.density"] == "sha256:ab"
    assert listing["dataset"] == "moons" and listing["event_shape"] == "[2]" and listing["schema"] == "1"
    assert "name" not in listing and not any(key.startswith("models") for key in listing)
