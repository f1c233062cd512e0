"""A minimal image-search web service over lookalike's nightly output: `POST /search?k=10` with the image
as the request body answers the catalog items that look like it; `&where=in_stock` filters on the catalog's
columns when the service knows the catalog (LOOKALIKE_CATALOG, a parquet path).

    LOOKALIKE_OUTPUT_ROOT=out/local LOOKALIKE_CATALOG=data/catalog.parquet \
        .venv/bin/uvicorn --factory examples.search_service:app_from_env --port 8000
    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/search?k=5&where=in_stock'

One `lookalike.Searcher` per process holds the latest index build and the model; searches run in Starlette's
thread pool (they are CPU work), and a nightly's new build is picked up by the searcher itself without a
restart. Run several processes (`--workers N`) to use more cores: each holds its own copy of the build.
Only image bytes are accepted, never a path or URL, so a client cannot make the service read its files.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import lookalike
from lookalike.config import SCHEMA
from lookalike.embed.decode import ImageError
from lookalike.search.searcher import MAX_BYTES, FilterError, SearchError

MAX_K = 1000


def create_app(
    output_root: str,
    catalog: str | None = None,
    refresh_every_s: float = 10.0,
    duplicate_score: float = SCHEMA["search.duplicate_score"].default,
) -> Starlette:
    searcher = lookalike.Searcher.open(output_root, refresh_every_s=refresh_every_s, catalog=catalog)

    async def search(request: Request) -> JSONResponse:
        try:
            k = int(request.query_params.get("k", "10"))
        except ValueError:
            return JSONResponse({"error": "k must be an integer"}, status_code=400)
        if not 1 <= k <= MAX_K:
            return JSONResponse({"error": f"k must be between 1 and {MAX_K}"}, status_code=400)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BYTES:
            return JSONResponse({"error": f"images over {MAX_BYTES} bytes are refused"}, status_code=413)
        body = await request.body()
        try:
            hits = await run_in_threadpool(searcher.search, body, k, request.query_params.get("where"))
        except FilterError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except ImageError as err:
            return JSONResponse({"error_kind": err.kind, "error_message": err.message}, status_code=422)
        except SearchError as err:
            return JSONResponse({"error": str(err)}, status_code=503)
        results = [
            {"item_id": hit.item_id, "score": hit.score, "duplicate": hit.score >= duplicate_score} for hit in hits
        ]
        return JSONResponse({"build": searcher.build, "results": results})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"build": searcher.build})

    return Starlette(routes=[Route("/search", search, methods=["POST"]), Route("/health", health)])


def app_from_env() -> Starlette:
    """For `uvicorn --factory`: the output root comes from LOOKALIKE_OUTPUT_ROOT, the catalog (optional) from
    LOOKALIKE_CATALOG."""
    return create_app(os.environ["LOOKALIKE_OUTPUT_ROOT"], os.environ.get("LOOKALIKE_CATALOG"))
