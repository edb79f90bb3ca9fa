"""The GCS emulator harness (tests/gcs_emulator.py) works for gcsfs and Orbax."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from gcs_emulator import gcs_filesystem, running_gcs_emulator, upload_dir


def _bucket_name(gs_url: str) -> str:
    return gs_url[len("gs://") :].split("/", 1)[0]


def _raw_list(bucket: str, **params: str) -> dict:
    """objects.list straight against the emulator's JSON API."""
    base = os.environ["STORAGE_EMULATOR_HOST"]
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{base}/storage/v1/b/{bucket}/o?{query}") as r:
        return json.load(r)


def test_emulator_env_and_teardown():
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    with running_gcs_emulator("scratch-bucket") as url:
        assert url.startswith("http://127.0.0.1:")
        assert os.environ["STORAGE_EMULATOR_HOST"] == url
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == url
        assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] == "dummy"
        assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
        fs = gcs_filesystem()
        fs.pipe("scratch-bucket/x.txt", b"x")
        assert fs.cat("scratch-bucket/x.txt") == b"x"
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before
    port = url.rsplit(":", 1)[1]
    assert not [t for t in threading.enumerate() if t.name == f"gcs-emulator-{port}"]
    with pytest.raises(OSError):  # server is gone
        urllib.request.urlopen(url + "/", timeout=2)


def test_gcsfs_write_read_list_exists(gcs_bucket):
    fs = gcs_filesystem()
    root = f"{gcs_bucket}/gcsfs_basic"
    fs.pipe(f"{root}/a.txt", b"hello")
    with fs.open(f"{root}/sub/b.bin", "wb") as f:
        f.write(b"\x00\x01\x02")
    assert fs.cat(f"{root}/a.txt") == b"hello"
    assert fs.exists(f"{root}/a.txt")
    assert fs.exists(f"{root}/sub")
    assert not fs.exists(f"{root}/missing.txt")
    assert sorted(fs.ls(root, detail=False)) == [
        f"{root[len('gs://') :]}/a.txt",
        f"{root[len('gs://') :]}/sub",
    ]
    assert fs.find(root) == [
        f"{root[len('gs://') :]}/a.txt",
        f"{root[len('gs://') :]}/sub/b.bin",
    ]
    # etils.epath (what Orbax uses for path ops) sees the same objects.
    p = epath.Path(root)
    assert (p / "a.txt").read_bytes() == b"hello"
    assert sorted(c.name for c in p.iterdir()) == ["a.txt", "sub"]


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n", b"\r\r", b"x"])
def test_uploads_keep_every_byte(gcs_bucket, tmp_path, ending):
    """A last byte 0x0D was dropped by the stock multipart parser (an Orbax
    data file then failed to restore, one time in 256)."""
    fs = gcs_filesystem()
    data = bytes(range(256)) * 4 + ending
    fs.pipe(f"{gcs_bucket}/bytes/piped", data)
    (tmp_path / "file").write_bytes(data)
    fs.put(str(tmp_path / "file"), f"{gcs_bucket}/bytes/put")
    for name in ("piped", "put"):
        assert fs.cat_file(f"{gcs_bucket}/bytes/{name}") == data, name


def _emulator_address() -> tuple[str, int]:
    host, port = os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)
    return host.removeprefix("http://"), int(port)


def _another_client_writes(path: str) -> bool:
    """Whether another client writes `path` within 10 s (meanwhile a
    stalled one holds its connection open)."""
    result = []
    other = threading.Thread(
        target=lambda: result.append(gcs_filesystem().pipe(path, b"ok")),
        daemon=True,
    )
    other.start()
    other.join(10)
    return bool(result)


def test_a_client_stopped_mid_upload_stalls_no_other(gcs_bucket):
    """A process stopped while it uploads (the multi-host test's SIGSTOP)
    must not hold the emulator's lock: others read and write meanwhile."""
    bucket = gcs_bucket.removeprefix("gs://")
    with socket.create_connection(_emulator_address()) as stalled:
        stalled.sendall(
            f"POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name=stalled"
            " HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789".encode()
        )
        time.sleep(0.2)  # Its handler is now waiting for the other 90 bytes.
        other = f"{gcs_bucket}/stall/other"
        assert _another_client_writes(other), "it waited for the stopped upload"
    assert gcs_filesystem().cat_file(f"{gcs_bucket}/stall/other") == b"ok"


def test_a_client_stopped_mid_download_stalls_no_other(gcs_bucket):
    """A process stopped while it downloads more than the sockets buffer
    must not hold the emulator's lock either: its response is sent after
    the lock is released."""
    gcs_filesystem().pipe(f"{gcs_bucket}/stall/large", b"x" * (32 << 20))
    bucket = gcs_bucket.removeprefix("gs://")
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(_emulator_address())
        stalled.sendall(
            f"GET /storage/v1/b/{bucket}/o/stall%2Flarge?alt=media HTTP/1.1\r\n"
            "Host: x\r\n\r\n".encode()
        )
        time.sleep(0.5)  # Its handler has read the request; nothing reads back.
        other = f"{gcs_bucket}/stall/after_download"
        assert _another_client_writes(other), "it waited for the stopped download"
    assert gcs_filesystem().cat_file(f"{gcs_bucket}/stall/after_download") == b"ok"


