"""What ``pixelwise serve`` may accept and who may call it (no web imports, so the CLI and the tests
can build one cheaply)."""

from __future__ import annotations

import errno
import ipaddress
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from pixelwise.errors import UserError

API_KEY_ENV = "PIXELWISE_API_KEY"  # the environment variable that --api-key defaults to
MB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Limits and switches of one server.

    max_upload_bytes: the largest request body (all multipart parts together); larger: 413.
    max_pixels: the largest image (width x height, read from the header before decoding); larger: 413.
    workers: predictions that run at once (threads; 1 uses every core through torch).
    queue: requests that may wait for a worker; beyond ``workers + queue`` the server answers 503.
    api_key: when set, every ``/api/`` route needs it (``X-API-Key`` or ``Authorization: Bearer``).
    cors_origins: origins allowed to call the API from their pages (none: no CORS headers at all).
    keep_uploads: a folder to save each upload in, as received; None keeps uploads in memory only.
    samples_dir: a folder of sample images (and ``masks/<stem>.png`` ground truths) for the page,
      instead of the bundled synthetic scenes.
    samples_truth_format: how those masks store classes, as ``/api/predict``'s ``truth_format``:
      ``classes`` (class ids, or the palette's colours) or ``dataset`` (the training dataset's own
      label files, such as ADE20K annotations or ISBI's 0/255 labels).
    uncertainty_samples: Monte-Carlo dropout samples behind the uncertainty map of a model with
      dropout (as ``pixelwise predict --uncertainty``); 0: the entropy of its class probabilities,
      unsampled (as ``pixelwise predict --mc-samples 0 --uncertainty``).
    upload_timeout: seconds a request may take to send its body (it holds a place in the queue
      meanwhile); slower: 408.
    predict_timeout: seconds a prediction may run (from when a worker takes it), None for no limit;
      longer: stopped at its next model batch and answered 504, so a request for many small tiles
      cannot hold a worker for hours.
    """

    max_upload_bytes: int = 20 * MB
    max_pixels: int = 40_000_000
    workers: int = 1
    queue: int = 64
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    keep_uploads: Path | None = None
    samples_dir: Path | None = None
    samples_truth_format: str = "classes"
    uncertainty_samples: int = 8
    upload_timeout: float = 120.0
    predict_timeout: float | None = 300.0

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1024:
            raise UserError(f"the upload limit (--max-upload-mb) must be at least 1 KB, got {self.max_upload_bytes} "
                            "bytes")
        if self.max_pixels < 1:
            raise UserError(f"--max-pixels must be a positive number of pixels, got {self.max_pixels}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.queue < 0:
            raise UserError(f"--queue must be 0 or more, got {self.queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty; give a non-empty --api-key or unset " + API_KEY_ENV)
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            raise UserError("the API key (--api-key or " + API_KEY_ENV + ") must be printable ASCII: it travels in "
                            "an HTTP header, where clients cannot agree on other characters")
        if self.uncertainty_samples < 0:
            raise UserError(f"uncertainty samples must be 0 or more, got {self.uncertainty_samples}")
        if self.predict_timeout is not None and not 0 < self.predict_timeout < math.inf:
            raise UserError(f"--timeout must be a positive number of seconds (0 for no limit), got "
                            f"{self.predict_timeout}")
        if not self.upload_timeout > 0:
            raise UserError(f"the upload timeout must be positive, got {self.upload_timeout}")
        if self.samples_dir is not None and not Path(self.samples_dir).is_dir():
            raise UserError(f"--samples {self.samples_dir}: not a folder")
        if self.samples_truth_format not in ("classes", "dataset"):
            raise UserError(f"--samples-truth-format must be classes or dataset, got {self.samples_truth_format!r}")
        if self.keep_uploads is not None and Path(self.keep_uploads).exists() and not Path(self.keep_uploads).is_dir():
            raise UserError(f"--keep-uploads {self.keep_uploads} is a file; give a folder to save the uploads in")
        for origin in self.cors_origins:  # a browser's Origin header is scheme://host[:port], compared as text
            if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", origin):
                raise UserError(f"--cors {origin!r} is not an origin, which no browser's page would ever match; give "
                                "it as the browser sends it: scheme://host[:port], no path nor trailing /, e.g. "
                                "https://example.org")
        if self.keep_uploads is not None and self.samples_dir is not None:
            # the samples are the images in the folder and its masks/: an upload kept there would be
            # offered to every visitor as a sample at the next start
            samples = Path(self.samples_dir).expanduser().resolve()
            if Path(self.keep_uploads).expanduser().resolve() in (samples, samples / "masks"):
                raise UserError(f"--keep-uploads {self.keep_uploads} is the --samples folder {self.samples_dir} (or "
                                "its masks/), where a kept upload would be offered to every visitor as a sample; "
                                "give another folder")


def check_can_listen(host: str, port: int) -> None:
    """Before the model is loaded: ``host`` is an address of this machine and ``port`` is free
    there (a one-line UserError otherwise; uvicorn would say so only after the start-up banner,
    and exit with status 3)."""
    if not host.strip():
        raise UserError("--host is empty; give an address to listen on, such as 127.0.0.1 (this machine only) "
                        "or 0.0.0.0 (every interface)")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address or a name this machine can resolve ({e}); give an "
                        "address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port} is in use on {host} (another server?); choose another --port") \
                    from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host} is not an address of this machine; give one of its addresses, "
                                "127.0.0.1 or 0.0.0.0") from None
            if e.errno == errno.EACCES:
                raise UserError(f"--port {port}: no permission to listen on it (ports below 1024 need privileges); "
                                "choose a port of 1024 or more") from None
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; check --host and --port") from None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed when the server listens beyond loopback, or None."""
    if is_loopback(host):
        return None
    who = "anyone who can reach this machine" if host in ("0.0.0.0", "::") else f"anyone who can reach {host}"
    advice = "" if api_key else f"; require a key with --api-key or {API_KEY_ENV}"
    return (f"warning: listening on {host}: {who} can use the model and send it images over plain HTTP"
            f"{advice} (the default, 127.0.0.1, is reachable from this machine only)")
