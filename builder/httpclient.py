"""The one HTTP session for what stackbuild fetches on the host: remote patches, sdists, the index.

One certificate policy (the bundle pip is configured with, else the system's, else requests'
own), one timeout, and retries with exponential backoff on connection errors and 5xx answers, so
a flaky mirror costs a pause, not a failed apply. The smoke client takes `local_session()`: the
same certificate policy, no retries, since it talks to a server whose slowness (and readiness, polled
under its own deadline) is what it measures.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

TIMEOUT = 120  # seconds to connect and between bytes; large sdists stream, so no total limit
RETRIES = Retry(total=4, connect=4, read=2, status=4, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504),
                allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False)


def pip_setting(name: str) -> str | None:
    """A pip setting as pip itself would see it: PIP_* environment first, then `pip config`."""
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        return env
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == name:
            found = value.strip().strip("'\"")  # later lines (more specific scopes) win, like pip
    return found


def ca_bundle() -> str | bool:
    """The CA bundle pip is configured with, else the system's, else requests' own."""
    for candidate in (os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE"), pip_setting("cert")):
        if candidate and os.path.isfile(candidate):
            return candidate
    return True


@functools.cache
def session() -> requests.Session:
    """Shared by every host download of this process (one connection pool per host)."""
    s = requests.Session()
    s.verify = ca_bundle()
    adapter = HTTPAdapter(max_retries=RETRIES)
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    return s


def local_session() -> requests.Session:
    """A session with the certificate policy and no retries: a backoff would skew timings and readiness deadlines."""
    s = requests.Session()
    s.verify = ca_bundle()
    return s


def get(url: str, *, stream: bool = False) -> requests.Response:
    """GET through the session; a final 4xx/5xx raises requests.HTTPError."""
    resp = session().get(url, stream=stream, timeout=TIMEOUT)
    resp.raise_for_status()
    return resp
