"""The S3 backend's botocore session (backends/s3session.py) against a stock one: the same
endpoints, signing regions, partitions and addressing for every region botocore knows for
S3 (and one it does not), for a custom endpoint, for another service of the credential
chain (STS, whose entries are loaded when first asked for) and for an endpoints file of the
user's own. Requests are compared as presigned URLs: botocore resolves and signs them
exactly as it does a request, without sending one. If a botocore upgrade changes what the
loader relies on, these fail."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.config
import botocore.exceptions
import botocore.session
import pytest

from deltavault.backends import s3session

STOCK_DATA = Path(botocore.__file__).parent / "data"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("AWS_DATA_PATH", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_USE_FIPS_ENDPOINT",
                "AWS_USE_DUALSTACK_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    yield


def _sessions() -> tuple[botocore.session.Session, botocore.session.Session]:
    stock, ours = botocore.session.Session(), s3session.new_session()
    for s in (stock, ours):
        s.set_credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    return stock, ours


def _view(session: botocore.session.Session, service: str, region: str, endpoint: str | None = None,
          addressing: str | None = None, **settings: Any) -> dict[str, Any]:
    """What a request of this client goes to and is signed for (the signature itself and
    its time aside)."""
    s3 = {"addressing_style": addressing} if addressing else {}
    if settings.pop("dualstack", False):
        s3["use_dualstack_endpoint"] = True
    cfg = botocore.config.Config(region_name=region, signature_version="s3v4" if service == "s3" else None,
                                 s3=s3 or None, **settings)
    c = session.create_client(service, endpoint_url=endpoint, config=cfg)
    if service == "s3":
        url = c.generate_presigned_url("get_object", Params={"Bucket": "dv-bucket", "Key": "repo/config"})
    else:
        url = c.generate_presigned_url("get_caller_identity")
    u = urlsplit(url)
    q = parse_qs(u.query)
    return {"where": (u.scheme, u.netloc, u.path), "scope": q["X-Amz-Credential"][0].split("/", 2)[2],
            "signed": q["X-Amz-SignedHeaders"], "region": c.meta.region_name,
            "partition": c.meta.partition, "endpoint": c.meta.endpoint_url}


def _s3_regions() -> list[str]:
    stock = botocore.session.Session()
    return sorted({r for p in stock.get_available_partitions() for r in stock.get_available_regions("s3", p)})


def test_every_s3_region_resolves_as_with_a_stock_session() -> None:
    stock, ours = _sessions()
    regions = _s3_regions()
    assert len(regions) > 20 and "us-east-1" in regions and "cn-north-1" in regions
    for region in [*regions, "xx-future-1"]:
        assert _view(ours, "s3", region) == _view(stock, "s3", region), region
    for region in ("us-east-1", "eu-west-1", "us-gov-west-1", "cn-north-1"):
        for addressing in ("virtual", "path"):
            assert _view(ours, "s3", region, addressing=addressing) == \
                _view(stock, "s3", region, addressing=addressing), (region, addressing)
    loader = ours.get_component("data_loader")
    assert isinstance(loader, s3session.Loader) and loader.endpoints_trimmed
    # Only S3's entries were read: no partition's whole table was loaded.
    endpoints, _ = loader.load_data_with_path("endpoints")
    tables = [p["services"] for p in endpoints["partitions"]]
    assert tables and all(isinstance(t, s3session.Services) and not t.loaded_all for t in tables)


def test_virtual_host_addressing_fips_and_dual_stack_on_aws() -> None:
    stock, ours = _sessions()
    view = _view(ours, "s3", "eu-central-1", addressing="virtual")
    assert view["where"] == ("https", "dv-bucket.s3.eu-central-1.amazonaws.com", "/repo/config")
    assert view["scope"].startswith("eu-central-1/s3/")
    for region, settings in (("us-east-2", {"use_fips_endpoint": True}), ("eu-west-1", {"dualstack": True}),
                             ("us-gov-west-1", {"use_fips_endpoint": True, "dualstack": True})):
        assert _view(ours, "s3", region, **settings) == _view(stock, "s3", region, **settings), (region, settings)
    assert "fips" in _view(ours, "s3", "us-east-2", use_fips_endpoint=True)["where"][1]
    assert "dualstack" in _view(ours, "s3", "eu-west-1", dualstack=True)["where"][1]


def test_custom_endpoint_as_with_a_stock_session() -> None:
    stock, ours = _sessions()
    for addressing in ("path", "virtual", None):
        for region in ("us-east-1", "garage"):
            a = _view(ours, "s3", region, "http://127.0.0.1:8333", addressing)
            assert a == _view(stock, "s3", region, "http://127.0.0.1:8333", addressing)
    assert _view(ours, "s3", "us-east-1", "http://127.0.0.1:8333", "path")["where"] == \
        ("http", "127.0.0.1:8333", "/dv-bucket/repo/config")


def test_other_services_are_loaded_when_asked_for() -> None:
    stock, ours = _sessions()
    for region in ("us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"):
        assert _view(ours, "sts", region) == _view(stock, "sts", region), region
    assert list(ours.get_available_services()) == stock.get_available_services()
    assert ours.get_available_regions("ec2") == stock.get_available_regions("ec2")
    with pytest.raises(botocore.exceptions.UnknownServiceError):
        ours.create_client("no-such-service", region_name="us-east-1")
    names = ours.get_component("data_loader").list_available_services("service-2")
    assert "s3" in names and "sts" in names
    assert "no-such-service" not in names and "../data" not in names and "" not in names


def test_an_endpoints_file_of_the_user_is_used_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads((STOCK_DATA / "endpoints.json").read_text())
    aws = next(p for p in data["partitions"] if p["partition"] == "aws")
    aws["services"]["s3"]["endpoints"]["eu-west-1"] = {"hostname": "s3.example.internal"}
    user = tmp_path / "data"
    user.mkdir()
    (user / "endpoints.json").write_text(json.dumps(data))
    monkeypatch.setenv("AWS_DATA_PATH", str(user))
    stock, ours = _sessions()
    view = _view(ours, "s3", "eu-west-1", addressing="path")
    assert view == _view(stock, "s3", "eu-west-1", addressing="path")
    assert view["where"][1] == "s3.example.internal"
    assert not ours.get_component("data_loader").endpoints_trimmed


def test_models_load_as_botocore_loads_them(tmp_path: Path) -> None:
    """Plain dicts where botocore makes OrderedDicts: equal data, same order."""
    stock = botocore.session.Session().get_component("data_loader")
    ours = s3session.Loader()
    for name in ("s3/2006-03-01/service-2", "s3/2006-03-01/endpoint-rule-set-1", "partitions", "_retry"):
        a, b = stock.load_data(name), ours.load_data(name)
        assert json.dumps(a) == json.dumps(b), name  # order included
    assert stock.load_service_model("s3", "service-2") == ours.load_service_model("s3", "service-2")
    # A directory or a missing file where a model would be is not a model.
    (tmp_path / "thing.json").mkdir()
    assert s3session.JSONFiles().load_file(str(tmp_path / "thing")) is None
    assert s3session.JSONFiles().load_file(str(tmp_path / "missing")) is None
    shutil.copy(STOCK_DATA / "_retry.json", tmp_path / "r.json")
    assert s3session.JSONFiles().load_file(str(tmp_path / "r")) == stock.load_data("_retry")
    assert os.path.isdir(s3session.Loader.BUILTIN_DATA_PATH)
