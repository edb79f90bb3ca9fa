"""In-process Google Cloud Storage emulator for tests.

Wraps `gcp-storage-emulator` (pure Python, GCS JSON API) so that gcsfs,
etils.epath, tensorstore and Orbax can use a ``gs://`` bucket served on
loopback, with no network and no credentials.

API
---
``running_gcs_emulator(bucket: str) -> Iterator[str]``
    Context manager.  Serves a fresh in-memory emulator on
    ``127.0.0.1:<free port>`` from a background thread, creates ``bucket``
    (must be a valid GCS name: 3+ chars, tensorstore checks), sets the
    environment variables below (previous values restored on exit),
    registers an anonymous plain gcsfs class for fsspec's ``gs``/``gcs``
    protocols and drops cached gcsfs / etils filesystem instances on entry
    and exit.  Yields ``http://127.0.0.1:<port>``.  On exit the server is shut
    down and its thread joined; all data is gone.  Nesting works (the inner
    one restores the outer one's env), but objects are per emulator.
``upload_dir(local_dir, gs_url) -> None``
    Uploads the *contents* of a local folder (e.g. an Orbax checkpoint saved
    to a temp dir) to ``gs://bucket/path`` with gcsfs
    ``put(local_dir + "/", path, recursive=True)``, through a fresh gcsfs
    instance, then calls ``reset_gcs_client_caches()``.
``gcs_filesystem() -> gcsfs.GCSFileSystem``
    A fresh (``skip_instance_cache=True``), anonymous, plain gcsfs
    filesystem with ``endpoint_url`` = the running emulator.
``reset_gcs_client_caches() -> None``
    Invalidates the directory-listing caches of cached gcsfs instances and
    drops them (fsspec's instance cache and the ``lru_cache`` in
    etils.epath's fsspec backend).  Call it after writing to the bucket with
    something other than that instance (e.g. tensorstore/Orbax) when a later
    gcsfs/epath listing in the same test must see the change.

Environment while the emulator runs
-----------------------------------
``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``     gcsfs (read on every
    request when the fs has no ``endpoint_url``), google-cloud-storage.
``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT``  tensorstore's gcs driver
    (read when a kvstore is opened), hence Orbax's array I/O.
``GOOGLE_AUTH_TOKEN_FOR_TESTING=dummy``             tensorstore sends this
    bearer token instead of searching for credentials.
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``         see below.
``NO_GCE_CHECK=true``                               gcsfs skips its "cloud"
    (GCE metadata) credential method for ``token=None`` filesystems.  (google-
    auth reads this one only at import, so it is mostly belt and braces.)

Findings with these versions (gcp-storage-emulator 2026.7.19, gcsfs
2026.10.1, fsspec 2026.9.0, tensorstore 0.1.86, orbax-checkpoint 0.12.8,
etils 1.15.0), each fixed or worked around here
---------------------------------------------------------------------
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is read once, when ``gcsfs`` is
  *imported*: unset/true makes ``gcsfs.GCSFileSystem`` the
  ``ExtendedGcsFileSystem``, which probes the bucket type over gRPC; with
  ``token='anon'`` that costs ~40-60 s per call (measured ~45 s for one
  ``ls``).  Setting it in a fixture is too late once gcsfs is imported, so
  importing this module (conftest does) sets it to ``false`` if gcsfs is
  not imported yet, and while an emulator runs fsspec's ``gs``/``gcs`` map
  to ``EmulatorGCSFileSystem`` (plain ``gcsfs.core.GCSFileSystem``,
  ``token='anon'`` by default, so etils.epath's ``fsspec.filesystem('gs')``
  neither probes nor searches for credentials).  Code that itself calls
  ``gcsfs.GCSFileSystem(token='anon')`` after gcsfs was imported with the
  flag on would still be slow.
* Caching: fsspec caches filesystem instances by constructor arguments and
  etils.epath keeps its own ``lru_cache`` of ``fsspec.filesystem('gs')``;
  every instance has a listing cache (``dircache``).  An instance without
  ``endpoint_url`` follows ``STORAGE_EMULATOR_HOST`` per request, so a stale
  one would reach a new emulator but with stale listings; hence the resets
  on entry/exit and after ``upload_dir``.
* Listing defect: ``objects.ls`` ignored
  ``startOffset``/``endOffset``.  Fixed here for any import order: the
  ``handlers.objects`` functions are replaced (before ``server`` is first
  imported, if it is not yet) *and* the references ``server.HANDLERS``
  bound at import are swapped in place.
* Generations: media downloads carried no
  ``x-goog-generation`` header and ``ifGeneration[Not]Match`` /
  ``ifMetageneration[Not]Match`` were ignored.  tensorstore then stamps
  every read with generation 0, and the next conditional re-read of that key
  fails client-side with "Malformed StorageGeneration".  So *reading* was
  what broke: ``PyTreeCheckpointer().restore(gs_path)`` without a target
  re-reads ``_sharding`` once per array and failed for any tree with 2+
  arrays (restoring without a target); direct Orbax *saves* to gs:// worked even
  unpatched, only because the preconditions were ignored.  This module adds
  the ``x-goog-generation``/``x-goog-metageneration``/
  ``x-goog-stored-content-length`` headers on reads and implements the four
  preconditions (412 / 304) on get, download, insert and delete.  With that,
  Orbax can both restore from and save *directly* to the emulated bucket
  (``PyTreeCheckpointer``, ``StandardCheckpointer``, ``CheckpointManager``
  incl. ``max_to_keep`` deletion); save-locally-then-``upload_dir`` still
  works and mirrors checkpoints produced elsewhere.  No special Orbax
  options are needed to restore from ``gs://``.
* Multipart uploads (gcsfs's simple uploads): the stock parser (the
  ``email`` package) dropped a final ``\r`` of the content, so a file whose
  last byte is 0x0D was stored one byte short (an Orbax data file, one time
  in 256, then failed to restore).  ``multipart/related`` bodies are split
  on their boundary here, byte-exact.
* Server: the stock ``Server`` runs a single-threaded ``HTTPServer``
  (backlog 5, stalls on an idle client).  Here the same request handler is
  served by a ``ThreadingHTTPServer`` (daemon threads, backlog 128, bound to
  port 0 so there is no free-port race) with one lock around request
  handling, because the emulator's storage is not thread-safe; a request's
  body is read before the lock is taken, so a client stopped mid-upload
  stalls no other.  Its 404
  ERROR logs are silenced while it runs; dropped client connections are
  not reported.
* Timing: starting/stopping an emulator takes a few ms; gcsfs calls ~1-5
  ms; a small Orbax save+upload+restore ~0.4 s; a 3-step CheckpointManager
  run ~1 s.  (The first ``import gcsfs`` costs ~0.5-2 s, once per process.)
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.message
import functools
import io
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from http import server as http_server

# Must happen before the first `import gcsfs` anywhere in the process (see
# module docstring); only touch it if gcsfs has not been imported yet.
if "gcsfs" not in sys.modules:
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

__all__ = [
    "gcs_filesystem",
    "reset_gcs_client_caches",
    "running_gcs_emulator",
    "upload_dir",
]

_LOCAL_HOST = "127.0.0.1"
_PATCH_MARK = "_gsm8k_jax_emulator_patch"  # on our wrapper functions
_REQUEST_MARK = "_gsm8k_jax_preconditions_checked"  # on emulator Requests


# --------------------------------------------------------------------------
# startOffset / endOffset support for objects.ls
# --------------------------------------------------------------------------


class _OffsetFilteredStorage:
    """Proxy for the emulator's Storage whose listing honours an offset range."""

    def __init__(self, storage, start: str | None, end: str | None):
        self._storage = storage
        self._start = start
        self._end = end

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def _in_range(self, name: str) -> bool:
        after_start = self._start is None or name >= self._start
        before_end = self._end is None or name < self._end
        return after_start and before_end

    def get_file_list(
        self,
        bucket_name,
        prefix=None,
        delimiter=None,
        match_glob=None,
        soft_deleted=False,
    ):
        # List without the delimiter, filter names by range, then group into
        # prefixes: a "folder" shows up iff one of its objects is in range.
        objs, _ = self._storage.get_file_list(
            bucket_name, prefix, None, match_glob, soft_deleted=soft_deleted
        )
        objs = [o for o in objs if self._in_range(o.get("name") or "")]
        if not delimiter:
            return objs, []
        plen = len(prefix or "")
        items, prefixes = [], set()
        for obj in objs:
            name = obj.get("name") or ""
            head, sep, _ = name[plen:].partition(delimiter)
            if sep:
                prefixes.add(name[:plen] + head + delimiter)
            else:
                items.append(obj)
        return items, sorted(prefixes)


