"""``metactr data download NAME``: fetch an official archive, verify it, extract it atomically.

Verification: every digest known for the archive must match. GroupLens publishes an MD5 beside
each MovieLens archive (``ml-1m.zip.md5``), which is pinned here; a SHA-256 can be pinned with
``--sha256`` (or in ``SOURCES``). The SHA-256 of what was downloaded is always computed and
recorded in ``<dest>/<name>/.download.json`` so a later run can pin it. The archive is extracted
into a temporary folder and renamed into place: a failed or interrupted download leaves nothing.
Avazu and Amazon need an account or a form: we print where to get them.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from metactr.errors import ConfigError, DataError, OfflineError
from metactr.utils import atomic_path, check_out_dir, write_json_atomic, write_marker


@dataclass(frozen=True)
class Source:
    url: str
    required: tuple[str, ...]
    digests: dict = field(default_factory=dict)  # algorithm -> hex digest


SOURCES: dict[str, Source] = {
    "ml-1m": Source("https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                    ("ratings.dat", "users.dat", "movies.dat"),
                    {"md5": "c4d9eecfca2ab87c1945afe126590906"}),
    "ml-100k": Source("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                      ("u.data", "u.user", "u.item"),
                      {"md5": "0e33842e24a9c977be4e0107933c0723"}),
    # the CSV releases (``movielens`` / ``movielens-csv`` readers); their MD5s are not pinned here:
    # pass --sha256 to pin one (the SHA-256 of what was fetched is recorded in .download.json)
    "ml-latest-small": Source("https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
                              ("ratings.csv", "movies.csv")),
    "ml-25m": Source("https://files.grouplens.org/datasets/movielens/ml-25m.zip", ("ratings.csv", "movies.csv")),
    "ml-32m": Source("https://files.grouplens.org/datasets/movielens/ml-32m.zip", ("ratings.csv", "movies.csv")),
    "book-crossing": Source("http://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip",
                            ("BX-Book-Ratings.csv", "BX-Users.csv", "BX-Books.csv")),
}

WHERE = {
    "avazu": "Avazu needs a Kaggle account: download train.gz from "
             "https://www.kaggle.com/c/avazu-ctr-prediction/data, gunzip it to train.csv, then "
             "`metactr data prepare --dataset avazu --data-dir <folder with train.csv> ...`",
    "amazon": "Amazon reviews: download a ratings-only CSV (user,item,rating,timestamp), e.g. "
              "ratings_Electronics.csv from https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html "
              "(or the 2018 release at https://nijianmo.github.io/amazon/), optionally its meta_*.json, "
              "into one folder, then `metactr data prepare --dataset amazon --data-dir <folder> ...`",
}

Fetch = Callable[[str, Path], None]


def _urllib_fetch(url: str, dst: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(dst, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        host = urllib.parse.urlparse(url).netloc or url
        raise OfflineError(f"cannot download ({' '.join(str(reason).split())}); are you offline? "
                           f"Download it by hand from {host} and unpack it into the destination",
                           path=url) from None


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, digests: dict) -> dict:
    """Check every given digest; returns the computed ones (sha256 always)."""
    got = {alg: file_digest(path, alg) for alg in set(digests) | {"sha256"}}
    for alg, want in digests.items():
        if want and got[alg].lower() != want.lower():
            raise DataError(f"{alg} mismatch: expected {want}, got {got[alg]} (corrupt or changed download)",
                            path=path, field=alg)
    return got


def extract_zip(archive: Path, final: Path, required: tuple[str, ...]) -> Path:
    """Extract ``archive`` so that ``required`` files end up directly in ``final`` (atomically)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError("not a valid zip archive", path=archive) from None
    with zf, atomic_path(final, is_dir=True) as tmp:
        for m in zf.namelist():
            if m.startswith("/") or ".." in Path(m).parts:
                raise DataError(f"unsafe path in archive: {m}", path=archive)
        zf.extractall(tmp)
        # the files may sit in a top folder (ml-1m/ratings.dat): lift them up
        hits = list(tmp.rglob(required[0]))
        if not hits:
            raise DataError(f"archive lacks {required[0]}", path=archive)
        inner = hits[0].parent
        if inner != tmp:
            for p in list(inner.iterdir()):
                p.rename(tmp / p.name)
        for r in required:
            if not (tmp / r).is_file():
                raise DataError(f"archive lacks {r}", path=archive)
    return final


def download_dataset(name: str, dest: str | Path, *, url: str | None = None, sha256: str | None = None,
                     fetch: Fetch | None = None, echo: Callable[[str], None] = print) -> Path | None:
    """Download ``name`` into ``dest/name``; returns that folder (None for print-only datasets)."""
    if name in WHERE:
        echo(WHERE[name])
        return None
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset '{name}' (downloadable: {', '.join(SOURCES)}; "
                          f"instructions: {', '.join(WHERE)})", field="name")
    src = SOURCES[name]
    final = Path(dest) / name
    if final.is_dir() and all((final / r).is_file() for r in src.required):
        echo(f"{name} already present at {final}")
        return final
    if not (final / ".download.json").is_file():  # an earlier, interrupted download of ours may be replaced
        check_out_dir(final, what=f"{name} download")  # a folder of the user's is never replaced
    digests = dict(src.digests)
    if sha256:
        digests["sha256"] = sha256
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}.dl.") as td:
        archive = Path(td) / "archive.zip"
        (fetch or _urllib_fetch)(url or src.url, archive)
        got = verify(archive, digests)
        extract_zip(archive, final, src.required)
    write_json_atomic(final / ".download.json", {"url": url or src.url, **got})
    write_marker(final, what=f"{name} download", command=f"metactr data download {name}")
    return final
