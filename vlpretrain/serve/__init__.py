"""``vlp index serve``: an HTTP JSON API and a web page over retrieval indexes (the ``serve`` extra).

Example:
    >>> from vlpretrain.serve import create_app
    >>> app = create_app(["runs/demo-emoji/index"])       # a FastAPI app; run it with uvicorn
"""

from .server import SERVE_EXTRA, is_loopback, require_serve_extra, serve

__all__ = ["create_app", "SearchService", "serve", "require_serve_extra", "is_loopback", "SERVE_EXTRA"]


def __getattr__(name: str):
    # FastAPI is imported only when the app is asked for, so `vlp` starts (and says what to install)
    # without the serve extra.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "SearchService":
        from .service import SearchService

        return SearchService
    raise AttributeError(name)