def _first(query, key):
    values = query.get(key)
    return values[0] if values else None


def _ranged_ls(original):
    """objects.ls honouring startOffset (inclusive) / endOffset (exclusive)."""

    def ls(request, response, storage, *args, **kwargs):
        start = _first(request.query, "startOffset")
        end = _first(request.query, "endOffset")
        if start is not None or end is not None:
            storage = _OffsetFilteredStorage(storage, start, end)
        return original(request, response, storage, *args, **kwargs)

    return ls


# Query parameter -> (object field, passes(current_value, wanted)).
# A missing object has generation 0 (GCS: ifGenerationMatch=0 means "absent").
_PRECONDITIONS = {
    "ifGenerationMatch": ("generation", lambda cur, want: cur == want),
    "ifGenerationNotMatch": ("generation", lambda cur, want: cur != want),
    "ifMetagenerationMatch": ("metageneration", lambda cur, want: cur == want),
    "ifMetagenerationNotMatch": ("metageneration", lambda cur, want: cur != want),
}


def _current_object(request, storage):
    from gcp_storage_emulator.exceptions import NotFound

    params = request.params or {}
    bucket, name = params.get("bucket_name"), params.get("object_id")
    if name is None:  # uploads: /upload/storage/v1/b/{bucket}/o?name=...
        name = _first(request.query, "name")
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")
    if bucket is None or name is None:
        return None
    try:
        return storage.get_file_obj(bucket, name)
    except (NotFound, KeyError):
        return None


