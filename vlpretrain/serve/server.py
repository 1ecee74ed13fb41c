"""Running the service: ``vlp index serve`` checks its options, loads the indexes and hands the app to uvicorn.

It binds 127.0.0.1 unless told otherwise; any other address needs ``--api-key`` (or the
``VLP_API_KEY`` environment variable, which keeps the key out of the process list).

Example:
    >>> serve(["runs/demo-emoji/index"], port=8000)       # blocks; Ctrl-C stops it
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from typing import Optional, Sequence

__all__ = ["serve", "require_serve_extra", "is_loopback", "SERVE_EXTRA"]

SERVE_EXTRA = "pip install 'vlpretrain[serve]'"


def require_serve_extra() -> None:
    """A one-line error naming the install command when FastAPI, uvicorn or python-multipart is missing.

    Example:
        >>> require_serve_extra()
        ValueError: serving needs the serve extra (no module named 'uvicorn'): pip install 'vlpretrain[serve]'
    """
    import importlib.util

    for module in ("fastapi", "uvicorn", "multipart"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"serving needs the serve extra (no module named '{module}'): {SERVE_EXTRA}")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
        (True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None


def serve(indexes: Sequence[str], host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          max_upload_mb: float = 10.0, max_k: int = 100, model: Optional[str] = None, log_level: str = "info") -> None:
    """Load ``indexes`` and serve them with uvicorn until interrupted.

    Example:
        >>> serve(["emoji=runs/demo-emoji/index"], host="0.0.0.0", api_key="s3cret")
    """
    require_serve_extra()
    api_key = api_key or os.environ.get("VLP_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} is reachable from other machines: give --api-key KEY (or set "
                         f"VLP_API_KEY), or bind 127.0.0.1")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    _check_port_free(host, int(port))  # before the (slow) loading of indexes and models
    import uvicorn

    from .app import create_app

    from .service import SearchService

    service = SearchService.load(list(indexes), model_spec=model)
    app = create_app(service, api_key=api_key, max_upload_mb=max_upload_mb, max_k=max_k)
    names = ", ".join(app.state.service.indexes)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {names} at http://{shown}:{port}/ (API docs: /docs; Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=host, port=int(port), log_level=log_level)
    finally:
        asyncio.run(service.close())
