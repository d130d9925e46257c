"""Fast, clear failures for Hugging Face Hub downloads when the network is missing.

The Hub client retries a failed download for about a minute; cbtool probes the endpoint once
(a few seconds at most) and, when it is unreachable, runs the load in offline mode so that files
already in the local cache still work and missing ones fail at once with a one-line hint.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator
from urllib.parse import urlparse

from cbtool.errors import NetworkError

PROBE_TIMEOUT_S = 3.0


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hub endpoint accepts a TCP connection (always True behind a proxy: we cannot tell)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _offline_error(what: str, hint: str) -> NetworkError:
    return NetworkError(f"cannot download {what}: the Hugging Face Hub is unreachable (offline) and it is not cached; {hint}")


@contextmanager
def hub_access(what: str, hint: str) -> Iterator[None]:
    """Run a Hub download of ``what``; on a missing network or access, raise NetworkError with ``hint``."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    previous = constants.HF_HUB_OFFLINE
    offline = previous or not hub_reachable()
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    except (hub_errors.GatedRepoError, hub_errors.RepositoryNotFoundError) as error:
        raise NetworkError(
            f"no access to {what} on the Hugging Face Hub ({type(error).__name__}): check the name, "
            f"log in with `hf auth login` and accept the terms on its page, or {hint}"
        ) from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError) as error:
        if not offline:
            raise NetworkError(f"could not download {what} from the Hugging Face Hub ({error}); {hint}") from None
        raise _offline_error(what, hint) from None
    except OSError:
        # transformers wraps a cache miss in offline mode into a plain OSError
        if offline:
            raise _offline_error(what, hint) from None
        raise
    finally:
        constants.HF_HUB_OFFLINE = previous
