"""The botocore session of the S3 backend, with a data loader that reads less.

botocore's own loader, for one S3 client, (1) parsed ``endpoints.json``, the endpoint table
of every AWS service (1.2 MB), into OrderedDicts: 45 ms and 6.7 MiB, kept alive by the
client's event handlers, though an S3 client looks up only S3's entries; (2) listed every
service's directory (about 450, two ``stat`` calls each, twice: 50 ms) only to check that
``s3`` is one of them; (3) parsed every model into OrderedDicts, a third more memory and
time than dicts, which keep their order too. This loader, installed through botocore's public
component registry (``Session.register_component('data_loader', ...)``), parses models
into dicts, checks only the service asked for, and keeps S3's part of the endpoint table:
another service's entries (the credential chain's STS or SSO clients) are read again from
the file when first asked for. The table still comes from botocore's own file, so AWS
regions resolve as botocore resolves them (``uses_builtin_data`` unchanged); an endpoints
file of the user's own (``AWS_DATA_PATH``) is used whole. tests/unit/test_s3session.py
compares the endpoints, signing regions and addressing with a stock session's, so a
botocore upgrade that changes what this relies on fails there.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, overload

import botocore.exceptions
import botocore.loaders
import botocore.session

KEPT = ("s3",)  # the services whose endpoint entries are kept parsed
_OPENERS: tuple[tuple[str, Callable[[str, str], Any]], ...] = ((".json", open), (".json.gz", gzip.open))


def new_session() -> botocore.session.Session:
    session = botocore.session.Session()
    # create_loader splits AWS_DATA_PATH as botocore does; its paths include the defaults.
    paths = list(botocore.loaders.create_loader(session.get_config_variable("data_path")).search_paths)
    session.register_component("data_loader", Loader(extra_search_paths=paths, include_default_search_paths=False))
    return session


class JSONFiles(botocore.loaders.JSONFileLoader):  # type: ignore[misc]
    def load_file(self, file_path: str) -> Any:
        for ext, opener in _OPENERS:
            try:
                with opener(file_path + ext, "rb") as f:
                    return json.loads(f.read())
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
        return super().load_file(file_path)  # a format botocore reads and this does not


class Loader(botocore.loaders.Loader):  # type: ignore[misc]
    FILE_LOADER_CLASS = JSONFiles
    endpoints_trimmed = False  # for the tests: the table was cut to KEPT

    def list_available_services(self, type_name: str) -> Sequence[str]:
        return ServiceNames(self, type_name)

    def load_data_with_path(self, name: str) -> tuple[Any, str]:
        data, path = super().load_data_with_path(name)  # cached by botocore: trimmed in place
        if name == "endpoints" and self.is_builtin_path(path) and not self.endpoints_trimmed:
            for partition in data.get("partitions", []):
                services = partition.get("services")
                if isinstance(services, dict):
                    partition["services"] = Services(
                        {k: services[k] for k in KEPT if k in services},
                        partial(_partition_services, self, path, partition.get("partition")))
            self.endpoints_trimmed = True
        return data, path


def _partition_services(loader: Loader, path: str, partition: str | None) -> dict[str, Any]:
    data = loader.file_loader.load_file(path)
    return next(p["services"] for p in data["partitions"] if p.get("partition") == partition)


class ServiceNames(Sequence[str]):
    """``list_available_services``' answer: membership checks one service's directory; the
    whole list (an error message's) is made only when listed."""

    def __init__(self, loader: Loader, type_name: str) -> None:
        self._loader, self._type = loader, type_name

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            return False
        try:
            return bool(self._loader.list_api_versions(name, self._type))
        except botocore.exceptions.DataNotFoundError:
            return False

    def _all(self) -> list[str]:
        return list(botocore.loaders.Loader.list_available_services(self._loader, self._type))

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())


class Services(Mapping[str, Any]):
    """One partition's ``services``: the kept entries at hand, the others loaded on first use."""

    def __init__(self, kept: dict[str, Any], load: Callable[[], dict[str, Any]]) -> None:
        self._kept, self._load = kept, load
        self._every: dict[str, Any] | None = None

    @property
    def loaded_all(self) -> bool:
        return self._every is not None

    def _all(self) -> dict[str, Any]:
        if self._every is None:
            self._every = self._load()
        return self._every

    def __getitem__(self, name: str) -> Any:
        return self._kept[name] if name in self._kept else self._all()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kept or name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())
