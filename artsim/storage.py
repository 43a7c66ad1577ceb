"""Every location is a URI: a local path, ``file://...`` or ``s3://bucket/prefix``.

Writes are atomic for readers:
- a single file is written under a temporary name next to its target and then moved into place (on S3 a PUT is
  already all-or-nothing, so the object is written directly);
- a dataset directory (many Parquet files) counts as complete only when its ``_SUCCESS`` marker exists. The marker
  is removed before a directory is rewritten and written last; :meth:`Storage.read_table` refuses a directory
  without it. Locally the directory is also staged under a temporary name and renamed into place.

Ray and pyarrow ignore files whose names start with ``_`` or ``.``, so the marker never reaches a reader as data.
Worker processes rebuild a :class:`Storage` from the (picklable) :class:`StorageConfig`; nothing here is global.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from artsim.config import StorageConfig
from artsim.errors import ArtsimError

SUCCESS = "_SUCCESS"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``/`` separators, whatever the OS)."""
    out = uri.rstrip("/")
    for part in parts:
        if part:
            out = posixpath.join(out, part.strip("/"))
    return out


def strip_scheme(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    for scheme in ("s3://", "s3a://"):
        if uri.startswith(scheme):
            return uri[len(scheme):]
    return uri


class Storage:
    """Filesystem access for one run: resolves URIs and performs atomic writes."""

    def __init__(self, config: Optional[StorageConfig] = None):
        self.config = config or StorageConfig()
        self._fs_cache: dict[str, Any] = {}

    # -- filesystems ---------------------------------------------------------------------------------------------
    def s3_endpoint(self) -> Optional[str]:
        return self.config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path inside it."""
        if is_s3(uri):
            if "s3" not in self._fs_cache:
                endpoint = self.s3_endpoint()
                kwargs: dict[str, Any] = {}
                if endpoint:
                    kwargs["client_kwargs"] = {"endpoint_url": endpoint}
                    kwargs["endpoint_url"] = endpoint
                import s3fs

                # skip_instance_cache: each Storage owns its client (tests restart endpoints; no global state).
                self._fs_cache["s3"] = s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
            return self._fs_cache["s3"], strip_scheme(uri)
        if "file" not in self._fs_cache:
            self._fs_cache["file"] = fsspec.filesystem("file")
        return self._fs_cache["file"], os.path.abspath(strip_scheme(uri))

    def arrow_fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem for ``uri`` (for Ray Data and pyarrow.dataset) and the path inside it."""
        if is_s3(uri):
            endpoint = self.s3_endpoint()
            kwargs: dict[str, Any] = {}
            if endpoint:
                kwargs["endpoint_override"] = endpoint
                if endpoint.startswith("http://"):
                    kwargs["scheme"] = "http"
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            if region:
                kwargs["region"] = region
            return pafs.S3FileSystem(**kwargs), strip_scheme(uri)
        return pafs.LocalFileSystem(), os.path.abspath(strip_scheme(uri))

    # -- small files ---------------------------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return fs.exists(path)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ArtsimError(f"{uri}: not found") from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        try:
            return json.loads(self.read_text(uri))
        except json.JSONDecodeError as exc:
            raise ArtsimError(f"{uri}: not valid JSON: {exc}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a file so that no reader ever sees it half-written."""
        fs, path = self.fs(uri)
        if is_s3(uri):
            fs.pipe_file(path, data)  # an S3 PUT is atomic
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def upload_file(self, local_path: str, uri: str) -> None:
        """Copy a local file to ``uri`` atomically."""
        fs, path = self.fs(uri)
        if is_s3(uri):
            fs.put_file(local_path, path)
            return
        with open(local_path, "rb") as f:
            self.write_bytes(uri, f.read())

    def download_file(self, uri: str, local_path: str) -> None:
        fs, path = self.fs(uri)
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        tmp = f"{local_path}.tmp-{uuid.uuid4().hex}"
        fs.get_file(path, tmp)
        os.replace(tmp, local_path)

    def list(self, uri: str) -> list[str]:
        """Names (not paths) of the entries directly under ``uri``; empty when it does not exist."""
        fs, path = self.fs(uri)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def delete(self, uri: str) -> None:
        fs, path = self.fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    # -- datasets (directories of Parquet files) -----------------------------------------------------------------
    def is_complete(self, uri: str) -> bool:
        return self.exists(join(uri, SUCCESS))

    @contextlib.contextmanager
    def atomic_dir(self, uri: str) -> Iterator[str]:
        """Stage a dataset directory; yields the URI to write into. On success it becomes ``uri`` with a marker.

        Locally the staging directory is renamed into place (the old version disappears in one step). On S3 the
        old marker is removed first, files are written in place and the marker is written last.
        """
        if is_s3(uri):
            fs, path = self.fs(uri)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            yield uri
            self.write_bytes(join(uri, SUCCESS), b"")
            return
        final = os.path.abspath(strip_scheme(uri))
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex}")
        os.makedirs(staging)
        try:
            yield staging
            with open(os.path.join(staging, SUCCESS), "wb"):
                pass
            old = None
            if os.path.exists(final):
                old = os.path.join(parent, f".{os.path.basename(final)}.old-{uuid.uuid4().hex}")
                os.replace(final, old)
            os.replace(staging, final)
            if old:
                _rmtree(old)
        finally:
            if os.path.exists(staging):
                _rmtree(staging)

    def write_table(self, table: pa.Table, uri: str, rows_per_file: int = 1_000_000) -> None:
        """Write ``table`` as a complete Parquet dataset directory at ``uri`` (atomically, see above)."""
        with self.atomic_dir(uri) as staging:
            n = max(1, -(-table.num_rows // rows_per_file))
            for i in range(n):
                part = table.slice(i * rows_per_file, rows_per_file)
                self.write_parquet_file(part, join(staging, f"part-{i:05d}.parquet"))

    def write_parquet_file(self, table: pa.Table, uri: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(uri, buf.getvalue())

    def read_table(self, uri: str, columns: Optional[list[str]] = None, require_complete: bool = True) -> pa.Table:
        """Read a Parquet dataset directory (only if complete) or a single Parquet file."""
        fs, path = self.arrow_fs(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ArtsimError(f"{uri}: not found (has the stage that writes it run?)")
        if info.type == pafs.FileType.Directory and require_complete and not self.is_complete(uri):
            raise ArtsimError(f"{uri}: incomplete output (no {SUCCESS} marker); re-run the stage that writes it")
        import pyarrow.dataset as ds

        dataset = ds.dataset(path, filesystem=fs, format="parquet")
        return dataset.to_table(columns=columns)

    def parquet_files(self, uri: str) -> list[str]:
        """URIs of the Parquet files of a dataset directory, sorted."""
        return [join(uri, n) for n in self.list(uri) if n.endswith(".parquet") and not n.startswith((".", "_"))]

    def dataset_files(self, uri: str) -> list[str]:
        """The Parquet files of a complete dataset directory (name order), or the file itself; like read_table, a
        missing or incomplete directory is an error. With iter_batches: how stages stream an input of any size."""
        fs, path = self.arrow_fs(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ArtsimError(f"{uri}: not found (has the stage that writes it run?)")
        if info.type == pafs.FileType.File:
            return [uri]
        if not self.is_complete(uri):
            raise ArtsimError(f"{uri}: incomplete output (no {SUCCESS} marker); re-run the stage that writes it")
        return sorted(self.parquet_files(uri))

    def iter_batches(self, file_uri: str, columns: Optional[list[str]] = None,
                     batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Record batches of one Parquet file, only ``columns`` (those of them it has; all when None). Pages are
        streamed (a row group is never read whole), so memory is about one batch."""
        fs, path = self.arrow_fs(file_uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle, buffer_size=1 << 20)
            names = parquet.schema_arrow.names
            cols = None if columns is None else [c for c in columns if c in names]
            yield from parquet.iter_batches(batch_size=batch_rows, columns=cols)


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
