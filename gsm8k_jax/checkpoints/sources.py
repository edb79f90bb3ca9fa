"""Where base weights come from: a local folder, `gs://`, or the Hugging Face hub.

Every source ends as a local Hugging Face folder (config.json, safetensors,
tokenizer files) that `load_hf_model` and `AutoTokenizer` read. Credentials
come from the environment (HF_TOKEN; Google application-default credentials)
and are never logged.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from gsm8k_jax.storage import filesystem, gcs_bucket, is_gcs, write_atomic

# Only what a Gemma 3 text evaluation needs from a model repository.
HF_FILE_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
)


class SourceError(RuntimeError):
    """A model source cannot be found or read."""


def cache_dir() -> Path:
    """The package's local cache folder ($GSM8K_JAX_CACHE, else
    ~/.cache/gsm8k_jax): copies of remote folders, compiled programs."""
    default = Path.home() / ".cache" / "gsm8k_jax"
    return Path(os.environ.get("GSM8K_JAX_CACHE", default))


# Beside a gs:// folder's cached copy: each file's object version when copied.
_VERSIONS_FILE = ".gsm8k_jax_versions"  # Not *.json: outside the model's revision.
_LOCK_FILE = ".gsm8k_jax_lock"


def _object_version(info: dict[str, Any]) -> str:
    """What changes whenever a Cloud Storage object is rewritten: its
    generation (else its checksum): a re-exported file of the same size must
    not be taken for the cached one."""
    for key in ("generation", "md5Hash", "crc32c", "etag"):
        if info.get(key):
            return f"{key}:{info[key]}"
    return f"size:{info['size']}"


def download_gcs_folder(url: str) -> Path:
    """Copies a gs:// folder into the local cache: files whose object version
    changed since they were copied are copied again, and files no longer in
    the bucket are removed, so the copy always equals the folder."""
    fs, prefix = filesystem(url)
    try:
        listing = fs.find(prefix, detail=True)
    except Exception as e:  # gcsfs raises several types for auth/network errors.
        raise SourceError(
            f"Cannot read {url} ({type(e).__name__}: {_one_line(e)}). Check that bucket"
            f" '{gcs_bucket(url)}' exists and that credentials are set up"
            " (`gcloud auth application-default login`, or"
            " GOOGLE_APPLICATION_CREDENTIALS)."
        ) from e
    prefix = prefix.rstrip("/")
    remote = {
        name[len(prefix) :].lstrip("/"): _object_version(info)
        for name, info in listing.items()
        if not name.endswith("/") and info.get("type") != "directory"
    }
    if not remote:
        raise SourceError(f"{url} is empty or does not exist.")
    target = cache_dir() / "gcs" / prefix
    target.mkdir(parents=True, exist_ok=True)
    # One process at a time per folder: another's partial files are not stale.
    with open(target / _LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _sync(fs, prefix, remote, target)
    return target


def _sync(fs: Any, prefix: str, remote: dict[str, str], target: Path) -> None:
    """Makes `target` hold exactly the `remote` files (path -> object version)
    under the bucket `prefix`, copying only those whose version changed."""
    versions_path = target / _VERSIONS_FILE
    try:
        copied = json.loads(versions_path.read_text())
    except (OSError, ValueError):
        copied = {}
    for stale in [p for p in target.rglob("*") if p.is_file()]:
        rel = stale.relative_to(target).as_posix()
        if stale.name not in (_VERSIONS_FILE, _LOCK_FILE) and rel not in remote:
            stale.unlink()
            copied.pop(rel, None)
    for rel, version in sorted(remote.items()):
        local = target / rel
        if local.exists() and copied.get(rel) == version:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.part")
        fs.get(f"{prefix}/{rel}", str(partial))
        partial.replace(local)
        copied[rel] = version
        write_atomic(versions_path, json.dumps(copied, indent=1, sort_keys=True))


def _one_line(error: BaseException) -> str:
    """Another library's message, which may span lines, as one line."""
    return " ".join(str(error).split())


def download_hub_model(repo_id: str) -> Path:
    """Downloads a hub model's config, weights and tokenizer (HF_TOKEN for gated models)."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id,
                allow_patterns=list(HF_FILE_PATTERNS),
                token=os.environ.get("HF_TOKEN"),
            )
        )
    except errors.GatedRepoError as e:
        hint = (
            "HF_TOKEN is not set: create a token at huggingface.co/settings/tokens"
            if not os.environ.get("HF_TOKEN")
            else "your HF_TOKEN has no access: accept the licence on the model page"
        )
        raise SourceError(f"{repo_id} is a gated model and {hint}.") from e
    except errors.RepositoryNotFoundError as e:
        raise SourceError(
            f"{repo_id} is neither a local folder nor a model on the Hugging Face hub"
            " (or it is private and HF_TOKEN is missing)."
        ) from e
    except (errors.LocalEntryNotFoundError, OSError) as e:
        raise SourceError(
            f"Could not download {repo_id}: the hub is unreachable and no cached copy"
            f" exists ({_one_line(e)}). Pass a local folder or gs:// path with"
            " --model.model_path."
        ) from e


_revisions: dict[Path, concurrent.futures.Future[str]] = {}
_revisions_lock = threading.Lock()


def start_model_revision(model_dir: str | os.PathLike) -> None:
    """Starts `model_revision` in a background thread, so that hashing the
    weights overlaps loading them (hashlib releases the GIL); the first call
    of `model_revision` then waits for it."""
    path = Path(model_dir)
    with _revisions_lock:
        if path not in _revisions:
            future: concurrent.futures.Future[str] = concurrent.futures.Future()
            _revisions[path] = future
            # A daemon thread, not an executor's (joined at exit): an
            # interrupted run need not wait for a large folder's hash.
            threading.Thread(
                target=_settle, args=(future, path), name="model_revision", daemon=True
            ).start()


def model_revision(model_dir: str | os.PathLike) -> str:
    """What identifies a model folder's weights: the hub commit of a hub
    snapshot (`hf:<commit>`), else `sha256:` of its config, weights and
    tokenizer files (read once per process)."""
    start_model_revision(model_dir)
    return _revisions[Path(model_dir)].result()


def _settle(future: concurrent.futures.Future[str], path: Path) -> None:
    try:
        future.set_result(_revision(path))
    except BaseException as e:  # Raised again by model_revision, in its caller.
        future.set_exception(e)


def _revision(path: Path) -> str:
    if path.parent.name == "snapshots":
        return f"hf:{path.name}"
    digest = hashlib.sha256()
    for pattern in HF_FILE_PATTERNS:
        for file in sorted(path.glob(pattern)):
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """Returns a local folder for a local path, a gs:// folder or a hub id."""
    text = str(source)
    if is_gcs(text):
        return download_gcs_folder(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(
            f"{text} is a file: pass the model's folder (config.json and"
            " *.safetensors), a gs:// folder, or a hub id like google/gemma-3-1b-it."
        )
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_like_path:
        raise SourceError(
            f"Model folder {text} does not exist (expected a folder with config.json"
            " and *.safetensors, a gs:// folder, or a hub id like google/gemma-3-1b-it)."
        )
    return download_hub_model(text)
