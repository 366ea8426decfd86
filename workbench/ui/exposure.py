"""What the app allows when it is reachable beyond this machine (``--host`` not loopback, or ``--share``).

On loopback the visitor is the operator: any path typed into the form is theirs to read. Exposed,
a visitor could type ``/etc/shadow`` as the calibration text or a home folder as the model, and
error messages would tell them which files exist. So, exposed: file paths in the form must lie
under folders the operator names (``--allow-path``; none named, no paths at all: the built-in
texts, the embedded model and hub ids still work), and errors shown in the page carry no paths.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import SETTINGS
from ..data import BUILTIN_TEXTS
from ..errors import WorkbenchError
from ..models.loading import EMBEDDED

PATH_FIELDS = ("model", "calib", "eval_text")
_PATH = re.compile(r"(?<![\w.:])(?:~|/)[^\s'\"]+")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` as Gradio's ``auth`` pair (the password may hold colons)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise WorkbenchError("--auth must be USER:PASSWORD with both parts non-empty, e.g. --auth alice:s3cret")
    return user, password


def exposure_warnings(host: str, share: bool, auth: bool, roots: tuple) -> list[str]:
    """What the operator should know before the app is served; empty on loopback without a share link."""
    out = []
    if not is_loopback(host):
        out.append(f"serving on {host}: anyone who can reach this machine's port can use the app"
                   + ("" if auth else " (no --auth USER:PASSWORD given)"))
    if share:
        out.append("--share opens a public gradio.live link: anyone with the link can use the app"
                   + ("" if auth else " (no --auth USER:PASSWORD given)"))
    if out:
        out.append("file paths typed into the form are limited to "
                   + (", ".join(map(str, roots)) if roots else "none (no --allow-path given)")
                   + "; errors shown in the page leave paths out")
    return out


def _looks_like_path(name: str, value: str) -> bool:
    if name == "model":
        return value not in EMBEDDED and (value.startswith(("/", "~", ".")) or Path(value).expanduser().exists())
    return value not in BUILTIN_TEXTS and not value.startswith("hf:")


@dataclass
class Exposure:
    public: bool = False
    roots: tuple[Path, ...] = ()

    def configure(self, public: bool, roots=()):
        self.public = public
        self.roots = tuple(Path(r).expanduser().resolve() for r in roots)

    def check(self, cfg, face: str = "app"):
        """Refuse a path outside the allowed roots in ``cfg``'s path fields (exposed only)."""
        if not self.public:
            return cfg
        builtin = f"the built-in names ({', '.join([*EMBEDDED, *BUILTIN_TEXTS])})"
        for name in PATH_FIELDS:
            value = getattr(cfg, name)
            if _looks_like_path(name, value):
                self.check_path(value, SETTINGS[name].who(face), builtin, f"{builtin} work everywhere")
        return cfg

    def check_path(self, value: str, who: str, use: str, elsewhere: str):
        """Refuse the file path ``value`` of the field ``who`` outside the allowed roots (exposed only).
        ``use`` names what takes no path, ``elsewhere`` says it works anywhere."""
        if not self.public:
            return
        where = Path(value).expanduser().resolve()
        if any(where == r or r in where.parents for r in self.roots):
            return
        if not self.roots:
            raise WorkbenchError(f"{who} cannot be a file path on this server (it takes none); use {use}")
        raise WorkbenchError(f"{who} must lie under the folders the operator allowed; {elsewhere}")

    def scrub(self, text: str) -> str:
        """``text`` without file-system paths, when exposed."""
        if not self.public:
            return text
        return _PATH.sub("<path>", text.replace(os.path.expanduser("~"), "~"))


EXPOSURE = Exposure()
