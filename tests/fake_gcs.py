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
  TensorFlow's own GCS client (tf.io.gfile, tf.data.TFRecordDataset) has
  its endpoints built in (https://www.googleapis.com/storage/v1/,
  https://storage.googleapis.com/) but honours libcurl's `https_proxy` and
  `CURL_CA_BUNDLE`: `tensorflow_env` makes the server that proxy, answering
  each tunnel itself with a certificate made for those hosts.
* `FakeGcsFileSystem`: an fsspec filesystem registered for the `gs` / `gcs`
  protocols, which etils.epath uses for gs:// paths when EPATH_USE_TF=false
  (config.gin, metrics.jsonl, eval results, orbax's metadata files).

An object's generation is its file's modification time in nanoseconds, so
writes by either client are seen by both.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import ssl
import threading
import urllib.parse
from pathlib import Path

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "MOE_JAX_FAKE_GCS_ROOT"
# The hosts of TensorFlow's GCS client: the JSON API, and media downloads
# as https://storage.googleapis.com/<bucket>/<object>.
JSON_API_HOST = "www.googleapis.com"
DOWNLOAD_HOST = "storage.googleapis.com"


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
    updated = datetime.datetime.fromtimestamp(path.stat().st_mtime,
                                              datetime.timezone.utc)
    return {"kind": "storage#object", "bucket": bucket, "name": name,
            "size": str(path.stat().st_size),
            "generation": str(_generation(path)),
            "updated": updated.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}

  def _list(self, bucket: str, query) -> None:
    """Objects under `prefix`; with a `delimiter`, the names that go on
    past it are folded into `prefixes` (the "folders")."""
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter")
    base = Path(self.server.root) / bucket
    names = sorted(str(p.relative_to(base)) for p in base.rglob("*")
                   if p.is_file()) if base.is_dir() else []
    start = query.get("startOffset", "")
    end = query.get("endOffset")
    items, prefixes = [], set()
    for n in names:
      if not (n.startswith(prefix) and n >= start and (end is None or
                                                       n < end)):
        continue
      rest = n[len(prefix):]
      if delimiter and delimiter in rest:
        prefixes.add(prefix + rest[:rest.index(delimiter) + 1])
      else:
        items.append(self._metadata(bucket, n, base / n))
    self._json(200, {"kind": "storage#objects", "items": items,
                     "prefixes": sorted(prefixes)})

  def do_CONNECT(self):
    """A tunnel to JSON_API_HOST or DOWNLOAD_HOST (TensorFlow's client
    through `https_proxy`): TLS with the server's certificate for them,
    then the requests inside served as any other."""
    self.send_response(200, "Connection established")
    self.end_headers()
    self.close_connection = True
    tunnel = self.server.tls.wrap_socket(self.connection, server_side=True)
    _Handler(tunnel, self.client_address, self.server)

  def do_GET(self):
    parts, query = self._parse()
    if self.headers.get("Host", "").split(":")[0] == DOWNLOAD_HOST:
      # /<bucket>/<object>
      self._get_object(parts[1], "/".join(parts[2:]), {**query,
                                                       "alt": "media"})
      return
    # /storage/v1/b/<bucket>/o[/<object>]
    bucket = parts[4]
    if len(parts) == 5:  # bucket metadata (a flat namespace)
      self._json(200, {"kind": "storage#bucket", "name": bucket,
                       "id": bucket})
      return
    if len(parts) == 6:
      self._list(bucket, query)
      return
    self._get_object(bucket, parts[6], query)

  def _get_object(self, bucket: str, quoted_name: str, query) -> None:
    """An object's metadata, or with alt=media its bytes (a Range header:
    those bytes, 416 from past its end)."""
    name = urllib.parse.unquote(quoted_name)
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
      stop = min(int(last) + 1, size) if first and last else size
      if start >= size:
        self._reply(416, headers={"Content-Range": f"bytes */{size}"})
        return
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

  def tensorflow_env(self, directory: Path) -> dict[str, str]:
    """Environment variables that send TensorFlow's GCS client here: this
    server as its HTTPS proxy, trusting a certificate for the GCS hosts
    that is made now and written to `directory`/fake_gcs.pem."""
    certificate = Path(directory) / "fake_gcs.pem"
    key = Path(directory) / "fake_gcs.key"
    _write_certificate(certificate, key, [JSON_API_HOST, DOWNLOAD_HOST])
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(certificate, key)
    return {"https_proxy": self.url, "HTTPS_PROXY": self.url,
            "CURL_CA_BUNDLE": str(certificate),
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}


def _write_certificate(certificate: Path, key: Path, hosts: list[str]
                       ) -> None:
  """A self-signed certificate (PEM) valid for `hosts` for a day, and its
  private key."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
  private = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(private.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName(h) for h in hosts]), critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                         critical=True)
          .sign(private, hashes.SHA256()))
  certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  key.write_bytes(private.private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
      serialization.NoEncryption()))


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
