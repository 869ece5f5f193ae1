"""The local horde's CivitAI stand-in over real HTTP: search, models, model-versions, downloads with sha256
and Range, and the faults it plays on demand (451, 401, login redirect, cut transfers, 5xx)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import requests

from local_horde import LocalHorde

DATA = bytes(range(256)) * 40


@pytest.fixture()
def horde() -> Iterator[LocalHorde]:
    with LocalHorde(known_models=["tiny-sd1"]) as local:
        for model_id, version_id, name, kind, nsfw in (
            (11, 21, "Glow Lines", "LORA", False),
            (12, 22, "Ink", "LORA", True),
            (13, 23, "badhand", "TextualInversion", False),
        ):
            local.civitai.add_model(
                model_id=model_id,
                version_id=version_id,
                name=name,
                kind=kind,
                base_model="SD 1.5",
                data=DATA + name.encode(),
                file_name=f"{name}.safetensors",
                trained_words=[name.lower()],
                nsfw=nsfw,
            )
        yield local


def get(horde: LocalHorde, path: str, **kw) -> requests.Response:
    return requests.get(horde.civitai_url + path, timeout=5, allow_redirects=False, **kw)


def test_search_filters_by_type_query_and_nsfw(horde: LocalHorde) -> None:
    items = get(horde, "/api/v1/models?types=LORA&sort=Highest%20Rated").json()["items"]
    assert [i["name"] for i in items] == ["Glow Lines", "Ink"]
    assert [i["name"] for i in get(horde, "/api/v1/models?types=LORA&nsfw=false").json()["items"]] == [
        "Glow Lines"
    ]
    assert [
        i["id"] for i in get(horde, "/api/v1/models?types=TextualInversion&query=BAD").json()["items"]
    ] == [13]


def test_model_and_version_carry_what_workers_read(horde: LocalHorde) -> None:
    model = get(horde, "/api/v1/models/11").json()
    (version,) = model["modelVersions"]
    (file,) = version["files"]
    assert (model["type"], model["nsfw"], version["id"], version["baseModel"]) == (
        "LORA",
        False,
        21,
        "SD 1.5",
    )
    assert (
        version["trainedWords"] == ["glow lines"]
        and file["primary"]
        and file["name"].endswith(".safetensors")
    )
    assert file["hashes"]["SHA256"].lower() == hashlib.sha256(DATA + b"Glow Lines").hexdigest()
    assert file["sizeKB"] * 1024 == len(DATA) + len(b"Glow Lines")
    by_version = get(horde, "/api/v1/model-versions/21").json()
    assert by_version["modelId"] == 11 and by_version["model"] == {
        "name": "Glow Lines",
        "type": "LORA",
        "nsfw": False,
    }
    assert get(horde, "/api/v1/models/99").status_code == 404
    assert get(horde, "/api/v1/model-versions/99").status_code == 404


def test_download_whole_and_resumed(horde: LocalHorde) -> None:
    url = get(horde, "/api/v1/models/11").json()["modelVersions"][0]["files"][0]["downloadUrl"]
    whole = requests.get(url, timeout=5)
    assert whole.status_code == 200 and whole.content == DATA + b"Glow Lines"
    part = requests.get(url, headers={"Range": "bytes=100-"}, timeout=5)
    assert part.status_code == 206 and part.content == whole.content[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{len(whole.content) - 1}/{len(whole.content)}"


def test_faults_on_demand(horde: LocalHorde) -> None:
    civitai = horde.civitai
    civitai.set_download_fault(21, "451", times=1)
    assert get(horde, "/api/download/models/21").status_code == 451
    assert get(horde, "/api/download/models/21").status_code == 200  # once only
    civitai.set_download_fault(21, "login")
    redirect = get(horde, "/api/download/models/21")
    assert redirect.status_code == 307 and "reason=download-auth" in redirect.headers["Location"]
    civitai.set_download_fault(22, "corrupt")
    assert get(horde, "/api/download/models/22").content != DATA + b"Ink"
    civitai.require_token = "t0k"
    assert get(horde, "/api/download/models/23").status_code == 307
    assert get(horde, "/api/download/models/23?token=t0k").status_code == 200
    civitai.set_metadata_fault("/api/v1/models/13", 500, times=2)
    assert [get(horde, "/api/v1/models/13").status_code for _ in range(3)] == [500, 500, 200]
    assert civitai.calls("/api/v1/models/13") == 3


def test_a_cut_transfer_announces_more_than_it_sends(horde: LocalHorde) -> None:
    horde.civitai.cut_download_once(23, after_bytes=50)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(horde.civitai_url + "/api/download/models/23", timeout=5).content  # noqa: B018
    assert (
        len(requests.get(horde.civitai_url + "/api/download/models/23", timeout=5).content) == len(DATA) + 7
    )
