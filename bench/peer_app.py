"""The peer of ``bench/load_service.py``: the same model behind a bare FastAPI endpoint, written the way a FastAPI
tutorial serves a PyTorch model: no authentication, no audit trail, no micro-batching, no domain gates, no request
limits. It is what the service's guarantees cost against, not a product.

    python bench/peer_app.py RUN --port 8123 [--workers 2]

``--backend onnx-int8`` serves the run's ONNX Runtime export, as ``medlens serve --backend`` does.

``POST /v1/predictions`` (multipart field ``file``, read by FastAPI's ``UploadFile``): decode with Pillow to an
8-bit grey image, medlens's own ``Predictor.prepare`` (so the network gets exactly the input medlens gives it:
size, CLAHE, lung crop where the card says so), one forward pass in FastAPI's thread pool, JSON with the label and
probability. One torch thread per process, as ``medlens serve`` runs its model workers, so the two compare the
same compute. ``--workers N`` runs N processes the way ``medlens serve --workers N`` does (one SO_REUSEPORT socket
each, medlens.service.workers): uvicorn's own workers share one socket, and with the load test's keep-alive
connections one process took them all, which would handicap the peer.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Annotated

from fastapi import File, UploadFile

RUN_ENV = "MEDLENS_PEER_RUN"
BACKEND_ENV = "MEDLENS_PEER_BACKEND"


def create_app():
    import numpy as np
    import torch
    from fastapi import FastAPI, HTTPException
    from PIL import Image

    from medlens.inference import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.from_run(os.environ[RUN_ENV], device="cpu",
                                   backend=os.environ.get(BACKEND_ENV, "torch"))
    card = predictor.card
    app = FastAPI()

    @app.post("/v1/predictions")
    def predict(file: Annotated[UploadFile, File()]) -> dict:  # plain def: FastAPI runs it in its thread pool
        try:
            image = np.asarray(Image.open(io.BytesIO(file.file.read())).convert("L"), dtype=np.float32) / 255.0
        except Exception as exc:  # noqa: BLE001 - the peer's only error handling
            raise HTTPException(422, f"not an image: {exc}") from None
        with torch.inference_mode():
            p = float(predictor.predict_images(predictor.prepare(image))[0])
        return {"label": card.class_names[card.positive_class] if p >= card.threshold else
                card.class_names[1 - card.positive_class], "probability": p}

    @app.get("/readyz")
    def ready() -> dict:
        return {"model_id": card.model_id}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend", default="torch", help="torch, onnx or onnx-int8, as `medlens serve --backend`")
    args = p.parse_args(argv)
    os.environ[RUN_ENV] = os.path.abspath(args.run)
    os.environ[BACKEND_ENV] = args.backend
    import uvicorn

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    if args.workers > 1:
        from medlens.service.workers import serve_workers

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        return serve_workers(args.workers, "127.0.0.1", args.port, env, {"log_level": "info"},
                             app="peer_app:create_app")
    uvicorn.run("peer_app:create_app", factory=True, host="127.0.0.1", port=args.port,
                log_level="info")  # uvicorn defaults, access log included (medlens serve keeps it too)
    return 0


if __name__ == "__main__":
    sys.exit(main())
