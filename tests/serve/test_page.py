"""GET / (the page), GET /history, and the page itself in a real browser against `microbert-serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from tests.serve.browser import Browser, find_chromium
from tests.serve.conftest import REPO, make_settings

ARTIFACTS = REPO / "test-artifacts"  # git-ignored: screenshots a person can look at after a run


def write_history(run_dir: Path) -> dict:
    """A run's training_history.json in the trainer's shape (a NaN grad norm included, as it writes)."""
    train = [
        {"step": s, "loss": 8.0 - s / 20, "lr": 1e-3, "grad_norm": float("nan") if s == 10 else 1.0}
        for s in range(10, 101, 10)
    ]
    evals = [
        {"step": s, "loss": 7.5 - s / 25, "accuracy": 0.02 + s / 1000, "baseline_accuracy": 0.055}
        for s in (50, 100)
    ]
    history = {"train": train, "eval": evals}
    (run_dir / "training_history.json").write_text(json.dumps(history))
    return history


def test_page_is_self_contained_html_and_js(client: TestClient):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="page.js">' in page.text and 'id="text"' in page.text
    script = client.get("/page.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    # nothing fetched from elsewhere: no CDN, no absolute URL in a src, href, fetch or import
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    assert not re.search(r"(fetch|import)\s*\(\s*[\"'`](https?:)?//", script.text)
    assert client.get("/metrics").text.count('route="/"') >= 1


def test_history_of_a_run_folder_and_its_exports(run_dir: Path):
    written = write_history(run_dir)
    for model_dir in (run_dir, run_dir / "export" / "step-7"):
        with TestClient(create_app(make_settings(model_dir))) as client:
            answer = client.get("/history")
            assert answer.status_code == 200, answer.text
            body = answer.json()  # strict JSON: the NaN grad norm became null
            assert body["train"][0]["grad_norm"] is None
            assert body["eval"] == written["eval"]


def test_history_of_an_artifact_folder_is_404(client: TestClient):
    answer = client.get("/history")
    assert answer.status_code == 404 and answer.json()["error_type"] == "no_history"


@pytest.mark.slow
def test_page_in_headless_chromium(run_dir: Path, start_server, tmp_path: Path):
    executable = find_chromium()
    if executable is None:
        if os.environ.get("MICROBERT_REQUIRE_BROWSER"):  # CI installed it: its absence is a failure
            pytest.fail("MICROBERT_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    history = write_history(run_dir)
    server = start_server(run_dir)
    text, top_k = "The [MASK] of the ship was calm.", 4
    expected = httpx.post(
        server.url + "/fill-mask", json={"inputs": text, "parameters": {"top_k": top_k}}, timeout=30
    ).json()
    browser = Browser(executable, tmp_path / "chromium-profile")
    try:
        browser.navigate(server.url + "/")
        # the model's description from /info, and the curves from /history
        assert browser.wait_for("document.getElementById('model').dataset.step") == "7"
        assert "2 layers, hidden 64" in browser.evaluate("document.getElementById('model').textContent")
        points = browser.wait_for(
            "(() => { const s = [...document.querySelectorAll('polyline.series')]; return s.length === 4"
            " && Object.fromEntries(s.map(p => [p.classList[1], +p.dataset.points])); })()"
        )
        assert points == {"train-loss": 10, "eval-loss": 2, "accuracy": 2, "baseline": 2}
        assert len(history["train"]) == 10
        # type a sentence, set top-k, click the button, read what the page shows
        browser.type_into("#text", text)
        browser.type_into("#top-k", str(top_k))
        browser.click("#go")
        rows = browser.wait_for(
            f"(() => {{ const r = [...document.querySelectorAll('li.candidate')]; return r.length === {top_k}"
            " && r.map(li => [li.querySelector('.token').textContent, li.querySelector('.score').textContent,"
            " li.querySelector('.bar > span').style.width]); })()"
        )
        assert [token for token, _, _ in rows] == [c["token_str"] for c in expected]
        assert [score for _, score, _ in rows] == [f"{c['score']:.4f}" for c in expected]
        assert rows[0][2] == "100%" and all(float(width[:-1]) <= 100 for _, _, width in rows)
        shot = browser.screenshot(tmp_path / "serve-page.png")
    finally:
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "serve-page.png")
