"""Upstream credentials from a docker credential helper (``credential_helper: NAME``).

``docker-credential-NAME get`` reads the registry's host on stdin and writes
``{"ServerURL", "Username", "Secret"}`` on stdout: the protocol ecr-login, gcr,
acr-env and pass helpers all speak, so whatever a docker host would use works.

The protocol carries no expiry, and the tokens these helpers hand out do expire
(ECR's after 12 hours), so an answer is used for ``credential_helper_ttl`` and the
helper runs again once ``REFRESH_AT`` of that has passed: a refresh that fails
then leaves the still-valid answer in use (and says so in the log), one that
fails after expiry is a ``CredentialHelperFailed`` (503 naming the upstream). An
upstream that refuses the credentials asks for a fresh answer at once (``stale``).

Nothing the helper writes reaches a log or an error message: its stdout holds
the secret and its stderr may too. One run at a time; callers during a run wait
for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import CredentialHelperFailed

log = logging.getLogger("regcache.upstream")

# Of the ttl: past this share, the next use runs the helper again.
REFRESH_AT = 0.8
# A helper that has not answered in this long is stuck (waiting for a prompt, a dead metadata service).
RUN_TIMEOUT = 30.0
MAX_OUTPUT = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Answer:
    username: str
    secret: str
    fetched_at: float


class CredentialHelper:
    def __init__(
        self, upstream: str, helper: str, server: str, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._upstream = upstream
        self._program = f"docker-credential-{helper}"
        self._server = server
        self._ttl = ttl
        self._clock = clock
        self._answer: _Answer | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> tuple[str, str]:
        async with self._lock:
            answer = self._answer
            age = None if answer is None else self._clock() - answer.fetched_at
            if answer is not None and age is not None and age < self._ttl * REFRESH_AT:
                return answer.username, answer.secret
            try:
                answer = await self._run()
            except CredentialHelperFailed as exc:
                if self._answer is not None and age is not None and age < self._ttl:
                    log.warning("%s; using its previous answer until it expires", exc.message)
                    return self._answer.username, self._answer.secret
                self._answer = None  # expired: not kept a moment longer
                raise
            self._answer = answer
            return answer.username, answer.secret

    def stale(self) -> None:
        """The upstream refused what the helper gave: ask it again next time."""
        self._answer = None

    async def _run(self) -> _Answer:
        def failed(why: str) -> CredentialHelperFailed:
            return CredentialHelperFailed(
                f"upstream {self._upstream}: credential helper {self._program} {why}", upstream=self._upstream
            )

        try:
            process = await asyncio.create_subprocess_exec(
                self._program,
                "get",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=os.environ.copy(),
            )
        except OSError:
            raise failed("could not be run (is it on PATH?)") from None
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                out, _ = await process.communicate(self._server.encode() + b"\n")
        except TimeoutError:
            process.kill()
            await process.wait()
            raise failed(f"did not answer within {RUN_TIMEOUT:.0f}s") from None
        if process.returncode != 0:
            raise failed(f"failed (exit status {process.returncode})")
        try:
            data = json.loads(out[:MAX_OUTPUT])
        except ValueError:
            raise failed("wrote something that is not JSON") from None
        username = data.get("Username") if isinstance(data, dict) else None
        secret = data.get("Secret") if isinstance(data, dict) else None
        if not isinstance(username, str) or not isinstance(secret, str) or not secret:
            raise failed("gave no Username and Secret")
        return _Answer(username, secret, self._clock())
