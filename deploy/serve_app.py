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
* ``GET /v1/health``, ``GET /v1/model`` (names and relative identifiers, never server paths).

``/v1/segment`` and ``/v1/cardiac-function`` refuse ground-truth label maps (by file name or
by voxels that hold only label values) with 400 unless the query says ``?force=true``.

Memory: each request holds a reservation in the replica's `ByteBudget` (its body, then the
decode memory priced from the NIfTI header before anything is inflated); one that does not
fit waits ``admission_wait_s`` and then gets 503 with Retry-After. Limits are
`robustseg.serving.ServeSettings` fields.

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
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from robustseg.data.cases import Case
from robustseg.serving import (ByteBudget, ModelLoadError, RequestError, Reservation, ServeSettings, ServeStartError,
                               case_from_upload, cardiac_json, decode_cost, error_response, inspect_upload,
                               mask_to_nifti_bytes, port_error, public_model_info, settings_from, structure_voxels)

APP_NAME = "robustseg"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRUE = ("1", "true", "yes", "on")
#: Room for multipart boundaries and part headers on top of the volumes themselves.
MULTIPART_SLACK_BYTES = 64 * 1024
logger = logging.getLogger("ray.serve")

app = FastAPI(title="robustseg segmentation service",
              description="Cardiac MR / lung CT segmentation ensemble: masks in the input geometry, cardiac function.")


# Helpers the routes call must be defined above the class: @serve.ingress pickles the FastAPI
# app (and so the route functions with the globals they use) when the class is defined.
def _forced(request: Request) -> bool:
    """Whether the client asked to segment a file that looks like a label map (``?force=true``)."""
    return request.query_params.get("force", "").strip().lower() in _TRUE


