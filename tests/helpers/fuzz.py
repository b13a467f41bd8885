"""A seeded request fuzzer for the API in process: valid requests of every route, mutated.

Why our own and not only schemathesis (tests/service/test_fuzz.py): it reaches what a schema-driven
fuzzer rarely sends (a NUL or a lone surrogate deep in a sweep grid, an architecture's layer name, a
query parameter, a header; raw UTF-8 surrogates; lying safetensors headers), it is deterministic (one
`random.Random(seed)`), and it is fast enough for the default run: requests go straight to the ASGI
app on one event loop (httpx.ASGITransport), no thread hop per request as with TestClient.

`requests(seed, count)` yields `FuzzRequest`s; `run(app, seed, count)` sends them and returns what
came back (counts per route and status, and every response ≥ 500 with the request that caused it).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

HOSTILE_TEXT = ["\x00", "a\x00b", "\ud800", "\udfff", "x\ud83dy", "\ude00tail", "\ud800\ud800", "😀", "é",
                "\u202e", "\ufeff", "\x7f", "\x1b[31m", "\n\r\t", "", " ", "%00", "\\u0000", "../../etc/passwd",
                "'; DROP TABLE jobs;--", "null", "NaN", "a" * 300, "job_" + "0" * 20, "w_" + "f" * 20, "ds_x",
                "rigl", "mlp", "digits", "conv2d", "fc1"]
BAD_CHARACTERS = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff"]  # what the API must refuse with a 422
HOSTILE_NUMBERS = [0, -1, 1, 2**31, -(2**31) - 1, 2**63, 10**30, 0.5, -0.0, 1e308, 1e-320, 3, 64, 0.9]
HOSTILE_VALUES = [None, True, False, [], {}, [None], {"": None}, [[[[]]]]]
JOB = {"model": {"name": "mlp", "hidden_sizes": [16]}, "dataset": {"name": "digits"},
       "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk"},
       "training": {"epochs": 1, "batch_size": 64}, "name": "fuzz", "tags": ["fuzz"], "metadata": {"k": "v"}}
ARCHITECTURE = {"name": "net", "architecture": {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "name": "conv"}, {"type": "relu"},
    {"type": "flatten"}, {"type": "linear", "out_features": 10, "name": "head"}]}}
BODIES = {
    "/v1/jobs": JOB,
    "/v1/plan": {"model": {"name": "mlp"}, "sparsity": {"method": "rigl", "sparsity": 0.8}, "num_classes": 10,
                 "input_shape": [64], "dataset": {"name": "digits"}, "task": "auto"},
    "/v1/sweeps": {"name": "sweep", "base": JOB, "grid": {"method": ["rigl", "set"], "sparsity": [0.5, 0.9],
                                                          "seed": [0, 1]}},
    "/v1/architectures": ARCHITECTURE,
}
QUERIES = {
    "/v1/jobs": {"limit": 5, "after": "job_" + "0" * 20, "status": "queued", "tag": "fuzz", "name_prefix": "fu",
                 "method": "rigl", "metadata.k": "v"},
    "/v1/sweeps": {"limit": 5},
    "/v1/jobs/{id}/events": {"after": 0, "limit": 10},
    "/v1/jobs/{id}/metrics": {"max_points": 10},
    "/v1/jobs/{id}/checkpoint": {"format": "dense"},
}
ID_ROUTES = [("GET", "/v1/jobs/{id}"), ("POST", "/v1/jobs/{id}/cancel"), ("DELETE", "/v1/jobs/{id}"),
             ("GET", "/v1/jobs/{id}/events"), ("GET", "/v1/jobs/{id}/metrics"), ("GET", "/v1/jobs/{id}/sparsity"),
             ("GET", "/v1/jobs/{id}/checkpoints"), ("GET", "/v1/jobs/{id}/checkpoint"),
             ("GET", "/v1/architectures/{id}"), ("DELETE", "/v1/architectures/{id}"), ("GET", "/v1/datasets/{id}"),
             ("DELETE", "/v1/datasets/{id}"), ("GET", "/v1/weights/{id}"), ("DELETE", "/v1/weights/{id}"),
             ("GET", "/v1/sweeps/{id}"), ("POST", "/v1/sweeps/{id}/cancel"), ("DELETE", "/v1/sweeps/{id}")]
LISTS = ["/v1/jobs", "/v1/sweeps", "/v1/architectures", "/v1/datasets", "/v1/weights", "/v1/usage", "/v1/webhooks",
         "/healthz"]
HEADERS = ["Idempotency-Key", "X-Request-ID", "Last-Event-ID", "Authorization", "Content-Type", "Accept"]


@dataclass
class FuzzRequest:
    route: str  # "POST /v1/jobs": what the counts are kept by
    method: str
    url: str  # path and raw (already percent-encoded) query
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None

    def describe(self) -> str:
        body = (self.body or b"")[:300]
        return f"{self.method} {self.url} headers={self.headers} body={body!r}"


@dataclass
class FuzzResult:
    sent: int = 0
    by_route: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    server_errors: list[tuple[int, str, str]] = field(default_factory=list)  # (status, request, response)
    text_refusals: Counter = field(default_factory=Counter)  # 422 invalid_text, by route


def _encode_query(params: dict) -> str:
    """Percent-encode as a client would, lone surrogates as their (invalid) UTF-8 bytes."""
    return "&".join(f"{quote(str(k).encode('utf-8', 'surrogatepass'), safe='')}="
                    f"{quote(str(v).encode('utf-8', 'surrogatepass'), safe='')}" for k, v in params.items())


def _hostile(rng: random.Random):
    roll = rng.random()
    if roll < 0.6:
        text = rng.choice(HOSTILE_TEXT)
        return rng.choice(["", "fuzz", "rigl"]) + text if rng.random() < 0.3 else text
    if roll < 0.85:
        return rng.choice(HOSTILE_NUMBERS)
    return copy.deepcopy(rng.choice(HOSTILE_VALUES))


def _places(tree, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _places(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _places(value, (*path, index))


def _spoiled(rng: random.Random, text: str) -> str:
    """`text` with a NUL or a lone surrogate put in: the rest stays valid, so it gets past the checks
    a random value fails (enums, patterns) into the code behind them."""
    at = rng.randint(0, len(text))
    return text[:at] + rng.choice(BAD_CHARACTERS) + text[at:]


def _mutate(rng: random.Random, tree):
    """One to three changes: a string spoiled, a value replaced, a key renamed or added, an entry dropped."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        places = list(_places(tree))
        path, _value = rng.choice(places)
        if not path:
            if rng.random() < 0.1:
                return _hostile(rng)
            continue
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        last, action = path[-1], rng.random()
        if isinstance(parent[last], str) and rng.random() < 0.5:
            parent[last] = _spoiled(rng, parent[last])
        elif action < 0.6:
            parent[last] = _hostile(rng)
        elif action < 0.75 and isinstance(parent, dict):
            parent[str(_hostile(rng))] = parent.pop(last)  # a hostile key
        elif action < 0.9 and isinstance(parent, dict):
            parent[rng.choice(HOSTILE_TEXT)] = _hostile(rng)
        else:
            del parent[last]
    return tree


