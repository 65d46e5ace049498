"""Service plumbing shared by every server."""

from __future__ import annotations

import pytest

from splitspec.service import start_server


async def test_a_second_server_on_a_port_in_use_fails_instead_of_sharing_it():
    first = await start_server(lambda server: [], port=0, host="127.0.0.1")
    try:
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{first.port}"):
            await start_server(lambda server: [], port=first.port, host="127.0.0.1")
    finally:
        await first.stop(0)
