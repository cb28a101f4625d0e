"""A local Google Cloud Storage that TensorFlow's gs:// filesystem talks to, for tests.

gcp-storage-emulator serves the GCS JSON API over plain HTTP on 127.0.0.1.
TensorFlow's gs:// filesystem has its endpoints compiled in
(https://www.googleapis.com, https://storage.googleapis.com) and no emulator
switch, but it goes through `https_proxy` and trusts `CURL_CA_BUNDLE`. So a
small proxy on 127.0.0.1 accepts the CONNECT, terminates TLS with a certificate
from a throwaway CA (trustme), and forwards each request to the emulator. On the
way it
  - sends each body with a Content-Length, de-chunked (some emulator releases
    store a chunked body verbatim, chunk sizes included);
  - answers `Expect: 100-continue`, which curl sends before large uploads;
  - turns the emulator's http:// Location headers (resumable uploads) back
    into https://, so the upload's next request comes through the proxy too.
The emulator runs in the test's process, with two fixes: it fails on an empty
media upload (`makedirs` writes one), reading the missing body as None; and it
ignores `ifGenerationMatch` on uploads and deletes, which the model_dir lease
relies on (412 when the object's generation differs; 0: it must not exist).
"""

import http
import http.client
import os
import socketserver
import ssl
import threading

import trustme
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as emulator_objects

from helpers import free_ports

PUBLIC_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te",
              "upgrade", "content-length"}


def _read_headers(stream) -> tuple[str, list[tuple[str, str]]]:
  request_line = stream.readline().decode("latin-1").rstrip("\r\n")
  headers = []
  while True:
    line = stream.readline().decode("latin-1").rstrip("\r\n")
    if not line:
      return request_line, headers
    name, _, value = line.partition(":")
    headers.append((name.strip(), value.strip()))


def _read_body(stream, headers) -> bytes:
  values = {name.lower(): value for name, value in headers}
  if values.get("transfer-encoding", "").lower() == "chunked":
    body = bytearray()
    while True:
      size = int(stream.readline().split(b";")[0].strip(), 16)
      if size == 0:
        while stream.readline() not in (b"\r\n", b"\n", b""):  # trailers
          pass
        return bytes(body)
      body += stream.read(size)
      stream.readline()
  return stream.read(int(values.get("content-length", 0)))


class _ProxyHandler(socketserver.StreamRequestHandler):

  def handle(self):
    request_line, _ = _read_headers(self.rfile)
    if not request_line.startswith("CONNECT "):
      self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
      return
    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    self.wfile.flush()
    with self.server.tls.wrap_socket(self.connection, server_side=True) as tls:
      stream = tls.makefile("rwb")
      while self._forward_one(stream):
        pass

  def _forward_one(self, stream) -> bool:
    request_line, headers = _read_headers(stream)
    if not request_line:
      return False
    method, path, _ = request_line.split(" ", 2)
    if any(n.lower() == "expect" and v.lower() == "100-continue" for n, v in headers):
      stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
      stream.flush()
    body = _read_body(stream, headers)
    upstream = http.client.HTTPConnection("127.0.0.1", self.server.emulator_port, timeout=60)
    upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
      if name.lower() not in HOP_BY_HOP:
        upstream.putheader(name, value)
    upstream.putheader("Content-Length", str(len(body)))
    upstream.endheaders(body)
    response = upstream.getresponse()
    payload = response.read()
    upstream.close()
    out = [f"HTTP/1.1 {response.status} {response.reason}"]
    for name, value in response.getheaders():
      if name.lower() in HOP_BY_HOP:
        continue
      if name.lower() == "location" and value.startswith("http://"):
        value = "https://" + value[len("http://"):]
      out.append(f"{name}: {value}")
    out.append(f"Content-Length: {len(payload)}")
    stream.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
    if method != "HEAD":
      stream.write(payload)
    stream.flush()
    return True


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True


class GcsEmulator:
  """The emulator and its TLS proxy on 127.0.0.1, with `bucket` created.

  `env` is what a process needs to reach it: TensorFlow through the proxy, the
  google-cloud-storage client through STORAGE_EMULATOR_HOST."""

  def __init__(self, directory: str, bucket: str = "ham10000-test"):
    self.bucket = bucket
    self.emulator_port, = free_ports(1)
    _accept_empty_media_uploads()
    _honour_generation_preconditions()
    self._emulator = emulator_server.create_server("127.0.0.1", self.emulator_port, in_memory=True,
                                                   default_bucket=bucket)
    self._emulator.start()

    ca = trustme.CA()
    self.ca_file = os.path.join(directory, "gcs_test_ca.pem")
    ca.cert_pem.write_to_path(self.ca_file)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*PUBLIC_HOSTS).configure_cert(tls)
    self._proxy = _Proxy(("127.0.0.1", 0), _ProxyHandler)
    self._proxy.tls, self._proxy.emulator_port = tls, self.emulator_port
    self.proxy_port = self._proxy.server_address[1]
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()

  @property
  def env(self) -> dict[str, str]:
    return {
        "https_proxy": f"http://127.0.0.1:{self.proxy_port}",
        "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy_port}",
        "no_proxy": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": self.ca_file,
        # TensorFlow: a fixed bearer token instead of asking the GCE metadata server.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
        "NO_GCE_CHECK": "true",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.emulator_port}",
    }

  def url(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  def stop(self):
    self._proxy.shutdown()
    self._proxy.server_close()
    self._emulator.stop()


def _honour_generation_preconditions():
  if getattr(emulator_objects.insert, "honours_preconditions", False):
    return
  insert, delete = emulator_objects.insert, emulator_objects.delete

  def failed(request, response, storage, name) -> bool:
    expected = request.query.get("ifGenerationMatch")
    if not expected or name is None:
      return False
    try:
      generation = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
    except NotFound:
      generation = "0"
    if generation == expected[0]:
      return False
    response.status = http.HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
    return True

  def checked_insert(request, response, storage, *args, **kwargs):
    name = request.query["name"][0] if "name" in request.query else None
    if name is None and request.query.get("uploadType") == ["multipart"]:
      name = request.data["meta"].get("name")
    if not failed(request, response, storage, name):
      insert(request, response, storage, *args, **kwargs)

  def checked_delete(request, response, storage, *args, **kwargs):
    if not failed(request, response, storage, request.params["object_id"]):
      delete(request, response, storage, *args, **kwargs)

  checked_insert.honours_preconditions = True
  emulator_objects.insert = checked_insert  # the router's fallback for uploads looks it up here
  for _, handlers in emulator_server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is insert:
        handlers[method] = checked_insert
      elif handler is delete:
        handlers[method] = checked_delete


def _accept_empty_media_uploads():
  read_data = emulator_server._read_data  # pylint: disable=protected-access
  if getattr(read_data, "accepts_empty_media_uploads", False):
    return

  def _read_data(request_handler, query):
    data = read_data(request_handler, query)
    return b"" if data is None and query.get("uploadType") == ["media"] else data

  _read_data.accepts_empty_media_uploads = True
  emulator_server._read_data = _read_data  # pylint: disable=protected-access
