"""Where a job's checkpoints and final model live: a directory, or an fsspec URL.

`checkpoints.storage` is either a path (this node's disk, or a shared filesystem mounted at
the same place on every node) or a URL of any filesystem fsspec knows (s3://, gs://,
az://, ...). The job's files then sit under `<storage>/<job id>/`:

    checkpoints/checkpoint-<step>/   resumable: weights, optimizer, scheduler, RNG, state
    final/                           the trained model as a plain Hugging Face directory

With a path, the training core writes there directly and renames each finished checkpoint
into place (`workers.training.AtomicCheckpoints`). With a URL, the node-local artifact dir
is only a staging area: every rank writes its part of a checkpoint there and uploads it,
and rank 0 registers the checkpoint in the store once every upload finished. Object stores
have no atomic rename, so the store's row, written last, is what makes a checkpoint count;
`is_complete_checkpoint` only confirms the files are still there.

Credentials and endpoints come from each filesystem's own configuration on every node and
on the control plane (for s3fs: the AWS_* environment variables, a profile or an instance
role), never from the job spec, which is stored and shown to every user.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
STAGING_DIR = ".partial"  # inside the local checkpoints dir: checkpoints being written
RESUME_DIR = ".resume"  # inside the local artifact dir: checkpoints fetched from a URL

_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URL or a path."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    # Object-store clients cache listings per process; other ranks and the control plane
    # write and delete under the same prefixes, so a cached listing may be stale.
    fs.invalidate_cache(root)
    return fs, root


def list_files(location: str | Path) -> dict[str, int]:
    """Every file under `location`, relative name -> size; {} when nothing is there."""
    if not is_url(location):
        root = Path(location)
        if not root.is_dir():
            return {}
        return {p.relative_to(root).as_posix(): p.stat().st_size
                for p in root.rglob("*") if p.is_file()}
    fs, key = _filesystem(str(location))
    if not fs.exists(key):
        return {}
    found = fs.find(key, detail=True)
    prefix = key.rstrip("/") + "/"
    return {name[len(prefix):]: int(info.get("size") or 0)
            for name, info in found.items() if name.startswith(prefix)}


def is_complete_checkpoint(location: str | Path) -> bool:
    """The weights and trainer_state.json (which the Trainer writes last) are there."""
    names = list_files(location)
    has_weights = any(n in _WEIGHT_NAMES or n.endswith(".safetensors") for n in names)
    return has_weights and "trainer_state.json" in names


def size_bytes(location: str | Path) -> int:
    return sum(list_files(location).values())


def upload(local_dir: Path, url: str) -> int:
    """Copy every file under `local_dir` to the same relative names under `url`; files
    already there under other names stay (each rank uploads its own part of a checkpoint
    into one prefix). Returns the number of files copied."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file()) if local_dir.is_dir() else []
    if not files:
        return 0
    fs, root = _filesystem(url)
    # One call with both lists: fsspec copies them concurrently (s3fs: multipart for big ones).
    fs.put([str(p) for p in files],
           [f"{root.rstrip('/')}/{p.relative_to(local_dir).as_posix()}" for p in files])
    return len(files)


def download(url: str, local_dir: Path) -> Path:
    """Copy everything under `url` into `local_dir` (emptied first); returns `local_dir`."""
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    names = sorted(list_files(url))
    if not names:
        raise FileNotFoundError(f"nothing at {url}")
    fs, root = _filesystem(url)
    targets = [local_dir / name for name in names]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    fs.get([f"{root.rstrip('/')}/{name}" for name in names], [str(t) for t in targets])
    return local_dir


def remove(location: str | Path) -> None:
    """Delete a checkpoint (or any artifact directory); nothing there is fine."""
    if not is_url(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, root = _filesystem(str(location))
    if fs.exists(root):
        fs.rm(root, recursive=True)


class LinkRefused(ValueError):
    """A symbolic link where a job's files go: refused, never followed."""


def refuse_links(directory: str | Path) -> None:
    """Refuse a job's directory that is, or holds anywhere under it, a symbolic link.

    orch makes a job's directory itself (0700, at submit) and never puts a link in it, so a
    link there was planted: following it would write checkpoints (or read a resume
    checkpoint) wherever it points. The worker checks before it reads the directory and
    before each checkpoint and the final model are written."""
    directory = str(directory)
    if os.path.islink(directory):
        raise LinkRefused(f"the job directory {directory} is a symbolic link; orch never "
                          "follows one there (remove it)")
    for parent, dirs, files in os.walk(directory):  # does not descend into linked dirs
        for name in (*dirs, *files):
            path = os.path.join(parent, name)
            if os.path.islink(path):
                raise LinkRefused(f"{path} is a symbolic link inside the job directory; "
                                  "orch never follows one there (remove it)")


def check_reachable(url: str) -> str | None:
    """Why `url` cannot be used as checkpoint storage from here, or None. Cheap: the
    filesystem's package imports and the bucket (the URL's first component) exists."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        return f"{protocol}:// needs a filesystem package that is not installed here ({exc})"
    try:
        fs, root = _filesystem(url)
        bucket = root.split("/", 1)[0]
        if not fs.exists(bucket):
            return f"{protocol}://{bucket} does not exist or is not visible with this machine's credentials"
    except Exception as exc:  # every filesystem raises its own kinds: all mean "not usable"
        return f"cannot reach {url}: {type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class JobArtifacts:
    """Where one job's files go. `local_dir` is on the node doing the work (staging, logs,
    and with a path storage everything); `url` is set when an object store holds the
    checkpoints and the final model."""

    local_dir: Path
    url: str | None = None

    @property
    def root(self) -> str:
        return self.url or str(self.local_dir)

    def checkpoint(self, step: int) -> str:
        return join(self.root, CHECKPOINTS_DIR, f"checkpoint-{step}")

    @property
    def final(self) -> str:
        return join(self.root, FINAL_DIR)


def job_artifacts(storage: str | None, job_id: int, artifact_dir: str | Path) -> JobArtifacts:
    """A job's artifact locations from its spec's `checkpoints.storage`, id and local dir."""
    if storage and is_url(storage):
        return JobArtifacts(Path(artifact_dir), f"{storage.rstrip('/')}/{job_id}")
    return JobArtifacts(Path(artifact_dir))