def _with_generations(original, *, is_read: bool):
    """Adds GCS generation preconditions (and, for reads, x-goog-* headers).

    The emulator ignores ifGeneration[Not]Match / ifMetageneration[Not]Match
    and sends no x-goog-generation header on media downloads; tensorstore then
    records generation 0, and its next conditional read of that key (any
    cached re-read, e.g. Orbax reading `_sharding` once per array) fails with
    "Malformed StorageGeneration".
    """
    from http import HTTPStatus

    def handler(request, response, storage, *args, **kwargs):
        if getattr(request, _REQUEST_MARK, False):  # get -> download re-entry
            return original(request, response, storage, *args, **kwargs)
        setattr(request, _REQUEST_MARK, True)
        obj = _current_object(request, storage)
        for param, (field, passes) in _PRECONDITIONS.items():
            want = _first(request.query, param)
            if want is None:
                continue
            cur = int(obj[field]) if obj is not None else 0
            if obj is None and is_read and param.endswith("NotMatch"):
                continue  # a read of a missing object is a 404, not a 304
            if not passes(cur, int(want)):
                if is_read and param.endswith("NotMatch"):
                    response.status = HTTPStatus.NOT_MODIFIED
                else:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json(
                        {"error": {"code": 412, "message": f"{param} failed"}}
                    )
                return None
        result = original(request, response, storage, *args, **kwargs)
        if is_read and obj is not None and response.status.value in (200, 206):
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            if obj.get("size") is not None:
                response["x-goog-stored-content-length"] = str(obj["size"])
        return result

    return handler


def _exact_multipart(original):
    """`server._read_data`, with `multipart/related` upload bodies split on
    their boundary instead of parsed by the `email` package."""
    from gcp_storage_emulator import server

    def read_data(request_handler, query):
        content_type = request_handler.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/related"):
            return original(request_handler, query)
        raw = server._decode_raw_data(
            server._read_raw_data(request_handler), request_handler
        )
        if not raw:
            return None
        message = email.message.Message()
        message["Content-Type"] = content_type
        delimiter = b"--" + message.get_param("boundary").encode()
        # [preamble, metadata part, content part, "--" epilogue]
        _, meta, content, *_ = raw.split(delimiter)

        def headers_and_body(part: bytes) -> tuple[email.message.Message, bytes]:
            # The writer's line break (gcsfs: "\n", RFC 2046: "\r\n") follows
            # the delimiter, ends the headers, and alone precedes the next one.
            newline = b"\r\n" if part.startswith(b"\r\n") else b"\n"
            head, _, body = part.removeprefix(newline).partition(newline * 2)
            return email.message_from_bytes(head), body.removesuffix(newline)

        _, meta_body = headers_and_body(meta)
        content_headers, body = headers_and_body(content)
        if content_headers.get("Content-Transfer-Encoding", "").lower() == "base64":
            body = base64.b64decode(body)
        return {
            "meta": json.loads(meta_body),
            "content": body,
            "content-type": content_headers.get_content_type(),
        }

    return read_data


