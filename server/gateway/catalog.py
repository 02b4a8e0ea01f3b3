"""The flows a gateway serves: the metadata files of its model repository."""

from __future__ import annotations

import time
from pathlib import Path

from flowserve.contract.metadata import SUFFIX, FlowMetadata, read_all
from flowserve.server.protocol.errors import InvalidArgument, ModelNotFound, quoted


class ModelCatalog:
    """Flows described by the metadata files of a model repository.

    Unknown names trigger a re-read, at most once per ``min_reload_interval_s``, so a
    newly exported flow is found without a restart and a flood of bad names costs no
    disk reads.
    """

    def __init__(self, repository: Path, min_reload_interval_s: float = 1.0):
        self.repository = Path(repository)
        self.min_reload_interval_s = min_reload_interval_s
        self._flows: dict[str, FlowMetadata] = {}
        self.version = 0  # bumped whenever a reload finds different flows
        self.reload()

    def reload(self) -> None:
        """Re-read the repository's metadata files; bad ones are skipped with a warning."""
        self._loaded_at = time.monotonic()
        self._files = self._file_stamps()
        flows = read_all(self.repository)
        if flows != self._flows:
            self.version += 1
        self._flows = flows

    def refresh(self) -> None:
        """Re-read the repository if a metadata file appeared, changed or went since the last read."""
        if self._file_stamps() != self._files:
            self.reload()

    def _file_stamps(self) -> dict[str, tuple[int, int]]:
        stamps = {}
        for path in self.repository.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile
                continue
            stamps[path.name] = (stat.st_mtime_ns, stat.st_size)
        return stamps

    def names(self) -> list[str]:
        return sorted(self._flows)

    def get(self, name: str) -> FlowMetadata:
        """The flow called ``name``; raises InvalidArgument if empty, ModelNotFound if unknown."""
        if not name:
            raise InvalidArgument("model must name a flow; ListModels lists them")
        if name not in self._flows and time.monotonic() - self._loaded_at >= self.min_reload_interval_s:
            self.reload()
        try:
            return self._flows[name]
        except KeyError:
            raise ModelNotFound(f"model {quoted(name)} is not served; served models: {self.names()}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._flows
