import pytest
from huggingface_hub import constants

from hub_repos import build_cache, serve_doc_urls


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
    """http(s) image URLs answer with doc_image() for both libraries, as the network would."""
    return serve_doc_urls(monkeypatch.setattr)
