"""Reward functions for the scorer tests, importable as `tests.scoring.rewards_for_tests:NAME`."""

import threading
import time

HANG_S = 2.0
RELEASE = threading.Event()  # set: hanging calls return at once
CALLS: list[str] = []  # responses each call was made with, in order
THREADS: list[str] = []  # the thread each call ran on


def hang_on_marker(prompt: str, response: str) -> float:
    """len(response); hangs up to HANG_S on a response containing "hang", takes 0.15 s on one
    containing "slow"."""
    CALLS.append(response)
    THREADS.append(threading.current_thread().name)
    if "hang" in response:
        RELEASE.wait(HANG_S)
    elif "slow" in response:
        time.sleep(0.15)
    return float(len(response))
