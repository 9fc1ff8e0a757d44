"""Run ``entropy-gpu`` with two tripwires, for tests of what a user sees:

- any connection (or name lookup) to a host other than this machine prints
  ``NETWORK: ...`` on stderr and exits 97 at once, whatever the code under test catches;
- ``load_model`` prints ``MODEL LOAD`` and exits 98 (unless ``CLI_GUARD_ALLOW_LOAD=1``),
  so a user error must be reported before any model is loaded.

Usage: ``python tests/cli/cli_guard.py <entropy-gpu arguments>``; ``install()`` for in-process use.
"""

from __future__ import annotations

import os
import socket
import sys

LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", ""}


def _trip(what: str) -> None:
    sys.stderr.write(f"NETWORK: {what}\n")
    sys.stderr.flush()
    os._exit(97)


def install() -> None:
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in LOCAL:
            _trip(f"connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL and host is not None:
            _trip(f"name lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.getaddrinfo = getaddrinfo


def _no_model_load() -> None:
    import entropy_gpu.analysis.models as models

    def load_model(*args, **kwargs):
        sys.stderr.write("MODEL LOAD\n")
        sys.stderr.flush()
        os._exit(98)

    models.load_model = load_model


if __name__ == "__main__":
    install()
    if os.environ.get("CLI_GUARD_ALLOW_LOAD") != "1":
        _no_model_load()
    from entropy_gpu.cli import main

    sys.exit(main(sys.argv[1:]))
