"""The peer ``bench/serve_load.py --compare-plain`` measures Towerline's Serve app against: a plain
FastAPI app in one uvicorn process over the same in-process ``Recommender`` (no Ray, no batching,
no replicas): what "just run the model behind FastAPI" gives on the same machine.

    python bench/plain_app.py --model runs/latest/bundle --port 8100   # 127.0.0.1 only
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint's annotations at runtime, and
# the request model is local to build_plain_app, where a string annotation cannot be resolved.
import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any


def build_plain_app(model: str, history_db: Path) -> Any:
    """``POST /recommend {user_id, k}`` -> the Serve app's response shape, and ``GET /healthz``."""
    import faiss
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel, Field

    from towerline.serving.history import SQLiteHistoryStore
    from towerline.serving.recommender import Recommender, load_model
    from towerline.serving.settings import ServeSettings

    torch.set_num_threads(1)  # what a Serve replica uses; one process, one core's worth of model
    faiss.omp_set_num_threads(1)
    settings = ServeSettings()
    rec = Recommender(load_model(model, settings), settings, SQLiteHistoryStore(history_db))
    app = FastAPI(title="plain peer")

    class Req(BaseModel):
        user_id: str = Field(min_length=1, max_length=256)
        k: int = Field(10, ge=1, le=200)

    @app.post("/recommend")
    def recommend(req: Req) -> dict[str, Any]:  # sync: FastAPI runs it in its thread pool, as most apps do
        r = rec.recommend(req.user_id, req.k)
        return {"items": [{"item_id": i, "score": s} for i, s in r.items], "model_version": r.model_version,
                "arm": "default", "fallback": r.fallback}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        app = build_plain_app(args.model, Path(tmp) / "history.sqlite")
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
