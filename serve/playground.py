"""The web playground (issue 14): a page served by the Serve application itself, at `/` and `/playground`, same origin
as the API. Plain HTML/CSS/JS shipped in the package (serve/playground/), nothing fetched from the internet; the page
calls the OpenAI-compatible endpoint like any client (fetch + server-sent events) and GET /v1/adallava/info."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

STATIC = Path(__file__).parent / "playground"
# The only files served, with their media types: a fixed list, so no path from the URL ever reaches the file system.
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}  # fmt: skip


def mount_playground(api: FastAPI) -> None:
    """Add GET /, /playground and /playground/<file> to the ingress app (before @serve.ingress wraps it)."""

    def send(name: str):
        # no-cache: a redeployed server's page is picked up on reload
        return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})

    @api.get("/", include_in_schema=False)
    async def playground_root():
        return send("index.html")

    @api.get("/playground", include_in_schema=False)
    async def playground_index():
        return send("index.html")

    @api.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str):
        if name not in FILES:
            body = {"error": {"message": f"no playground file {name!r}; files: {', '.join(FILES)}",
                              "type": "invalid_request_error", "param": None, "code": "not_found"}}  # fmt: skip
            return JSONResponse(body, status_code=404)
        return send(name)
