"""`maxlm serve`: a workdir's model in an Engine on its own thread (maxlm/serve/bridge.py), served over HTTP by
the OpenAI-style API (maxlm/serve/app.py) with uvicorn.

FastAPI and uvicorn come with the `serve` extra; they are required here, before anything loads, so a missing one
is a message naming the extra (maxlm.extras.MissingExtra), not an ImportError deep in a traceback.
"""

from __future__ import annotations

from maxlm.extras import require


def serve(workdir: str, *, draft_workdir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          overrides: tuple[str, ...] = ()) -> None:
  """Loads the workdir's model into an Engine and serves it over HTTP until interrupted."""
  require("serve", "fastapi")
  uvicorn = require("serve", "uvicorn")

  from maxlm.serve.app import make_app  # noqa: PLC0415  (needs fastapi)
  from maxlm.serve.bridge import EngineLoop  # noqa: PLC0415
  from maxlm.serve.engine import Engine  # noqa: PLC0415  (heavy: jax, the model)

  engine = Engine.from_workdir(workdir, tuple(overrides), draft_workdir=draft_workdir)
  with EngineLoop(engine) as engine_loop:
    uvicorn.run(make_app(engine_loop), host=host, port=port, timeout_graceful_shutdown=5)
