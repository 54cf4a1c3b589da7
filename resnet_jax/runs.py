"""`RUN=LABEL` on the command lines of analyze and plots: one rule, here.

A spec that exists as a path (a local path or a URL such as gs://...) is that path, unlabelled,
whatever `=` it holds (`/runs/lr=0.1`). Otherwise the label follows the *last* `=`
(`/runs/lr=0.1=LR 0.1`), so a path with `=` in it can always be labelled; a spec whose path
part does not exist either is left for the caller to report.
"""
from typing import Tuple

from etils import epath


def split_label(spec: str) -> Tuple[str, str]:
    """'PATH=LABEL' -> (PATH, LABEL); an existing path or a spec without '=' -> (spec, '')."""
    if "=" not in spec or _exists(spec):
        return spec, ""
    path, _, label = spec.rpartition("=")
    return path, label


def _exists(path: str) -> bool:
    try:
        return epath.Path(path).exists()
    except Exception:  # a malformed URL or an unreachable bucket: not an existing path
        return False
