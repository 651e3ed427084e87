"""What every laibao handler shares: typed access to the services built once by make_app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tornado.web

if TYPE_CHECKING:
    from laibao.runtime import Runtime


class BaseHandler(tornado.web.RequestHandler):
    """Reaches the Runtime through the Application settings; never opens clients of its own."""

    @property
    def runtime(self) -> Runtime:
        """The services of this process."""
        runtime: Runtime = self.settings["runtime"]
        return runtime

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors are short plain text: no stack traces, nothing from the request echoed back."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")