def _rss_mb() -> Optional[float]:
    """Resident memory of this process in MB (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(app)
class SegmentationService:
    """One replica: the ensemble resident on its device, batching the volumes of all callers.

    Args:
        settings: `ServeSettings` as a dict (what `build_app` binds).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        import torch

        from robustseg.ensemble.registry import load_ensemble

        self.settings = ServeSettings(**settings)
        device = torch.device(self.settings.device) if self.settings.device else None
        try:
            self.ensemble, self.info = load_ensemble(self.settings.model_uri, self.settings.tracking_uri, device)
        except Exception as exc:
            # Marked so that `start_local` can show this text instead of Serve's generic
            # "Failed to update the deployments".
            raise ModelLoadError.wrap(self.settings.model_uri, exc) from exc
        self.budget = ByteBudget(self.settings.max_inflight_bytes, self.settings.admission_wait_s)
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
            if status >= 500 and status != 503:
                logger.exception("robustseg: %s %s failed", request.method, request.url.path)
            retry = getattr(exc, "retry_after_s", None)
            headers = {"Retry-After": str(retry)} if retry else None
            return JSONResponse(body, status_code=status, headers=headers)

    async def _read_body(self, request: Request, limit: int, held: Reservation) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed ``limit``.

        The body's bytes are held in ``held`` before they are read (chunk by chunk when no
        Content-Length is declared), so bodies count against the replica's budget too.
        """
        declared = request.headers.get("content-length")
        mb = self.settings.max_upload_mb
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared) / 2**20:.1f} MB is over the {mb:g} MB "
                                    "upload limit per volume")
        if declared and declared.isdigit():
            await held.grow(int(declared), "request body")
        chunks, total = [], 0
        async for chunk in request.stream():  # chunked bodies have no Content-Length
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"request body is over the {mb:g} MB upload limit per volume")
            if total > held.held:
                await held.grow(total - held.held, "request body")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _uploads(self, request: Request, fields: Sequence[str],
                       held: Reservation) -> Dict[str, Tuple[str, bytes]]:
        """``{field: (filename, bytes)}`` from a multipart form, or the raw body for one field."""
        limit = len(fields) * self.settings.max_upload_bytes + MULTIPART_SLACK_BYTES
        body = await self._read_body(request, limit, held)
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

    async def _case(self, filename: str, data: bytes, held: Reservation, force: bool) -> Case:
        """Decode one upload once its decode memory (priced from the header) is admitted."""
        s = self.settings
        limits = {"max_upload_mb": s.max_upload_mb, "max_voxels": s.max_voxels, "max_decoded_mb": s.max_decoded_mb,
                  "force": force}
        header = inspect_upload(data, filename, **limits)  # header only: refuses before any inflation
        await held.grow(decode_cost(header, 0), f"upload {filename!r}")  # the body is already held
        return await asyncio.to_thread(case_from_upload, data, filename, self.task, **limits)

    def _model_headers(self) -> Dict[str, str]:
        return {"X-Robustseg-Model": str(self.info.get("name") or self.ensemble.spec.name),
                "X-Robustseg-Model-Version": str(self.info.get("version") or ""),
                "X-Robustseg-Model-Alias": str(self.info.get("alias") or "")}

    # -- routes -----------------------------------------------------------------------------
    @app.get("/v1/health")
    async def health(self) -> Dict[str, Any]:
        """Liveness plus request, batching and memory counters of this replica."""
        b = self.budget
        memory = {"inflight_mb": round(b.used / 2**20, 1), "inflight_peak_mb": round(b.peak / 2**20, 1),
                  "inflight_budget_mb": round(b.capacity / 2**20, 1), "rss_mb": _rss_mb()}
        return {"status": "ok", "model": self.info.get("name") or self.ensemble.spec.name,
                "uptime_s": round(time.time() - self.started, 1), **self.stats, "memory": memory}

    @app.get("/v1/model")
    async def model(self) -> Dict[str, Any]:
        """Name, version, alias, members and metrics of the served ensemble.

        Paths (the ensemble folder, member checkpoints, provenance) are shown relative to the
        served folder or by file name: clients have no business with the server's layout.
        """
        s = self.settings
        desc = self.ensemble.describe()
        out = {**desc, "name": self.info.get("name") or desc["name"], "ensemble": desc["name"],
               "version": self.info.get("version", ""), "alias": self.info.get("alias", ""),
               "uri": self.info.get("uri", s.model_uri), "device": str(self.ensemble.device),
               "limits": {"max_upload_mb": s.max_upload_mb, "max_voxels": s.max_voxels,
                          "max_decoded_mb": s.max_decoded_mb, "max_inflight_mb": s.max_inflight_mb,
                          "max_batch_size": s.max_batch_size}}
        root = s.model_uri if Path(s.model_uri).is_dir() else None
        return public_model_info(out, root)

    @app.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        """Mask of one NIfTI volume, as ``.nii.gz`` in the input's geometry."""
        return await self._guard(self._segment, request)

    async def _segment(self, request: Request) -> Response:
        async with self.budget.reservation() as held:  # released when the answer is built
            name, data = (await self._uploads(request, ("file",), held))["file"]
            case = await self._case(name, data, held, _forced(request))
            del data
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
        async with self.budget.reservation() as held:
            uploads = await self._uploads(request, ("ed", "es"), held)
            force = _forced(request)
            ed, es = await asyncio.gather(*(self._case(*uploads[f], held, force) for f in ("ed", "es")))
            del uploads
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
                num_cpus: float = 1.0, num_gpus: float = 0.0, timeout_s: float = 120.0, name: str = APP_NAME,
                route_prefix: str = "/", resources: Optional[Dict[str, float]] = None,
                max_replicas_per_node: Optional[int] = None) -> str:
    """Start Serve in this process's Ray (a local one if none) and deploy the service.

    A model that cannot load fails on the first attempt (no constructor retries: a load
    error does not heal) with its own error text.

    Args:
        settings: What to serve and the limits.
        host: Interface the HTTP proxy listens on.
        port: Its port (ignored when Serve is already running here: stop it first).
        num_replicas: Replicas of the deployment.
        num_cpus: Logical CPUs per replica.
        num_gpus: GPU fraction per replica (0: CPU only).
        timeout_s: How long to wait for ``/v1/health`` to answer.
        name: Serve application name (several can share one Serve).
        route_prefix: Where the application's routes start (``/v1/...`` below it).
        resources: Custom Ray resources per replica (placement on chosen nodes).
        max_replicas_per_node: At most this many replicas on one node (None: no limit).

    Returns:
        The base URL of the application (``http://127.0.0.1:8000``, plus the route prefix).

    Raises:
        ServeStartError: the port is in use, or the model cannot load (the loading error's
            text, naming the model), or the deployment failed for another reason.
    """
    import ray

    from trainables.ray_session import init_ray

    if not ray.is_initialized():
        init_ray()
    try:
        serve.start(http_options={"host": host, "port": int(port)})
    except Exception as exc:  # noqa: BLE001 - the proxy actor's RayTaskError wraps the bind failure
        if "Failed to bind" in str(exc) or "address already in use" in str(exc).lower():
            raise port_error(host, port) from None
        raise
    actor = {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}
    if resources:
        actor["resources"] = dict(resources)
    spread = {"max_replicas_per_node": int(max_replicas_per_node)} if max_replicas_per_node else {}
    deployment = SegmentationService.options(num_replicas=int(num_replicas), max_constructor_retry_count=1,
                                             ray_actor_options=actor, **spread)
    try:
        serve.run(deployment.bind(settings.to_dict()), name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        message = deploy_failure_message(name, exc)
        try:
            serve.delete(name)  # leave no failed application behind in a shared Serve
        except Exception:  # noqa: BLE001 - best effort: the error above is what matters
            pass
        raise ServeStartError(message) from None
    host_part = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{host_part}:{int(port)}" + route_prefix.rstrip("/")
    _wait_healthy(url, timeout_s)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    """Poll ``/v1/health`` until it answers 200 (the proxy can lag the replica by a moment)."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url + "/v1/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise ServeStartError(f"{url}/v1/health did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def deploy_failure_message(app_name: str, exc: BaseException) -> str:
    """What to tell the user when ``serve.run`` failed: the replica's own error, not Serve's summary.

    Serve reports "Failed to update the deployments [...]"; the replica's traceback is in the
    deployment status. A `ModelLoadError` there is quoted whole; otherwise its last line (the
    exception) is quoted.

    Args:
        app_name: The application that failed.
        exc: What ``serve.run`` raised.
    """
    messages: List[str] = []
    try:
        app_status = serve.status().applications.get(app_name)
        if app_status is not None:
            messages = [d.message for d in app_status.deployments.values() if d.message]
    except Exception:  # noqa: BLE001 - the status is a nicety: fall back to the exception
        pass
    for text in (_ANSI.sub("", m) for m in messages + [str(exc)]):
        marked = re.search(r"ModelLoadError: (.*)", text, re.S)
        if marked:
            return marked.group(1).strip()
    for text in (_ANSI.sub("", m) for m in messages):
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        if lines:
            return f"the service did not start: {lines[-1]} (Ray Serve logs: /tmp/ray/session_latest/logs/serve)"
    return f"the service did not start: {_ANSI.sub('', str(exc)).strip()}"


def stop() -> None:
    """Shut Serve down (the application, its replicas and the proxy); Ray itself stays up."""
    serve.shutdown()
