"""Which senders an encode service works for.

A job names the address its result goes to (`reply_to`), so answering one is a connection this
service makes on a stranger's word. Jobs and health pings are therefore accepted only when
their reply address is trusted: by default this host's own addresses (a language service beside
it: loopback, its host names and addresses, ipc://); with a shared `job_token`, any address that
comes with the token; or the operator's explicit patterns. Refused messages get no answer at
all (answering would be the very connection refused); they are logged and counted.
"""

from __future__ import annotations

import fnmatch
import hmac
import socket

from transfer.messages import EncodeJob, HealthPing


def same_host_patterns() -> list[str]:
    """Reply addresses of processes on this host: loopback, ipc, and this host's names and
    addresses (as a language service here binds its result address)."""
    names = {"localhost", "127.*", "[::1]", "::1", socket.gethostname(), socket.getfqdn()}
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        infos = []
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        names.add(f"[{address}]" if ":" in address else address)
    return ["ipc://*", "inproc://*", *sorted(f"tcp://{name}:*" for name in names)]


class ReplyPolicy:
    def __init__(self, allow_list: list[str] | None, token: str | None) -> None:
        self.token = token
        if allow_list is not None:
            self.patterns = list(allow_list)
        else:
            self.patterns = ["*"] if token else same_host_patterns()

    def refusal(self, msg: EncodeJob | HealthPing) -> str | None:
        """Why `msg` must be dropped (for the log), or None if it may be answered."""
        if self.token is not None and not hmac.compare_digest(msg.token.encode(), self.token.encode()):
            return "it does not carry this service's job_token"
        if not any(fnmatch.fnmatchcase(msg.reply_to, pattern) for pattern in self.patterns):
            return f"its reply address {msg.reply_to[:200]!r} is not trusted (reply_to_allow_list)"
        return None
