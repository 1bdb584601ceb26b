"""OpenAI request bodies to tpi_mpi's types: pure functions, the error as an HTTP response, and the
body read in / events written out.

Used by serve.py's HTTP side; no threads and no model here, so each rule is tested on its own.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import ConfigError
from .jobs import ApiError
from .sampling import SamplingConfig

MAX_STOPS = 4                # as OpenAI
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def number_field(body: dict, key: str, default, kind=float):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, not {json.dumps(value)}",
                       param=key)
    return kind(value)


def flag_field(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, not {json.dumps(value)}", param=key)
    return bool(value)


def parse_sampling(body: dict) -> SamplingConfig:
    """A field the request omits takes the command line's default (SamplingConfig.DEFAULT: temperature
    0.8, top_k 40, top_p 0.95), as llama-server applies its own: OpenAI's temperature 1 with no top-k
    makes a small model ramble. The CLI's checks on the values."""
    d = SamplingConfig.DEFAULT
    temperature = number_field(body, "temperature", d.temperature)
    top_p = number_field(body, "top_p", d.top_p)
    top_k = number_field(body, "top_k", d.top_k, int)
    seed = number_field(body, "seed", None, int)
    try:
        return SamplingConfig(temperature, top_k, top_p, seed)
    except ConfigError as e:
        name, _, rest = str(e).removeprefix("--").partition(" ")     # "--top-p 2.0: must be ..."
        key = name.replace("-", "_")
        raise ApiError(400, f"{key} {rest}", param=key) from None


def parse_max_tokens(body: dict, keys: tuple[str, ...] = ("max_tokens",)) -> int | None:
    for key in keys:
        n = number_field(body, key, None, int)
        if n is not None:
            if n < 1:
                raise ApiError(400, f"{key} {n}: must be at least 1", param=key)
            return n
    return None


def parse_stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop has {len(stops)} strings: at most {MAX_STOPS}", param="stop")
    return [s for s in stops if s]


def _text_content(content, i: int) -> str:
    """A message's content: a string, or parts of type "text" (OpenAI's array form)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", param="messages")


def chat_messages(body: dict) -> list[dict]:
    """`messages` as the chat template wants them: [{"role", "content": str}], developer -> system."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role {json.dumps(role)}: use one of {', '.join(CHAT_ROLES)}",
                           param="messages")
        out.append({"role": CHAT_ROLES[role], "content": _text_content(m.get("content"), i)})
    return out


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (or an array of one string)", param="prompt")
    if not prompt.strip():
        raise ApiError(400, "the prompt is empty: give some text", param="prompt")
    return prompt


# --- the HTTP body in, server-sent events out ---------------------------------------------------

MAX_BODY = 1 << 20           # bytes of request body accepted
DRAIN_BODY = 16 << 20        # an oversized body is read this far before the 413, so the client sees it


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def read_json(request: Request) -> dict:
    """The body as a JSON object; 413 past MAX_BODY (read on up to DRAIN_BODY so the client,
    still sending, receives the answer instead of a reset connection)."""
    body, size = bytearray(), 0
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_BODY:
        raise ApiError(413, f"the body has {declared} bytes: at most {MAX_BODY}", code="body_too_large",
                       headers={"Connection": "close"})
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY:
            body += chunk
        elif size > DRAIN_BODY:
            break
    if size > MAX_BODY:
        raise ApiError(413, f"the body has {size}{'+' if size > DRAIN_BODY else ''} bytes: at most {MAX_BODY}",
                       code="body_too_large")
    try:
        data = json.loads(body)
    except ValueError as e:                      # UnicodeDecodeError is a ValueError too
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data
