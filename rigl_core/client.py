"""Python client for the RigL job service.

    from rigl_core.client import Client
    client = Client()                       # RIGL_API_URL (default http://127.0.0.1:8000), RIGL_API_KEY
    job = client.submit({"model": {"name": "mlp"}, "dataset": {"name": "digits"}})
    job.wait(progress=True)                 # tqdm bar with loss / accuracy
    job.download(format="dense", path="model.safetensors")

Connection errors and 502/503/504 are retried with exponential backoff; every other error raises
a typed RiglError carrying the server's code, message and field. A server that never answered this
client is given up on after two quick retries (about 1.5 s) with `ServiceUnreachable`, naming the URL
and how to start the service; the long backoff is for a server that answered before (restarting).
`submit()` sends an Idempotency-Key (one per call, the same on its retries), so a POST that reached
the server before a proxy answered 504 is not turned into a second job. `download()` never lets the server choose
where a file goes: the caller's path, or a sanitised base name in the current directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

from rigl_core.optional import require

try:  # the 'client' extra; without it the error types below still import, so `rigl` can catch them
    import httpx
except ModuleNotFoundError:
    httpx = None

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUS = (502, 503, 504)
DEFAULT_URL = "http://127.0.0.1:8000"  # `rigl serve`'s address
FIRST_CONTACT_RETRIES = 2  # a server that never answered: 0.5 + 1 s of backoff, then say so


class RiglError(Exception):
    """An error answer from the service (or no answer at all)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.code, self.message, self.field = status, code, message, field


class InvalidRequest(RiglError):
    """422/400: the request (a JobSpec, an upload) is wrong; `field` says where."""


class NotFound(RiglError):
    """404: no such job, checkpoint, architecture or dataset (or not yours)."""


class AuthError(RiglError):
    """401/403: missing, revoked or insufficient API key."""


class RateLimited(RiglError):
    """429: too many jobs or requests; `retry_after` seconds."""

    retry_after: float | None = None


class Unavailable(RiglError):
    """The service did not answer, or answered 5xx, after all retries."""


