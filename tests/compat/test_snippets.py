"""diffusers' documented snippets, run with `from diffusers` and with `from minidiff` (see harness.py)."""
import pytest

import minidiff
from harness import compare, run
from snippets import SNIPPETS


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s["name"] for s in SNIPPETS])
def test_snippet_runs_unchanged_and_draws_diffusers_image(snippet, offline_hub, doc_urls, tmp_path):
    waits = snippet.get("waits_on")
    if waits and not hasattr(minidiff, waits):
        pytest.xfail(f"waits on {waits} (the sched helper's schedulers)")
    code = snippet["code"] + snippet.get("then", "")
    if snippet.get("raises"):  # the documented code fails in diffusers 0.39 itself: minidiff refuses it too
        for lib in ("diffusers", "minidiff"):
            with pytest.raises(snippet["raises"]):
                run(code, lib, tmp_path / lib)
        return
    ref = run(code, "diffusers", tmp_path / "diffusers")
    ours = run(code, "minidiff", tmp_path / "minidiff")
    compare(ref, ours)