def _json_bytes(rng: random.Random, tree) -> bytes:
    """JSON as clients send it: escaped (`\\ud800`), or raw UTF-8 where a surrogate's bytes are invalid."""
    if rng.random() < 0.25:
        return json.dumps(tree, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(tree).encode()


def _safetensors(rng: random.Random) -> bytes:
    """A small safetensors file, often lying: hostile names and dtypes, wrong offsets, huge lengths."""
    count = rng.choice([1, 2, 3])
    header, data, offset = {}, b"", 0
    for index in range(count):
        name = rng.choice(["w", "fc1.weight", f"t{index}", rng.choice(HOSTILE_TEXT)]) + str(index)
        entry = {"dtype": rng.choice(["F32", "F32", "I64", "BF16", "X9", "\x00"]), "shape": [2, 2],
                 "data_offsets": [offset, offset + 16]}
        if rng.random() < 0.3:
            entry[rng.choice(["shape", "data_offsets", "dtype"])] = _hostile(rng)
        header[name] = entry
        data += struct.pack("<4f", 1, 2, 3, 4)
        offset += 16
    raw = _json_bytes(rng, header)
    length = len(raw) if rng.random() < 0.8 else rng.choice([0, 2**40, 2**64 - 1, len(raw) + 5])
    return struct.pack("<Q", length) + raw + data


def _npz(rng: random.Random) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    arrays = {"x": np.ones((8, 4), np.float32), "y": np.arange(8) % 2}
    if rng.random() < 0.3:
        arrays[rng.choice(["x_val", "z", "y"])] = np.zeros(3, np.float32)
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    if rng.random() < 0.3:  # a flipped byte somewhere
        at = rng.randrange(len(data))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    return data


def _headers(rng: random.Random) -> dict[str, str]:
    """Sometimes a hostile header (latin-1 only, as the wire allows; NUL included)."""
    if rng.random() < 0.8:
        return {}
    name = rng.choice(HEADERS)
    value = rng.choice(["a\x00b", "\x00", "x" * 300, "", "Bearer \x00", "application/json", "text/plain",
                        "key-1", "-1", "99999999999999999999", "job_" + "0" * 20])
    return {name: value}


def _one(rng: random.Random, ids: list[str]) -> FuzzRequest:
    roll = rng.random()
    headers = _headers(rng)
    if roll < 0.45:  # a JSON body route
        path = rng.choice(list(BODIES))
        tree = BODIES[path] if rng.random() < 0.05 else _mutate(rng, BODIES[path])
        headers = {"Content-Type": "application/json", **headers}
        return FuzzRequest(f"POST {path}", "POST", path, headers, _json_bytes(rng, tree))
    if roll < 0.55:  # an upload
        kind = rng.choice(["weights", "datasets"])
        query = {"name": rng.choice([_hostile(rng), _spoiled(rng, "up"), "up"])}
        if kind == "datasets":
            query["format"] = rng.choice(["npz", "safetensors", "\x00", "zip"])
        body = _safetensors(rng) if kind == "weights" or query.get("format") == "safetensors" else _npz(rng)
        headers = {"Content-Type": "application/octet-stream", **headers}
        return FuzzRequest(f"POST /v1/{kind}", "POST", f"/v1/{kind}?{_encode_query(query)}", headers, body)
    if roll < 0.8:  # a route with an id, valid or hostile, with its query
        method, template = rng.choice(ID_ROUTES)
        ident = rng.choice(ids) if ids and rng.random() < 0.4 else str(_hostile(rng))
        ident = _spoiled(rng, ident) if rng.random() < 0.2 else ident
        url = template.replace("{id}", quote(ident.encode("utf-8", "surrogatepass"), safe=""))
        query = QUERIES.get(template, {})
        if query and rng.random() < 0.8:
            params = dict(query)
            for key in rng.sample(list(params), rng.randint(1, len(params))):
                params[key] = _spoiled(rng, str(params[key])) if rng.random() < 0.4 else _hostile(rng)
            url += "?" + _encode_query(params)
        return FuzzRequest(f"{method} {template}", method, url, headers)
    path = rng.choice(LISTS)  # a list, with hostile filters
    params = dict(QUERIES.get(path, {}))
    for key in rng.sample(list(params), rng.randint(0, len(params))) if params else ():
        params[key] = _spoiled(rng, str(params[key])) if rng.random() < 0.4 else _hostile(rng)
    if rng.random() < 0.2:
        params[rng.choice(HOSTILE_TEXT)] = _hostile(rng)
    return FuzzRequest(f"GET {path}", "GET", f"{path}?{_encode_query(params)}" if params else path, headers)


def requests(seed: int, count: int, ids: list[str] | None = None):
    """`count` requests from `random.Random(seed)`: the same list for the same seed."""
    rng, ids = random.Random(seed), ids if ids is not None else []
    for _ in range(count):
        yield _one(rng, ids)


async def _send_all(app, seed: int, count: int, ids: list[str]) -> FuzzResult:
    import httpx

    result = FuzzResult()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for request in requests(seed, count, ids):
            response = await client.request(request.method, request.url, headers=request.headers,
                                            content=request.body)
            result.sent += 1
            result.by_route[request.route] += 1
            result.by_status[response.status_code] += 1
            if response.status_code >= 500:
                result.server_errors.append((response.status_code, request.describe(), response.text[:300]))
            elif response.status_code == 422 and b"invalid_text" in response.content:
                result.text_refusals[request.route] += 1
            if response.status_code == 201 and request.method == "POST":
                new = response.json().get("id")
                if new:
                    ids.append(new)  # later requests name it: deletes, cancels, jobs starting from it
    return result


def run(app, seed: int, count: int) -> FuzzResult:
    """Send `count` seeded requests to the ASGI `app` one after another; ids the app hands out are
    reused by later requests."""
    return asyncio.run(_send_all(app, seed, count, []))
