"""A local Cloud Storage for the tests: `python tests/gcs_emulator.py BUCKET` serves
gcp-storage-emulator on 127.0.0.1, in memory, with BUCKET created, on a free port that it prints
on its first line of stdout; it runs until killed.

One fix to the emulator: its object downloads lack the `x-goog-generation` header that Cloud
Storage sends. TensorStore (orbax's array writer) takes a read's generation from that header and
uses it as the precondition of its next write of the same object; without it the generation reads
as 0 and that write fails with "Malformed StorageGeneration" (OCDBT rewrites its manifest that
way, so a checkpoint's second write into a step fails). The fix adds the header from the object's
own record, as Cloud Storage does.
"""
import functools
import sys
import threading


def _with_generation(download):
    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return wrapped


def patch_downloads() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    original = objects.download
    fixed = _with_generation(original)
    objects.download = fixed  # objects.get (alt=media) calls it by this name
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = fixed


def main(bucket: str) -> None:
    from gcp_storage_emulator.server import create_server
    patch_downloads()
    emulator = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    emulator.start()
    print(emulator._api._httpd.server_address[1], flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1])
