"""Service plumbing shared by every server."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from splitspec.service import model_thread, start_server


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_a_second_server_on_a_port_in_use_fails_instead_of_sharing_it():
    first = await start_server(lambda server: [], port=0, host="127.0.0.1")
    try:
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{first.port}"):
            await start_server(lambda server: [], port=first.port, host="127.0.0.1")
    finally:
        await first.stop(0)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
@pytest.mark.parametrize("nice", [0, 3])
def test_model_thread_runs_nice_levels_below_the_io_threads(nice):
    caller = thread_nice()
    with model_thread("test-model", nice) as executor:
        inside = executor.submit(thread_nice).result()
    assert inside == min(19, caller + nice)
    assert thread_nice() == caller  # only the model thread moved
