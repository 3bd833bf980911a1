"""``gs://`` URLs served from a local folder, so tests can run a training job on a bucket workdir.

    from _local_gcs import install; install("/tmp/root")   # gs://bucket/run -> /tmp/root/bucket/run

Each library that writes a workdir keeps its own ``gs://`` code path and gets a local stand-in at
its storage boundary, the way it would reach Cloud Storage:

- ``etils.epath`` (config.json, sample PNGs, grain's iterator state, Orbax's step folders and
  metadata) through fsspec: the ``gs``/``gcs`` protocol becomes a folder-backed file system that,
  like gcsfs, names files ``bucket/path`` without the scheme;
- Orbax's arrays through TensorStore: the kvstore spec of a ``gs://`` path (normally the ``gcs``
  driver) becomes the ``file`` driver on the same folder, and the bucket is a flat-namespace one;
- tensorboardX's event files: its ``gs`` writer factory writes the folder.

So Orbax still takes its Cloud Storage branches (no atomic rename: a ``commit_success.txt`` marks
finished steps) and the trainer sees only URLs. What the stand-ins cannot show is the real service:
credentials, latency, eventual listing; those are left to a real bucket.
"""

from __future__ import annotations

import os
import pathlib


def install(root: str | os.PathLike) -> None:
    """Serves ``gs://<bucket>/<path>`` from ``<root>/<bucket>/<path>`` in this process."""
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.path import gcs_utils
    from tensorboardX import record_writer

    root = pathlib.Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    def local(url: str) -> str:
        url = os.fspath(url)
        for scheme in ("gs://", "gcs://"):
            if url.startswith(scheme):
                return str(root / url[len(scheme) :])
        raise ValueError(f"not a gs:// URL: {url}")

    class LocalBucketFileSystem(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):  # gcsfs's options (finalize_on_close, ...) ignored
            del args, kwargs
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, LocalBucketFileSystem, clobber=True)

    gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file", "path": local(path)}
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False

    class LocalEventFiles:
        def open(self, path: str):
            target = pathlib.Path(local(path))
            target.parent.mkdir(parents=True, exist_ok=True)
            return open(target, "wb")  # noqa: SIM115 - tensorboardX closes it

        def directory_check(self, path: str) -> None:
            pathlib.Path(local(path)).mkdir(parents=True, exist_ok=True)

    record_writer.register_writer_factory("gs", LocalEventFiles())
