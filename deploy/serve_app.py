"""Ray Serve application: the segmentation ensemble behind an HTTP API.

Run it with ``serve run deploy/serve_config.yaml`` (replicas, autoscaling and GPU fraction
are set there), ``robustseg serve`` (local), or `start_local` / `stop` in-process.

Routes (FastAPI ingress):

* ``POST /v1/segment``: a NIfTI volume as the raw request body (name it with
  ``?filename=`` or an ``X-Filename`` header) or as the single file of a multipart form;
  answers the mask as ``.nii.gz`` in the input's geometry, with ``X-Robustseg-*`` headers
  (model, voxels per structure as JSON).
* ``POST /v1/cardiac-function``: multipart fields ``ed`` and ``es``; answers JSON volumes,
  ejection fractions, myocardial mass and quality flags.
* ``GET /v1/health``, ``GET /v1/model``.

Volumes from concurrent requests (and the ED/ES pair of one request) are batched by
``@serve.batch`` into one `Ensemble.predict_cases` call, which runs in a thread so that the
replica's event loop keeps answering health checks. Request logic lives in
`robustseg.serving` (no Ray there); this module only adapts it to HTTP. Every failure is a
JSON ``{"error": ...}`` with a 4xx/5xx status; nothing a client sends stops the replica.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from robustseg.data.cases import Case
from robustseg.serving import (RequestError, ServeSettings, case_from_upload, cardiac_json, error_response,
                               mask_to_nifti_bytes, settings_from, structure_voxels)

APP_NAME = "robustseg"
#: Room for multipart boundaries and part headers on top of the volumes themselves.
MULTIPART_SLACK_BYTES = 64 * 1024
logger = logging.getLogger("ray.serve")

app = FastAPI(title="robustseg segmentation service",
              description="Cardiac MR / lung CT segmentation ensemble: masks in the input geometry, cardiac function.")


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(app)
class SegmentationService:
    """One replica: the ensemble resident on its device, batching the volumes of all callers.

    Args:
        settings: `ServeSettings` as a dict (what `build_app` binds).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        import torch

        from robustseg.model_registry import load_ensemble

        self.settings = ServeSettings(**settings)
        device = torch.device(self.settings.device) if self.settings.device else None
        self.ensemble, self.info = load_ensemble(self.settings.model_uri, self.settings.tracking_uri, device)
        self.task = self.ensemble.spec.task
        self.class_names = dict(self.ensemble.spec.class_names)
        self.segment_batch.set_max_batch_size(self.settings.max_batch_size)
        self.segment_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.stats = {"requests": 0, "errors": 0, "batches": 0, "volumes": 0, "largest_batch": 0}
        self.started = time.time()

    # -- batching ---------------------------------------------------------------------------
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def segment_batch(self, cases: List[Case]) -> List[Union[np.ndarray, Exception]]:
        """Label maps of the cases of every waiting request, from one ensemble call.

        Failures are returned in place of the label so that each caller gets its own.
        """
        self.stats["batches"] += 1
        self.stats["volumes"] += len(cases)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(cases))
        try:
            return list(await asyncio.to_thread(self.ensemble.predict_cases, cases))
        except Exception as exc:  # noqa: BLE001 - handed to the callers below
            if len(cases) == 1:
                return [exc]
        # One bad volume (say a CT sent to an MR model) must not fail the others batched with it.
        out: List[Union[np.ndarray, Exception]] = []
        for case in cases:
            try:
                out.append((await asyncio.to_thread(self.ensemble.predict_cases, [case]))[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    async def _predict(self, case: Case) -> np.ndarray:
        result = await self.segment_batch(case)
        if isinstance(result, BaseException):
            raise result
        return result

    # -- request plumbing -------------------------------------------------------------------
    async def _guard(self, handler: Callable[[Request], Awaitable[Response]], request: Request) -> Response:
        self.stats["requests"] += 1
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            status, body = error_response(exc)
            self.stats["errors"] += 1
            if status >= 500:
                logger.exception("robustseg: %s %s failed", request.method, request.url.path)
            return JSONResponse(body, status_code=status)

    async def _read_body(self, request: Request, limit: int) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
        declared = request.headers.get("content-length")
        mb = self.settings.max_upload_mb
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared) / 2**20:.1f} MB is over the {mb:g} MB "
                                    "upload limit per volume")
        chunks, total = [], 0
        async for chunk in request.stream():  # chunked bodies have no Content-Length
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"request body is over the {mb:g} MB upload limit per volume")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _uploads(self, request: Request, fields: Sequence[str]) -> Dict[str, Tuple[str, bytes]]:
        """``{field: (filename, bytes)}`` from a multipart form, or the raw body for one field."""
        limit = len(fields) * self.settings.max_upload_bytes + MULTIPART_SLACK_BYTES
        body = await self._read_body(request, limit)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            if len(fields) > 1:
                raise RequestError(400, f"send multipart/form-data with the fields {', '.join(fields)} "
                                        f"(got content type {ctype or 'none'!r})")
            name = request.query_params.get("filename") or request.headers.get("x-filename") or "upload"
            return {fields[0]: (name, body)}

        async def replay() -> Dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:  # the body is already read (and size-checked): parse it from memory
            form = await Request(request.scope, replay).form(max_files=len(fields) + 2)
        except Exception as exc:  # noqa: BLE001 - starlette raises several kinds
            raise RequestError(400, f"malformed multipart body ({getattr(exc, 'detail', exc)})") from None
        try:
            files = {k: v for k, v in form.multi_items() if hasattr(v, "read")}
            if len(fields) == 1 and fields[0] not in files and len(files) == 1:
                files = {fields[0]: next(iter(files.values()))}  # one file under any field name
            missing = [f for f in fields if f not in files]
            if missing:
                raise RequestError(400, f"missing multipart file field(s) {missing}: send {', '.join(fields)} "
                                        f"(got {sorted(files) or 'no files'})")
            return {f: (files[f].filename or f, await files[f].read()) for f in fields}
        finally:
            await form.close()  # large parts are spooled to temporary files

    async def _case(self, filename: str, data: bytes) -> Case:
        return await asyncio.to_thread(case_from_upload, data, filename, self.task,
                                       max_upload_mb=self.settings.max_upload_mb, max_voxels=self.settings.max_voxels)

    def _model_headers(self) -> Dict[str, str]:
        return {"X-Robustseg-Model": str(self.info.get("name") or self.ensemble.spec.name),
                "X-Robustseg-Model-Version": str(self.info.get("version") or ""),
                "X-Robustseg-Model-Alias": str(self.info.get("alias") or "")}

    # -- routes -----------------------------------------------------------------------------
    @app.get("/v1/health")
    async def health(self) -> Dict[str, Any]:
        """Liveness plus request and batching counters of this replica."""
        return {"status": "ok", "model": self.info.get("name") or self.ensemble.spec.name,
                "uptime_s": round(time.time() - self.started, 1), **self.stats}

    @app.get("/v1/model")
    async def model(self) -> Dict[str, Any]:
        """Name, version, alias, members and metrics of the served ensemble."""
        desc = self.ensemble.describe()
        return {**desc, "name": self.info.get("name") or desc["name"], "ensemble": desc["name"],
                "version": self.info.get("version", ""), "alias": self.info.get("alias", ""),
                "uri": self.info.get("uri", self.settings.model_uri), "device": str(self.ensemble.device),
                "limits": {"max_upload_mb": self.settings.max_upload_mb, "max_voxels": self.settings.max_voxels,
                           "max_batch_size": self.settings.max_batch_size}}

    @app.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        """Mask of one NIfTI volume, as ``.nii.gz`` in the input's geometry."""
        return await self._guard(self._segment, request)

    async def _segment(self, request: Request) -> Response:
        name, data = (await self._uploads(request, ("file",)))["file"]
        case = await self._case(name, data)
        label = await self._predict(case)
        body = await asyncio.to_thread(mask_to_nifti_bytes, label, case)
        voxels = structure_voxels(label, self.class_names)
        headers = {**self._model_headers(), "X-Robustseg-Voxels": json.dumps(voxels),
                   "X-Robustseg-Empty": str(not any(voxels.values())).lower(),
                   "Content-Disposition": f'attachment; filename="{case.case_id}_seg.nii.gz"'}
        return Response(body, media_type="application/gzip", headers=headers)

    @app.post("/v1/cardiac-function")
    async def cardiac(self, request: Request) -> Response:
        """Volumes, ejection fractions and myocardial mass of an ED/ES pair (JSON)."""
        return await self._guard(self._cardiac, request)

    async def _cardiac(self, request: Request) -> Response:
        if self.task != "cardiac":
            raise RequestError(400, f"the served model segments {self.task!r}, not cardiac structures: "
                                    "no cardiac function")
        uploads = await self._uploads(request, ("ed", "es"))
        ed, es = await asyncio.gather(*(self._case(*uploads[f]) for f in ("ed", "es")))
        ed_label, es_label = await asyncio.gather(self._predict(ed), self._predict(es))  # one batch
        out = await asyncio.to_thread(cardiac_json, ed_label, es_label, ed, es)
        out["model"] = {"name": self.info.get("name") or self.ensemble.spec.name,
                        "version": self.info.get("version", ""), "alias": self.info.get("alias", "")}
        return JSONResponse(out, headers=self._model_headers())