def _patch_emulator() -> None:
    """Fixes the emulator's listing offsets and generation handling (idempotent).

    Replaces the handler functions in `gcp_storage_emulator.handlers.objects`
    (before the server module is imported, when it is not yet) and the copies
    `server.HANDLERS` bound at import time, in place.
    """
    from gcp_storage_emulator.handlers import objects

    wrappers = {
        "ls": _ranged_ls,
        "get": functools.partial(_with_generations, is_read=True),
        "download": functools.partial(_with_generations, is_read=True),
        "insert": functools.partial(_with_generations, is_read=False),
        "delete": functools.partial(_with_generations, is_read=False),
    }
    for name, make in wrappers.items():
        current = getattr(objects, name)
        if getattr(current, _PATCH_MARK, False):
            continue
        wrapped = functools.wraps(current)(make(current))
        setattr(wrapped, _PATCH_MARK, True)
        wrapped.__wrapped_original__ = current
        setattr(objects, name, wrapped)

    from gcp_storage_emulator import server

    if not getattr(server._read_data, _PATCH_MARK, False):
        exact = _exact_multipart(server._read_data)
        setattr(exact, _PATCH_MARK, True)
        server._read_data = exact

    originals = {}
    for name in wrappers:
        wrapped = getattr(objects, name)
        originals[id(wrapped.__wrapped_original__)] = wrapped
    for _regex, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if id(handler) in originals:
                methods[method] = originals[id(handler)]


# --------------------------------------------------------------------------
# Emulator server
# --------------------------------------------------------------------------


