"""A run's folder, local or gs://: what a resumed run must find unchanged, and the lock that
keeps a second trainer out.

Data identity is by content: the checkpoint's metadata records `sources.fingerprint` of the
training images (`train_data`), and a resume compares that, not the source string (a trailing
slash or a symlink to the same folder is the same data; a folder that grew is not).
"""
from typing import Dict

from resnet_jax.errors import UserError


def check_data(workdir: str, step: int, stored: Dict, meta: Dict, allow_change: bool) -> bool:
    """Refuses (UserError) a resume whose training data differ from those that `stored` (the
    newest step's metadata) was trained on, unless `allow_change`; True if they differ.
    Steps saved before fingerprints were recorded pass."""
    before, now = stored.get("train_data"), meta.get("train_data")
    if not before or not now or before == now:
        return False
    if not allow_change:
        count = (f"{now['images']} images" if now["images"] != before["images"]
                 else "as many images with other content")
        raise UserError(f"workdir {workdir!r} (step {step}) was trained on other data: its "
                        f"training split had {before['images']} images, {meta.get('dataset')!r} "
                        f"has {count}; restore the data, choose another --workdir, or pass "
                        "--allow_config_change to resume on these")
    return True
