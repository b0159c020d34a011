import pytest
from huggingface_hub import constants

from hub_repos import build_cache, doc_image


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A HF cache with the documented repo ids (tiny models): built once for the whole folder."""
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    build_cache(cache)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """Both libraries read the Hub cache above and never the network, as with HF_HUB_OFFLINE=1."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture
def doc_urls(monkeypatch):
    """http(s) image URLs answer with doc_image() for both libraries (diffusers reads them with requests,
    minidiff with urllib), as the network would with the real picture."""
    import io
    import urllib.request

    import requests
    buf = io.BytesIO()
    doc_image().save(buf, format="PNG")
    data = buf.getvalue()

    class Response(io.BytesIO):
        status_code = 200
        content = data

        def __init__(self):
            super().__init__(data)
            self.raw = io.BytesIO(data)

        def raise_for_status(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(requests, "get", lambda url, *a, **k: Response())
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: Response())
    return data
