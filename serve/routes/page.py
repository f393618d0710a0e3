"""GET / (a page to try the model in a browser) and GET /history (the run's training curves).

The page is two static files shipped in the package (`serve/static/`: plain HTML and JavaScript, no
build step, nothing fetched from elsewhere). It calls the same public routes any client does,
`/info` and `POST /fill-mask`, plus `/history`: the run folder's `training_history.json`, when the
served model dir is a run folder (or an `export/step-N` folder inside one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from serve.deps import SettingsDep
from serve.errors import ServiceError

STATIC = Path(__file__).resolve().parents[1] / "static"
HISTORY_FILE = "training_history.json"

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


@router.get("/page.js", include_in_schema=False)
async def page_script() -> FileResponse:
    return FileResponse(STATIC / "page.js", media_type="text/javascript; charset=utf-8")


def history_path(model_dir: Path | None) -> Path | None:
    """The run folder's history for a run folder, or for an artifact folder inside one's export/."""
    if model_dir is None:
        return None
    candidates = [model_dir / HISTORY_FILE]
    if model_dir.parent.name == "export":
        candidates.append(model_dir.parent.parent / HISTORY_FILE)
    return next((path for path in candidates if path.is_file()), None)


def _finite(value: Any) -> Any:
    """NaN and infinities (a grad norm before the first step) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@router.get("/history")
async def history(settings: SettingsDep) -> JSONResponse:
    """`training_history.json` of the run being served: `{"train": [...], "eval": [...]}`; 404 when the
    model dir is not a run folder."""
    path = history_path(settings.model_dir)
    if path is None:
        raise ServiceError(404, "no_history", f"the model dir has no {HISTORY_FILE} (not a run folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # being rewritten by the trainer at this instant, or damaged
        raise ServiceError(503, "history_unavailable", f"{HISTORY_FILE} cannot be read now: {exc}") from None
    return JSONResponse(_finite(data), headers={"cache-control": "no-store"})