class ServiceUnreachable(Unavailable):
    """No connection to the service could be opened: it is not running there, or the URL is wrong."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot reach the RigL service at {url} ({reason}): is it running? Start it with "
                         "`rigl serve`, or point RIGL_API_URL (or Client(base_url=...)) at it")
        self.url = url


def _error_for(response: httpx.Response) -> RiglError:
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    message = error.get("message") or response.text[:200] or response.reason_phrase
    cls = {400: InvalidRequest, 401: AuthError, 403: AuthError, 404: NotFound, 413: InvalidRequest,
           422: InvalidRequest, 429: RateLimited}.get(response.status_code)
    if cls is None:
        cls = Unavailable if response.status_code >= 500 else RiglError
    exc = cls(message, response.status_code, error.get("code"), error.get("field"))
    if isinstance(exc, RateLimited):
        exc.retry_after = float(response.headers.get("Retry-After", 0) or 0)
    return exc


class Job:
    """A job on the server; attributes mirror the JSON job object. `refresh()` re-reads it."""

    def __init__(self, client: "Client", data: dict):
        self._client = client
        self.data = data

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        p = self.data.get("progress", {})
        return f"Job({self.data['id']}, {self.data['status']}, step {p.get('step')}/{p.get('total_steps')})"

    @property
    def done(self) -> bool:
        return self.data["status"] in TERMINAL

    def refresh(self) -> "Job":
        self.data = self._client.get(self.data["id"]).data
        return self

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 1.0) -> "Job":
        return self._client.wait(self.data["id"], progress=progress, timeout=timeout, poll=poll, _job=self)

    def events(self, after: int = 0) -> Iterator[dict]:
        return self._client.events(self.data["id"], after=after)

    def cancel(self) -> "Job":
        self.data = self._client.cancel(self.data["id"]).data
        return self

    def download(self, format: str = "dense", path: str | os.PathLike | None = None) -> Path:
        return self._client.download(self.data["id"], format=format, path=path)

    def report(self) -> dict:
        return self._client.report(self.data["id"])


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 5, backoff: float = 0.5):
        self.base_url = (base_url or os.environ.get("RIGL_API_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("RIGL_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if httpx is None:
            require("httpx", "client", "the service client")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.retries, self.backoff = retries, backoff
        self.answered = False  # whether the server ever answered this client (see _request)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, retry: bool = True, **kwargs) -> httpx.Response:
        """`retry=False`: a request that must not be repeated once sent is retried only when the
        connection could not be opened."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError) as exc:
                refused = isinstance(exc, httpx.ConnectError)
                # a server that never answered is most likely not running: say so now, not after 15 s
                last = self.retries if self.answered or not refused else min(self.retries, FIRST_CONTACT_RETRIES)
                if refused and attempt >= last:
                    raise ServiceUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
                if attempt >= last or not (retry or refused):
                    raise Unavailable(f"cannot reach {self.base_url}: {exc}") from None
            else:
                self.answered = True
                if response.status_code not in RETRY_STATUS or attempt == self.retries or not retry:
                    if response.status_code >= 400:
                        raise _error_for(response)
                    return response
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise Unavailable(f"cannot reach {self.base_url}")  # unreachable

    # ------------------------------------------------------------------ jobs
    def submit(self, spec: Any, idempotency_key: str | None = None) -> Job:
        """`spec`: a dict, a rigl_core JobSpec, or a path to a .json/.yaml JobSpec file.

        Retried POSTs carry one Idempotency-Key (a new uuid4 per call unless given), so the server
        answers a retry of a POST it already accepted with that same job."""
        body = _spec_body(spec)
        headers = {"Idempotency-Key": idempotency_key or f"rigl-client-{uuid.uuid4()}"}
        return Job(self, self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def get(self, job_id: str) -> Job:
        return Job(self, self._request("GET", f"/v1/jobs/{job_id}").json())

    def register(self, job_id: str, name: str) -> dict:
        """Register a succeeded job's MLflow model as a new version of model `name` (the service logs jobs to
        MLflow); returns the model version (name, version, run_id, source, lineage tags)."""
        return self._request("POST", f"/v1/jobs/{job_id}/register", retry=False, json={"name": name}).json()

    def list(self, status: str | None = None, limit: int = 20, after: str | None = None, tag: str | None = None,
             name_prefix: str | None = None, method: str | None = None, metadata: dict | None = None) -> list[Job]:
        """Newest first; the filters combine (`tag`: one of the job's tags, `method`: the sparsity method,
        `metadata`: {key: value} that the job's metadata must hold, each value a string, int or bool)."""
        filters = {"status": status, "after": after, "tag": tag, "name_prefix": name_prefix, "method": method}
        params = {"limit": limit, **{k: v for k, v in filters.items() if v},
                  **{f"metadata.{k}": json.dumps(v) if isinstance(v, bool) else str(v)
                     for k, v in (metadata or {}).items()}}
        return [Job(self, j) for j in self._request("GET", "/v1/jobs", params=params).json()["data"]]

    def iter_jobs(self, status: str | None = None) -> Iterator[Job]:
        after = None
        while True:
            params = {"limit": 100, **({"status": status} if status else {}), **({"after": after} if after else {})}
            page = self._request("GET", "/v1/jobs", params=params).json()
            for data in page["data"]:
                yield Job(self, data)
            if not page["has_more"] or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def cancel(self, job_id: str) -> Job:
        return Job(self, self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def label(self, job_id: str, **changes: Any) -> Job:
        """Edit a job's labels: `name=`, `tags=` (the new list), `metadata=` (merged into the job's: a key
        set to None is deleted); a label not passed stays, and None clears `name` or `tags`. The server's
        JSON merge patch (`PATCH /v1/jobs/{id}`); repeating it changes nothing more, so it is retried."""
        unknown = set(changes) - {"name", "tags", "metadata"}
        if unknown:
            raise TypeError(f"label() takes name, tags and metadata, not {', '.join(sorted(unknown))}")
        return Job(self, self._request("PATCH", f"/v1/jobs/{job_id}", json=changes,
                                       headers={"Content-Type": "application/merge-patch+json"}).json())

    def wait(self, job_id: str, progress: bool = False, timeout: float | None = None, poll: float = 1.0,
             _job: Job | None = None) -> Job:
        """Poll until the job ends; with `progress` a tqdm bar shows steps, loss and accuracy. The bar
        starts at the step the job had when it was first read, so its step/s counts only the steps seen
        since (attached to a job at step 5,000, it is not 5,000 steps in the first second)."""
        job = _job or self.get(job_id)
        deadline = time.monotonic() + timeout if timeout else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=job.data["progress"]["total_steps"] or None, initial=job.data["progress"]["step"],
                       unit="step", desc=job_id, dynamic_ncols=True)
        try:
            while True:
                job.data = self.get(job_id).data
                if bar is not None:
                    p = job.data["progress"]
                    bar.total = p["total_steps"] or bar.total
                    if p["step"] >= bar.n:
                        bar.update(p["step"] - bar.n)  # through update(): the rate sees each poll's steps
                    else:  # requeued and resumed from an earlier checkpoint
                        bar.n = p["step"]
                    metrics = job.data.get("metrics") or {}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("loss", "val_accuracy")},
                                    refresh=False)
                    bar.set_description(f"{job_id} {job.data['status']}")
                    bar.refresh()
                if job.done:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.data['status']} after {timeout}s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def events(self, job_id: str, after: int = 0) -> Iterator[dict]:
        """Server-sent events until the job ends; reconnects with Last-Event-ID if the stream drops."""
        last = after
        failures = 0
        while True:
            try:
                headers = {"Last-Event-ID": str(last)} if last else {}
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error_for(response)
                    data = None
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            data = json.loads(line[6:])
                        elif line == "" and data is not None:
                            last = data["id"]
                            failures = 0
                            yield data
                            data = None
                return
            except (httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError):
                failures += 1
                if failures > self.retries:
                    raise Unavailable(f"event stream of {job_id} keeps failing") from None
                time.sleep(min(self.backoff * 2 ** failures, 10.0))

    def download(self, job_id: str, format: str = "dense", path: str | os.PathLike | None = None) -> Path:
        """Save the checkpoint to `path` (a file, or a folder), else into the current directory; the
        content hash is checked against the server's. The server's file name is only a suggestion:
        reduced to a plain base name (no folders, no leading dot, no control characters, ending in
        .safetensors), else `<job_id>-<format>.safetensors`."""
        response = self._request("GET", f"/v1/jobs/{job_id}/checkpoint", params={"format": format})
        name = (safe_filename(_disposition_filename(response.headers.get("content-disposition", "")))
                or safe_filename(f"{job_id}-{format}.safetensors") or f"checkpoint-{format}.safetensors")
        target = Path(path) if path is not None else Path(name)
        if target.is_dir():
            target = target / name
        expected = response.headers.get("x-content-sha256")
        if expected and hashlib.sha256(response.content).hexdigest() != expected:
            raise RiglError(f"checkpoint of {job_id} arrived corrupted (sha256 mismatch)")
        target.write_bytes(response.content)
        return target

    def upload_dataset(self, path: str | os.PathLike, name: str | None = None, format: str | None = None) -> dict:
        """Upload a .npz or .safetensors file (x, y, optionally x_val, y_val) as the raw body, sent as
        application/octet-stream; returns the dataset object. Use it as
        `"dataset": {"name": "tensors", "path": dataset["id"]}`. Not retried once sent."""
        path = Path(path)
        params = {"name": name or path.stem, "format": format or path.suffix.lstrip(".") or "npz"}
        return self._request("POST", "/v1/datasets", retry=False, params=params, content=path.read_bytes(),
                             headers={"Content-Type": "application/octet-stream"}).json()

    def upload_weights(self, path: str | os.PathLike, name: str | None = None) -> dict:
        """Upload a trained model's state_dict saved as .safetensors (never a pickle) as the raw body;
        returns the weights object. Start a job from it with `"model": {..., "weights": weights["id"]}`
        (and `"sparsity": {"init": "magnitude"}` to prune it one-shot). Not retried once sent."""
        path = Path(path)
        return self._request("POST", "/v1/weights", retry=False, params={"name": name or path.stem},
                             content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"}).json()

    def upload_program(self, model: Any, example_inputs: Any = None, name: str | None = None) -> dict:
        """Export `model` (any nn.Module) with `torch.export` and a dynamic batch dimension, and upload it as
        an architecture; `example_inputs` is a batch of the shape it will train on. `model` may also be the
        path of a `.pt2` already written. Returns the architecture object: train it with
        `"model": {"program": architecture["id"]}`; the dense export loads into `model` with
        `load_state_dict`. Not retried once sent."""
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            return self._send_program(path.read_bytes(), name or path.stem)
        import tempfile

        from rigl_core.models.program.export import save_program

        with tempfile.TemporaryDirectory() as folder:
            content = save_program(model, example_inputs, Path(folder) / "model.pt2").read_bytes()
        return self._send_program(content, name or type(model).__name__)

    def _send_program(self, content: bytes, name: str) -> dict:
        return self._request("POST", "/v1/architectures/program", retry=False, params={"name": name},
                             content=content, headers={"Content-Type": "application/octet-stream"}).json()

    def usage(self) -> dict:
        """What you store against your storage quotas: for `weights`, `datasets` and `artifacts` (your jobs'
        checkpoints and exports) the bytes and count held and the quota's `max_bytes` / `max_count`."""
        return self._request("GET", "/v1/usage").json()

    def report(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/sparsity").json()

    def metrics(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/metrics").json()

    def plan(self, model: dict, sparsity: dict | None = None, **extra) -> dict:
        return self._request("POST", "/v1/plan", json={"model": model, "sparsity": sparsity or {}, **extra}).json()

    # ------------------------------------------------------------------ sweeps
    def submit_sweep(self, sweep: Any, grid: dict | None = None, name: str | None = None,
                     idempotency_key: str | None = None) -> dict:
        """`sweep`: {base, grid, name?} (a dict or a .json/.yaml file), or a base JobSpec with `grid`.
        Retried like `submit`, with one Idempotency-Key, so a retry answers with the same sweep."""
        body = _spec_body(sweep)
        if grid is not None:
            body = {"base": body, "grid": grid}
        if name is not None:
            body["name"] = name
        headers = {"Idempotency-Key": idempotency_key or f"rigl-client-{uuid.uuid4()}"}
        return self._request("POST", "/v1/sweeps", json=body, headers=headers).json()

    def sweep(self, sweep_id: str) -> dict:
        """The sweep with its children, progress, aggregate table and Pareto frontiers."""
        return self._request("GET", f"/v1/sweeps/{sweep_id}").json()

    def sweeps(self, limit: int = 20) -> list[dict]:
        return self._request("GET", "/v1/sweeps", params={"limit": limit}).json()["data"]

    def cancel_sweep(self, sweep_id: str) -> dict:
        return self._request("POST", f"/v1/sweeps/{sweep_id}/cancel").json()

    def delete_sweep(self, sweep_id: str) -> dict:
        return self._request("DELETE", f"/v1/sweeps/{sweep_id}").json()

    def wait_sweep(self, sweep_id: str, timeout: float | None = None, poll: float = 2.0,
                   on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until every child has ended (or the sweep was cancelled); `on_update` sees each poll."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            sweep = self.sweep(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep["status"] in ("finished", "cancelled") and not any(
                    c["status"] in ("queued", "running", "requeued", "cancelling") for c in sweep["children"]):
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still {sweep['status']} after {timeout}s")
            time.sleep(poll)


def _disposition_filename(disposition: str) -> str | None:
    """The file name of a Content-Disposition header (`filename*=UTF-8''…` included), unsanitised."""
    if not disposition:
        return None
    message = Message()
    message["content-disposition"] = disposition
    try:
        return message.get_filename()
    except (ValueError, LookupError):
        return None


def safe_filename(name: str | None) -> str | None:
    """A server-suggested name reduced to a base name that stays in its folder, or None: no path
    parts (either slash), not '.', '..', empty or hidden, no control or format characters (bidi
    overrides), at most 200 characters, ending in .safetensors (never a .bashrc or a script)."""
    if not name:
        return None
    base = name.replace("\\", "/").split("/")[-1].strip()
    if (not base or base.startswith(".") or len(base) > 200 or not base.endswith(".safetensors")
            or any(unicodedata.category(c).startswith("C") for c in base)):
        return None
    return base


def _spec_body(spec: Any) -> dict:
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            return require("yaml", "client", "reading a YAML JobSpec").safe_load(text)
        return json.loads(text)
    if hasattr(spec, "model_dump"):
        return spec.model_dump(mode="json", exclude_unset=True)
    return dict(spec)
