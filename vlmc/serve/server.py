"""``vlmc serve``: build the served models and the app, then run uvicorn."""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import VlmcError
from .app import create_app
from .jobs import Settings, media_root
from .media import MediaLimits
from .models import Models


def serve(sources: list[str], *, kv: dict[str, Any], host: str, port: int, lazy: bool, api_key: str | None,
          cors: tuple[str, ...], max_batch_size: int, max_queue: int, prefill_chunk: int, prefill_batch_tokens: int,
          default_max_tokens: int,
          max_prompt_tokens: int | None, max_body_bytes: int, max_images: int, max_image_bytes: int,
          max_image_pixels: int, fetch_timeout: float, allowed_local_media_path: str | None,
          max_request_pixels: int = 80_000_000, allow_private_fetch: bool = False,
          allow_fetch_network: tuple[str, ...] = (), read_timeout: float = 15.0, keep_alive_timeout: int = 5,
          vision_cache_bytes: int, prefix_cache_bytes: int, prefix_block_size: int, prefix_cache_dir: str | None,
          prefix_cache_disk_bytes: int, top_logprobs_k: int, prefix_state_every: int = 0,
          enable_thinking: bool | None,
          thinking_budget: int | None, thinking_start_token: str, thinking_end_token: str, dtype: str,
          generation_config: str = "auto", draft: str | None = None, num_draft_tokens: int = 4,
          max_videos: int = 2, max_video_bytes: int = 64 * 2**20, max_video_frames: int = 256,
          max_video_duration: float = 1800.0) -> None:
    import uvicorn
    sock = _bind(host, port)  # before the model loads: a busy port is one error line, at once
    media = MediaLimits(max_images=max_images, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                        max_request_pixels=max_request_pixels, fetch_timeout=fetch_timeout,
                        allowed_local_dir=media_root(allowed_local_media_path),
                        allow_private_fetch=allow_private_fetch, allowed_fetch_networks=_networks(allow_fetch_network),
                        max_videos=max_videos, max_video_bytes=max_video_bytes, max_video_frames=max_video_frames,
                        max_video_duration=max_video_duration)
    _log_to_stderr()
    settings = Settings(default_max_tokens=default_max_tokens, top_logprobs_k=top_logprobs_k,
                        max_prompt_tokens=max_prompt_tokens, enable_thinking=enable_thinking,
                        thinking_budget=thinking_budget, think_start=thinking_start_token,
                        think_end=thinking_end_token, media=media)
    load_options = {"dtype": dtype, "generation_config": generation_config, **kv}
    if draft is not None:
        load_options.update(draft=draft, num_draft_tokens=num_draft_tokens)
    models = Models(sources, load_options=load_options, max_batch=max_batch_size, max_queue=max_queue,
                    prefill_chunk=prefill_chunk, prefill_batch_tokens=prefill_batch_tokens,
                    vision_cache_bytes=vision_cache_bytes,
                    prefix_cache_bytes=prefix_cache_bytes, prefix_block_size=prefix_block_size,
                    prefix_cache_dir=prefix_cache_dir, prefix_cache_disk_bytes=prefix_cache_disk_bytes,
                    prefix_state_every=prefix_state_every)
    if not lazy:
        models.load_now()  # (no reference kept here: /unload must be able to free it)
        print(f"vlmc: serving {models.resident.id} (context {models.resident.vlm.max_context} tokens)",
              file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"vlmc: warning: listening on {host} without --api-key", file=sys.stderr)
    app = create_app(models, settings, api_key=api_key, cors_origins=list(cors), max_body_bytes=max_body_bytes,
                     read_timeout=read_timeout)
    print(f"vlmc: listening on http://{host}:{sock.getsockname()[1]}/v1", file=sys.stderr)
    protocol = type("HeaderTimedH11", (HeaderTimedH11,), {"header_timeout": read_timeout})
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            http=protocol, timeout_keep_alive=keep_alive_timeout)
    uvicorn.Server(config).run(sockets=[sock])


class HeaderTimedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers: a connection that
    sends none, or trickles them, is closed after ``header_timeout`` seconds (uvicorn
    times out idle keep-alive connections only after a first response). The body's own
    deadline is the app's (``middleware.Guard``)."""

    header_timeout = 15.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._header_deadline is not None:
            self._header_deadline.cancel()  # the headers are in
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _networks(values: tuple[str, ...]) -> tuple:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise VlmcError(f"--allow-fetch-network {value}: not an address or network (e.g. 10.0.5.0/24)") from None
    return tuple(out)


def _log_to_stderr() -> None:
    """The server's own log lines (failed fetches, internal errors) go to stderr."""
    log = logging.getLogger("vlmc.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vlmc: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (uvicorn serves on it), or one clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise VlmcError(f"cannot listen on {host}:{port}: {e.strerror} (check --host)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = " (another server is using it: pick another --port)" if e.errno == errno.EADDRINUSE else \
            " (ports below 1024 need privileges: pick another --port)" if e.errno == errno.EACCES else ""
        raise VlmcError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock
