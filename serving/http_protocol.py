"""uvicorn's HTTP/1.1 protocol with one change: bytes that are not a valid HTTP request get
the API's JSON error (400) instead of uvicorn's plain-text one, so every error a client of
the HTTP face can meet has the same shape."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.http_api import APIError

_BODY = json.dumps(APIError(400, "the request is not valid HTTP/1.1", code="invalid_http")
                   .body()).encode()


class JSONErrorsH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:  # uvicorn calls it on a protocol error
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(_BODY)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=_BODY), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
