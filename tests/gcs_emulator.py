"""Starts `gcp-storage-emulator` (in memory) for tests: `python -m tests.gcs_emulator PORT BUCKET`.

One shim: real GCS sends an object's generation with its bytes (the
`x-goog-generation` header); the emulator sends it only in the JSON metadata.
tensorstore (orbax's array writes, its OCDBT manifests) reads the header, so
the emulator's object downloads are given it here.
"""

from __future__ import annotations

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  # not found: the handler answers
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # before the server module binds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: int, bucket: str) -> None:
    create_server("localhost", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
