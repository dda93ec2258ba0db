"""Reaching the Hugging Face Hub, or not: fail at once offline instead of retrying for half a minute.

``datasets`` and ``huggingface_hub`` retry unreachable hosts for tens of seconds. Everything depthprune reads
from the Hub (lm-eval task data, calibration corpora, healing data) first asks :func:`hub_reachable`, a
3-second connection to the Hub's host, or runs inside :func:`hub_offline`, which forces the libraries' offline
mode (datasets already in the local cache still load) unless the user chose a mode themselves.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

OFFLINE_ENV_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def offline_by_choice() -> bool:
    """The user set the Hugging Face offline variables: their choice stands."""
    return any(var in os.environ for var in OFFLINE_ENV_VARS)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host (``$HF_ENDPOINT``) accepts a connection at all."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def hub_offline() -> Iterator[bool]:
    """Force HF offline mode for the block unless the user chose a mode; yields whether it forced.

    ``datasets`` and ``huggingface_hub`` read the variables once at import, so
    setting ``os.environ`` alone is too late once lm-eval is imported; the
    module-level flags are patched as well, and everything is restored after.
    """
    if offline_by_choice():
        yield False
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    for var in OFFLINE_ENV_VARS:
        os.environ[var] = "1"
    ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        for var in OFFLINE_ENV_VARS:
            os.environ.pop(var, None)
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


