"""An offline stand-in for Google Cloud Storage, for tests of gs:// model
directories.

Two clients see one bucket store, a local folder (`root/<bucket>/<object>`):

* `FakeGcsServer`: the GCS JSON API subset that TensorStore's `gcs` kvstore
  speaks (media upload, media download with ranges and generation
  preconditions, list by prefix, delete), over HTTP on localhost. Orbax
  writes and reads array data through it when TENSORSTORE_GCS_HTTP_URL
  points at it (`client_env`).
  google-cloud-storage (which orbax asks whether a bucket has a
  hierarchical namespace) reaches it through STORAGE_EMULATOR_HOST.
* `FakeGcsFileSystem`: an fsspec filesystem registered for the `gs` / `gcs`
  protocols, which etils.epath uses for gs:// paths when EPATH_USE_TF=false
  (config.gin, metrics.jsonl, eval results, orbax's metadata files).

An object's generation is its file's modification time in nanoseconds, so
writes by either client are seen by both.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.parse
from pathlib import Path

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "MOE_JAX_FAKE_GCS_ROOT"


def _generation(path: Path) -> int:
  return path.stat().st_mtime_ns


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `self.server.root` as GCS buckets."""

  def log_message(self, *args):
    del args

  def _object(self, bucket: str, name: str) -> Path:
    return Path(self.server.root) / bucket / name

  def _reply(self, code: int, body: bytes = b"", headers=None) -> None:
    self.send_response(code)
    for key, value in (headers or {}).items():
      self.send_header(key, str(value))
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, code: int, value) -> None:
    self._reply(code, json.dumps(value).encode(),
                {"Content-Type": "application/json"})

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
    parts = url.path.split("/")
    return parts, query

  def _precondition_fails(self, path: Path, query) -> bool:
    current = _generation(path) if path.is_file() else 0
    match = query.get("ifGenerationMatch")
    not_match = query.get("ifGenerationNotMatch")
    return ((match is not None and int(match) != current) or
            (not_match is not None and int(not_match) == current))

  def _metadata(self, bucket: str, name: str, path: Path) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name,
            "size": str(path.stat().st_size),
            "generation": str(_generation(path))}

  def do_GET(self):
    parts, query = self._parse()
    # /storage/v1/b/<bucket>/o[/<object>]
    bucket = parts[4]
    if len(parts) == 5:  # bucket metadata (a flat namespace)
      self._json(200, {"kind": "storage#bucket", "name": bucket,
                       "id": bucket})
      return
    if len(parts) == 6:  # list
      prefix = query.get("prefix", "")
      base = Path(self.server.root) / bucket
      names = sorted(str(p.relative_to(base)) for p in base.rglob("*")
                     if p.is_file()) if base.is_dir() else []
      start = query.get("startOffset", "")
      end = query.get("endOffset")
      items = [self._metadata(bucket, n, base / n) for n in names
               if n.startswith(prefix) and n >= start and (
                   end is None or n < end)]
      self._json(200, {"kind": "storage#objects", "items": items})
      return
    name = urllib.parse.unquote(parts[6])
    path = self._object(bucket, name)
    if not path.is_file():
      self._json(404, {"error": {"code": 404, "message": "not found"}})
      return
    if query.get("ifGenerationNotMatch") is not None and int(
        query["ifGenerationNotMatch"]) == _generation(path):
      self._reply(304)
      return
    if self._precondition_fails(path, query):
      self._json(412, {"error": {"code": 412, "message": "precondition"}})
      return
    headers = {"x-goog-generation": _generation(path)}
    if query.get("alt") != "media":
      self._json(200, self._metadata(bucket, name, path))
      return
    data = path.read_bytes()
    ranged = self.headers.get("Range")
    code = 200
    if ranged:
      first, _, last = ranged.removeprefix("bytes=").partition("-")
      size = len(data)
      start = int(first) if first else size - int(last)
      stop = int(last) + 1 if first and last else size
      headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
      data, code = data[start:stop], 206
    self._reply(code, data, headers)

  def do_POST(self):
    parts, query = self._parse()
    # /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<object>
    bucket, name = parts[5], query["name"]
    path = self._object(bucket, name)
    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    if self._precondition_fails(path, query):
      self._json(412, {"error": {"code": 412, "message": "precondition"}})
      return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.upload")
    partial.write_bytes(data)
    os.replace(partial, path)
    self._json(200, self._metadata(bucket, name, path))

  def do_DELETE(self):
    parts, query = self._parse()
    bucket, name = parts[4], urllib.parse.unquote(parts[6])
    path = self._object(bucket, name)
    if not path.is_file():
      self._json(404, {"error": {"code": 404, "message": "not found"}})
      return
    if self._precondition_fails(path, query):
      self._json(412, {"error": {"code": 412, "message": "precondition"}})
      return
    path.unlink()
    self._reply(204)


class FakeGcsServer(http.server.ThreadingHTTPServer):
  """The fake GCS HTTP endpoint over `root`; `start()` serves it from a
  daemon thread, `url` is what TENSORSTORE_GCS_HTTP_URL takes."""

  daemon_threads = True

  def __init__(self, root: str | Path):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.root = str(root)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def start(self) -> "FakeGcsServer":
    threading.Thread(target=self.serve_forever, daemon=True).start()
    return self

  def client_env(self) -> dict[str, str]:
    """Environment variables a client process needs to use this server."""
    return {"TENSORSTORE_GCS_HTTP_URL": self.url,
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
            "EPATH_USE_TF": "false", ROOT_ENV: self.root}


class FakeGcsFileSystem(DirFileSystem):
  """gs://<bucket>/<object> as the file `$MOE_JAX_FAKE_GCS_ROOT/<bucket>/
  <object>`."""

  protocol = ("gs", "gcs")

  def __init__(self, **kwargs):
    del kwargs  # gcsfs options such as finalize_on_close
    super().__init__(path=self.path, fs=LocalFileSystem())

  @property
  def path(self) -> str:
    """The store, read at each use: fsspec and etils.epath keep one instance
    per process, while each test has a store of its own."""
    return os.environ[ROOT_ENV]

  @path.setter
  def path(self, value: str) -> None:
    del value  # DirFileSystem.__init__ sets it; the environment decides

  @classmethod
  def _strip_protocol(cls, path):
    path = path if isinstance(path, str) else str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.rstrip("/")

  def _join(self, path):
    if isinstance(path, str):
      path = self._strip_protocol(path)
    return super()._join(path)


def register_filesystem() -> None:
  """Makes fsspec (so etils.epath with EPATH_USE_TF=false) open gs:// paths
  with `FakeGcsFileSystem`."""
  for protocol in FakeGcsFileSystem.protocol:
    fsspec.register_implementation(protocol, FakeGcsFileSystem, clobber=True)