def build_app(args: Optional[Mapping[str, Any]] = None) -> serve.Application:
    """The bound application (``import_path: deploy.serve_app:build_app`` in serve_config.yaml).

    Args:
        args: `robustseg.serving.ServeSettings` fields (the YAML's ``args:``); missing ones
            come from the environment (see `robustseg.serving.settings_from`).

    Raises:
        ConfigError: unknown or invalid settings, or no model URI.
    """
    return SegmentationService.bind(settings_from(args).to_dict())


def start_local(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, *, num_replicas: int = 1,
                num_cpus: float = 1.0, num_gpus: float = 0.0, timeout_s: float = 120.0) -> str:
    """Start Serve in this process's Ray (a local one if none) and deploy the service.

    Args:
        settings: What to serve and the limits.
        host: Interface the HTTP proxy listens on.
        port: Its port (ignored when Serve is already running here: stop it first).
        num_replicas: Replicas of the deployment.
        num_cpus: Logical CPUs per replica.
        num_gpus: GPU fraction per replica (0: CPU only).
        timeout_s: How long to wait for ``/v1/health`` to answer.

    Returns:
        The base URL (``http://127.0.0.1:8000``).
    """
    import httpx
    import ray

    from robustseg.cli import init_ray

    if not ray.is_initialized():
        init_ray()
    serve.start(http_options={"host": host, "port": int(port)})
    deployment = SegmentationService.options(num_replicas=int(num_replicas),
                                             ray_actor_options={"num_cpus": float(num_cpus),
                                                                "num_gpus": float(num_gpus)})
    serve.run(deployment.bind(settings.to_dict()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{int(port)}"
    deadline = time.time() + timeout_s
    while True:  # the proxy can lag the replica by a moment
        try:
            if httpx.get(url + "/v1/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/v1/health did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def stop() -> None:
    """Shut Serve down (the application, its replicas and the proxy); Ray itself stays up."""
    serve.shutdown()

