"""The files the tools read and write, local or in Cloud Storage (gs://, any URL etils.epath
opens): one place that names them, reads and writes them whole, and checks before a run starts
that its outputs can be written (`check_writable`).

Object storage has no append and no rename: an object appears whole when its write ends, so a
remote file is written in one piece, and a local one through a temporary file and a rename,
which gives readers the same guarantee.
"""
import importlib
import os
import re
import uuid
from typing import List, Sequence, Union

from etils import epath

from resnet_jax.errors import UserError, first_line

GCS_INSTALL = "pip install 'resnet-jax[gcs]' (gcsfs and google-cloud-storage)"


def _no_listing_cache() -> None:
    """gcsfs remembers a folder's listing until it writes there itself; checkpoint steps are
    written by TensorStore and by other processes, so a remembered listing misses steps (a reader
    then restores an older one). Every listing asks the bucket instead."""
    import fsspec.config
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_no_listing_cache()


def cache_dir(*parts: str) -> str:
    """The package's own cache on this machine (built kernels, decoded folder splits, compiled
    steps): $RESNET_JAX_CACHE, by default ~/.cache/resnet_jax, joined with `parts`."""
    root = os.environ.get("RESNET_JAX_CACHE", os.path.expanduser("~/.cache/resnet_jax"))
    return os.path.join(root, *parts)


def is_remote(path) -> bool:
    return "://" in str(path)


# 'gs:/bucket/x': a URL that os.path.join/normpath/abspath cut to one slash, which would
# otherwise be written as a local folder `gs:` under the working directory.
_MANGLED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)")


def _local(p) -> str:
    """A local path made absolute; a URL cut to one slash is refused (UserError)."""
    p = os.fspath(p)
    if _MANGLED_URL.match(p):
        raise UserError(f"{p!r} looks like a URL with one slash after its scheme; write "
                        f"{p.replace(':/', '://', 1)!r} (or ./{p} for a local folder)")
    return os.path.abspath(p)


def path(p) -> epath.Path:
    """Local paths made absolute; gs:// and other URLs left as they are."""
    return epath.Path(str(p) if is_remote(p) else _local(p))


def read_bytes(p) -> bytes:
    """A whole file's bytes, local or gs://."""
    return path(p).read_bytes()


def stamps(folder: str, paths: Sequence[str]) -> List[str]:
    """A stamp of each file of `paths` (all under `folder`) that changes whenever its bytes do,
    read without reading them. Locally (size, inode, ctime in ns): no copy (cp -p, rsync -a,
    tar) can set a ctime, as it can the modification time, and writing the bytes changes it;
    on gs://, each object's size, generation and checksums, from one listing of `folder`.
    FileNotFoundError for a file that is gone (or a broken link)."""
    if not is_remote(folder):
        return [f"{st.st_size}:{st.st_ino}:{st.st_ctime_ns}" for st in map(os.stat, paths)]
    import fsspec
    fs, root = fsspec.core.url_to_fs(str(folder))
    listing = fs.find(root, detail=True)
    out = []
    for p in paths:
        info = listing.get(fsspec.core.strip_protocol(str(p)))
        if info is None:
            raise FileNotFoundError(2, "No such file or directory", str(p))
        out.append(":".join(str(info.get(k)) for k in ("size", "generation", "crc32c", "md5Hash")))
    return out


def write(p, data: Union[str, bytes]) -> None:
    """Write a whole file so that no reader ever sees part of it (a local temporary file beside
    it and a rename; one object write on gs://). A local file gets the mode open() gives a new
    file (0o666 less the umask), as every other output has."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(p):
        target = path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    p = _local(p)
    directory = os.path.dirname(p)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")  # not mkstemp: its mode is 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise


def upload(local_dir: str, out: str) -> None:
    """Each file of `local_dir` (written in full beforehand) into the folder `out`, replacing
    files of the same names."""
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            write(os.path.join(str(out), name), f.read())


def check_writable(p, flag: str = "--workdir", *, file: bool = False) -> None:
    """Before anything is loaded or compiled, one UserError naming the fix unless `p` can be
    written as a folder (or with `file`, as a file): locally, `p` is not of the other kind, and
    the nearest folder that exists on its way takes a file (a probe, removed; nothing is
    created); on gs://, gcsfs, credentials, an existing bucket and the right to write there."""
    if is_remote(p):
        return _check_bucket(str(p).rstrip("/").rpartition("/")[0] if file else str(p), flag)
    target = _local(p)
    if file and os.path.isdir(target):
        raise UserError(f"{flag} {p!r} is a directory; name a file, e.g. "
                        f"{os.path.join(p, 'result.json')}")
    if not file and os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"{flag} {p!r} is a file; name a directory")
    _check_folder(p, os.path.dirname(target) if file else target, flag)


def _check_folder(p, folder: str, flag: str) -> None:
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {p!r} lies under the file {folder!r}; name a path in a folder")
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write in {flag} {p!r} ({e.strerror or e}); choose a writable "
                        "folder") from None


def _check_bucket(url: str, flag: str) -> None:
    if not url.startswith("gs://"):
        return
    try:
        importlib.import_module("gcsfs")  # etils.epath opens gs:// through it
    except ImportError:
        raise UserError(f"{flag} {url} is in Cloud Storage, which needs gcsfs (not installed); "
                        f"{GCS_INSTALL}") from None
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        _check_credentials(url, flag)
    bucket = url[len("gs://"):].split("/")[0]
    probe = path(url) / f".write-test-{os.getpid()}"
    try:
        probe.write_text("x")
        probe.unlink()
    except FileNotFoundError:
        raise UserError(f"{flag} {url}: bucket gs://{bucket} does not exist (or is not visible "
                        f"to your account); create it (gcloud storage buckets create "
                        f"gs://{bucket}) or fix the name") from None
    except Exception as e:  # gcsfs: OSError('Forbidden ...') for 403, HttpError for 401
        raise UserError(f"{flag} {url}: cannot write there ({first_line(e)}); give your account "
                        f"roles/storage.objectAdmin on gs://{bucket} (see docs/tpu.md)") from None


def _check_credentials(url: str, flag: str) -> None:
    try:
        import google.auth
        google.auth.default()
    except Exception as e:  # DefaultCredentialsError, or google-auth missing
        raise UserError(f"{flag} {url}: no Google Cloud credentials ({first_line(e)}); run "
                        "`gcloud auth application-default login`, or set "
                        "GOOGLE_APPLICATION_CREDENTIALS to a service account's key file") from None