def _make_http_server(storage) -> http_server.ThreadingHTTPServer:
    from gcp_storage_emulator import server as emu_server

    lock = threading.Lock()

    class _Handler(emu_server.RequestHandler):
        def _route(self, method):
            """Handles a request under the lock, then sends the response
            after it: a client stopped mid-download stalls only itself."""
            self._read_body()
            client, self.wfile = self.wfile, io.BytesIO()
            try:
                with lock:  # the emulator's Storage is not thread-safe
                    emu_server.Router(self).handle(method)
            finally:
                response, self.wfile = self.wfile.getvalue(), client
            self.wfile.write(response)

        def _read_body(self):
            """Reads the whole request body before the lock is taken: a client
            stopped mid-upload (a test's SIGSTOP) then stalls only itself."""
            body = emu_server._read_raw_data(self)
            if body is None:
                return
            del self.headers["Transfer-Encoding"]
            del self.headers["Content-Length"]
            self.headers["Content-Length"] = str(len(body))
            self.rfile = io.BytesIO(body)

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def do_DELETE(self):
            self._route("DELETE")

        def do_PATCH(self):
            self._route("PATCH")

    class _Server(http_server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def handle_error(self, request, client_address):
            # Clients (tensorstore, aiohttp) may drop a connection early.
            if isinstance(sys.exc_info()[1], ConnectionError):
                return
            super().handle_error(request, client_address)

    return _Server((_LOCAL_HOST, 0), functools.partial(_Handler, storage))


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_EMULATOR_FS_CLASS = None


def _emulator_fs_class():
    """`gcsfs.core.GCSFileSystem` subclass defaulting to ``token='anon'``.

    The plain class, not gcsfs' ExtendedGcsFileSystem (no gRPC bucket-type
    probe); anonymous by default so that ``fsspec.filesystem('gs')`` (what
    etils.epath builds, with ``token=None``) does not search for Google
    credentials (ADC / GCE metadata server).
    """
    global _EMULATOR_FS_CLASS
    if _EMULATOR_FS_CLASS is None:
        import gcsfs.core

        class EmulatorGCSFileSystem(gcsfs.core.GCSFileSystem):
            def __init__(self, *args, token="anon", **kwargs):
                super().__init__(*args, token=token, **kwargs)

        EmulatorGCSFileSystem.__module__ = __name__
        _EMULATOR_FS_CLASS = EmulatorGCSFileSystem
    return _EMULATOR_FS_CLASS


def __getattr__(name):  # PEP 562: lazy, so importing this module stays cheap
    if name == "EmulatorGCSFileSystem":
        return _emulator_fs_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _emulator_gcsfs_for_fsspec() -> Iterator[None]:
    """Registers EmulatorGCSFileSystem for the fsspec ``gs``/``gcs`` protocols."""
    import importlib

    import fsspec

    # `fsspec.registry` the attribute is a mappingproxy; we need the module.
    fs_registry = importlib.import_module("fsspec.registry")

    saved = {p: fs_registry._registry.get(p) for p in ("gs", "gcs")}
    for p in saved:
        fsspec.register_implementation(p, _emulator_fs_class(), clobber=True)
    try:
        yield
    finally:
        for p, cls in saved.items():
            if cls is None:
                fs_registry._registry.pop(p, None)
            else:
                fs_registry._registry[p] = cls


@contextlib.contextmanager
def _quiet_emulator_logs() -> Iterator[None]:
    # The emulator logs every 404 (normal for exists() probes) at ERROR.
    levels = {
        "gcp_storage_emulator": logging.ERROR,
        "gcp_storage_emulator.storage": logging.CRITICAL,
    }
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def reset_gcs_client_caches() -> None:
    """Invalidates and drops cached gcsfs instances (fsspec and etils.epath)."""
    if "gcsfs" not in sys.modules:
        return
    import gcsfs.core

    classes = {gcsfs.core.GCSFileSystem}
    ext = sys.modules.get("gcsfs.extended_gcsfs")
    if ext is not None:
        classes.add(ext.ExtendedGcsFileSystem)
    if _EMULATOR_FS_CLASS is not None:
        classes.add(_EMULATOR_FS_CLASS)
    for cls in classes:
        for fs in list(getattr(cls, "_cache", {}).values()):
            with contextlib.suppress(Exception):
                fs.invalidate_cache()
        cls.clear_instance_cache()
    backend = sys.modules.get("etils.epath.backend")
    if backend is not None:
        get_fs = backend.fsspec_backend._get_filesystem
        if hasattr(get_fs, "cache_clear"):
            get_fs.cache_clear()


@contextlib.contextmanager
def running_gcs_emulator(bucket: str) -> Iterator[str]:
    """Runs an in-memory GCS emulator on loopback with `bucket` created.

    Yields the emulator's base url, ``http://127.0.0.1:PORT``.
    """
    _patch_emulator()
    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.storage import Storage

    storage = Storage(use_memory_fs=True)  # in memory: writes nothing to disk
    buckets.create_bucket(bucket, storage)
    httpd = _make_http_server(storage)
    host, port = httpd.server_address[:2]
    url = f"http://{host}:{port}"
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"gcs-emulator-{port}",
        daemon=True,
    )
    thread.start()
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
    }
    try:
        with _env(env), _emulator_gcsfs_for_fsspec(), _quiet_emulator_logs():
            reset_gcs_client_caches()
            try:
                yield url
            finally:
                reset_gcs_client_caches()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------
# Client helpers
# --------------------------------------------------------------------------


def gcs_filesystem():
    """A fresh anonymous gcsfs filesystem talking to the running emulator."""
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint:
        raise RuntimeError("no GCS emulator running (STORAGE_EMULATOR_HOST unset)")
    return _emulator_fs_class()(
        token="anon", endpoint_url=endpoint, skip_instance_cache=True
    )


def upload_dir(local_dir: str | os.PathLike, gs_url: str) -> None:
    """Uploads the contents of `local_dir` to `gs_url` (``gs://bucket/path``)."""
    local = os.fspath(local_dir).rstrip("/")
    if not os.path.isdir(local):
        raise NotADirectoryError(local)
    if not gs_url.startswith("gs://"):
        raise ValueError(f"expected a gs:// url, got {gs_url!r}")
    dest = gs_url[len("gs://") :].rstrip("/")
    fs = gcs_filesystem()
    # A trailing slash on the source copies its contents, not the folder itself.
    fs.put(local + "/", dest, recursive=True)
    reset_gcs_client_caches()
