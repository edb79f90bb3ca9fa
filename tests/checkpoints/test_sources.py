"""Where base weights come from: local folders, gs:// and the hub (errors)."""

import concurrent.futures
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import gcs_filesystem, reset_gcs_client_caches, upload_dir
from huggingface_hub import errors

from gsm8k_jax.checkpoints import sources
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.models.specs import TINY_MODEL_DIR


def test_missing_local_folder_is_clear(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.resolve_model_dir(tmp_path / "no-such-model")


def test_a_file_given_as_the_model_folder_is_clear(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(sources.SourceError, match="README.md is a file"):
        sources.resolve_model_dir(tmp_path / "README.md")


def test_a_model_folder_without_its_tokenizer_is_refused(tmp_path):
    """Weights copied without tokenizer files: transformers would load a
    tokenizer of a few tokens and every answer would be noise."""
    folder = tmp_path / "weights-only"
    shutil.copytree(TINY_MODEL_DIR, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(sources.SourceError, match="holds no tokenizer"):
        load_pretrained("gemma3-tiny", folder)


def test_a_folder_given_as_the_model_name_points_to_model_path():
    with pytest.raises(ValueError, match="folder or gs:// path goes in model_path"):
        load_pretrained(str(TINY_MODEL_DIR))


def test_hf_folder_on_gcs_loads_like_the_local_one(tmp_path, gcs_bucket, monkeypatch):
    monkeypatch.setenv("GSM8K_JAX_CACHE", str(tmp_path / "cache"))
    url = f"{gcs_bucket}/sources/gemma3-tiny"
    upload_dir(TINY_MODEL_DIR, url)
    remote_model, remote_tok, remote_dir = load_pretrained(
        "gemma3-tiny", url, dtype="float32"
    )
    local_model, local_tok, _ = load_pretrained("gemma3-tiny", dtype="float32")
    assert remote_dir.is_relative_to(tmp_path / "cache")
    ids = jnp.asarray([remote_tok.encode("Janet has 16 eggs.")])
    positions, valid = jnp.arange(ids.shape[1])[None], jnp.ones(ids.shape, bool)
    np.testing.assert_array_equal(
        remote_model.logits(remote_model(ids, positions, valid)[0]),
        local_model.logits(local_model(ids, positions, valid)[0]),
    )
    assert remote_tok.chat_template == local_tok.chat_template


def test_gcs_copy_follows_the_bucket(gcs_bucket, tmp_path, monkeypatch):
    """A file rewritten with the same size is copied again, a file removed
    from the bucket leaves the copy, and the model's revision follows."""
    monkeypatch.setenv("GSM8K_JAX_CACHE", str(tmp_path / "cache"))
    url = f"{gcs_bucket}/sources/changing"
    fs = gcs_filesystem()
    fs.pipe(f"{url}/config.json", b'{"a": 1}')
    fs.pipe(f"{url}/model-00002.safetensors", b"old shard")
    first = sources.resolve_model_dir(url)
    revision = sources._revision(first)
    fs.pipe(f"{url}/config.json", b'{"a": 2}')  # Same size, new content.
    fs.rm(f"{url}/model-00002.safetensors")
    reset_gcs_client_caches()
    second = sources.resolve_model_dir(url)
    assert second == first
    assert (second / "config.json").read_bytes() == b'{"a": 2}'
    assert not (second / "model-00002.safetensors").exists()
    assert sources._revision(second) != revision
    # Unchanged objects are not copied again.
    (second / "config.json").write_bytes(b'{"a": 9}')
    sources.resolve_model_dir(url)
    assert (second / "config.json").read_bytes() == b'{"a": 9}'


def test_empty_gcs_folder_is_clear(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GSM8K_JAX_CACHE", str(tmp_path))
    with pytest.raises(sources.SourceError, match="empty or does not exist"):
        sources.resolve_model_dir(f"{gcs_bucket}/sources/nothing-here")


class _FakeResponse:
    """Just enough of an HTTP response for huggingface_hub's error classes."""

    headers: dict = {}
    request = None


@pytest.mark.parametrize(
    "error, token, message",
    [
        (errors.GatedRepoError, None, "gated model and HF_TOKEN is not set"),
        (errors.GatedRepoError, "hf_x", "has no access: accept the licence"),
        (errors.RepositoryNotFoundError, None, "neither a local folder nor a model"),
        (errors.LocalEntryNotFoundError, None, "hub is unreachable"),
    ],
)
def test_hub_errors_are_clear(monkeypatch, error, token, message):
    def fail(*args, **kwargs):
        if error is errors.LocalEntryNotFoundError:  # Its message spans lines.
            raise error("An error happened.\nCannot find the files offline.")
        raise error("denied", response=_FakeResponse())

    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(sources.SourceError, match=message) as info:
        sources.resolve_model_dir("google/gemma-3-1b-it")
    assert not token or token not in str(info.value)  # never echo credentials
    assert "\n" not in str(info.value)


def test_local_folder_is_used_in_place(tmp_path):
    shutil.copytree(TINY_MODEL_DIR, tmp_path / "m")
    assert sources.resolve_model_dir(tmp_path / "m") == tmp_path / "m"


def test_model_revision_names_the_weights_whoever_computes_it(tmp_path, monkeypatch):
    """The same files give the same revision wherever they are, one changed
    weight byte another; started in the background (to overlap loading)
    or not, and from several threads at once, it is computed once."""
    copies = [tmp_path / name for name in ("a", "b", "changed")]
    for copy in copies:
        shutil.copytree(TINY_MODEL_DIR, copy)
    weights = next(copies[2].glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))

    hashed = []
    revision = sources._revision
    monkeypatch.setattr(
        sources, "_revision", lambda path: hashed.append(path) or revision(path)
    )
    sources.start_model_revision(copies[0])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        seen = set(pool.map(sources.model_revision, [copies[0]] * 4))
    a, b, changed = (sources.model_revision(c) for c in copies)
    assert seen == {a} and a == b != changed and a.startswith("sha256:")
    assert hashed == copies
    snapshot = tmp_path / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert sources.model_revision(snapshot) == "hf:0123abc"


def test_model_revision_errors_reach_the_caller(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").mkdir()  # unreadable as a file
    sources.start_model_revision(folder)
    with pytest.raises(IsADirectoryError):
        sources.model_revision(folder)