def test_ranged_listing_honours_offsets(gcs_bucket):
    fs = gcs_filesystem()
    bucket = _bucket_name(gcs_bucket)
    prefix = "ranged/"
    for name in ["a", "b", "c", "d/1", "d/2", "e"]:
        fs.pipe(f"{gcs_bucket}/{prefix}{name}", name.encode())

    got = _raw_list(
        bucket, prefix=prefix, startOffset=f"{prefix}b", endOffset=f"{prefix}d/2"
    )
    assert [o["name"] for o in got["items"]] == [
        f"{prefix}{n}" for n in ["b", "c", "d/1"]
    ]

    got = _raw_list(bucket, prefix=prefix, startOffset=f"{prefix}d")
    assert [o["name"] for o in got["items"]] == [
        f"{prefix}{n}" for n in ["d/1", "d/2", "e"]
    ]

    got = _raw_list(bucket, prefix=prefix, endOffset=f"{prefix}b")
    assert [o["name"] for o in got["items"]] == [f"{prefix}a"]

    got = _raw_list(bucket, prefix=prefix, delimiter="/", startOffset=f"{prefix}c")
    assert [o["name"] for o in got["items"]] == [f"{prefix}c", f"{prefix}e"]
    assert got["prefixes"] == [f"{prefix}d/"]

    # Unranged listings are untouched.
    got = _raw_list(bucket, prefix=prefix)
    assert len(got["items"]) == 6

    # tensorstore (the client that relies on ranges) lists and deletes ranges.
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix}).result()
    keys = kv.list(ts.KvStore.KeyRange("b", "d/2")).result()
    assert [k.decode() for k in keys] == ["b", "c", "d/1"]
    kv.delete_range(ts.KvStore.KeyRange("b", "c")).result()
    remaining = sorted(kv.list().result())
    assert [k.decode() for k in remaining] == ["a", "c", "d/1", "d/2", "e"]


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_orbax_checkpoint_uploaded_then_restored_from_gcs(gcs_bucket, tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "layers": {
            "0": {
                "attn": {
                    "q_einsum": {
                        "w_lora_a": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
                        "w_lora_b": jnp.asarray(rng.normal(size=(8, 2)), jnp.bfloat16),
                    }
                }
            }
        },
        "step": jnp.asarray(5, jnp.int32),
    }
    local = tmp_path / "model_params"
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(local, tree)

    run = f"{gcs_bucket}/run"
    remote = f"{run}/actor/5/model_params"
    upload_dir(local, remote)

    fs = gcs_filesystem()
    assert [os.path.basename(p) for p in fs.ls(f"{run}/actor", detail=False)] == ["5"]
    assert [p.name for p in epath.Path(f"{run}/actor").iterdir()] == ["5"]
    assert fs.exists(f"{remote}/_METADATA") or fs.exists(
        f"{remote}/_CHECKPOINT_METADATA"
    )

    restored = ocp.PyTreeCheckpointer().restore(remote)
    want = tree["layers"]["0"]["attn"]["q_einsum"]
    got = restored["layers"]["0"]["attn"]["q_einsum"]
    for key in want:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    assert int(restored["step"]) == 5

    # StandardCheckpointer with an abstract target also restores from gs://.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored2 = ocp.StandardCheckpointer().restore(remote, abstract)
    np.testing.assert_array_equal(
        np.asarray(restored2["layers"]["0"]["attn"]["q_einsum"]["w_lora_a"]),
        np.asarray(want["w_lora_a"]),
    )


def test_orbax_writes_directly_to_gcs(gcs_bucket):
    """With the harness' generation shim Orbax can also save straight to gs://."""
    tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3)}
    root = f"{gcs_bucket}/direct/actor"
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(root, options=options) as mngr:
        for step in range(3):
            mngr.save(step, args=ocp.args.StandardSave(tree))
            mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
        restored = mngr.restore(2, args=ocp.args.StandardRestore(tree))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
    fs = gcs_filesystem()
    assert sorted(os.path.basename(p) for p in fs.ls(root, detail=False)) == ["1", "2"]


def test_generation_preconditions(gcs_bucket):
    """ifGenerationMatch / ifGenerationNotMatch, as tensorstore uses them."""
    import tensorstore as ts

    kv = ts.KvStore.open(f"{gcs_bucket}/gen/").result()
    missing = kv.read("k").result()
    assert missing.state == "missing"
    no_value = missing.stamp.generation
    # Create-if-absent succeeds once (GCS: ifGenerationMatch=0) ...
    stamp = kv.write("k", b"v1", if_equal=no_value).result()
    assert stamp.generation != b""
    # ... and then fails: an empty (unknown) generation, nothing written.
    assert kv.write("k", b"v2", if_equal=no_value).result().generation == b""
    read = kv.read("k").result()
    assert read.value == b"v1" and read.stamp.generation == stamp.generation
    # Unchanged since `stamp`: the conditional read reports "unspecified" (304).
    assert kv.read("k", if_not_equal=stamp.generation).result().state == "unspecified"
    # Write-if-unchanged succeeds; with a stale generation it fails.
    stamp3 = kv.write("k", b"v3", if_equal=stamp.generation).result()
    assert stamp3.generation not in (b"", stamp.generation)
    assert kv.write("k", b"v4", if_equal=stamp.generation).result().generation == b""
    assert kv.read("k").result().value == b"v3"
