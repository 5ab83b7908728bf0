"""The ranking request: one model (pydantic) for ``rank``, ``serve`` and ``loadtest``, and the
schema the server publishes (``GET /rank/openapi.json``).

Reading a request reports every problem in it at once, each named by its place
(``history[3]``, ``k``), with the same wording whether it came from a file, stdin or an HTTP
body. A history longer than :data:`~hatllm_edge.core.limits.MAX_HISTORY` keeps its most recent
items, with a warning; every other size is bounded (:mod:`hatllm_edge.core.limits`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.limits import (
    MAX_BEAMS,
    MAX_CANDIDATES,
    MAX_HISTORY,
    MAX_K,
    MAX_REF_CHARS,
    MAX_REQUEST_BYTES,
)
from hatllm_edge.ranking.resolve import joined, show

log = logging.getLogger("hatllm_edge")
STDIN = "-"  # the request path that means standard input
STDIN_NAME = "<stdin>"  # how messages name it


def _check_ref(value: str | int) -> str | int:
    text = str(value)
    if len(text) > MAX_REF_CHARS:
        raise ValueError(f"{show(value)} has {len(text):,} characters; the limit is {MAX_REF_CHARS}: give the item's id or its "
                         "exact catalog title")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{show(value)} is not valid Unicode (a lone surrogate escape)") from None
    return value


ItemRef = Annotated[Union[str, int], AfterValidator(_check_ref)]


class RankRequest(BaseModel):
    """One user's ranking request."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"history": ["Star Wars (1977)", "Fargo (1996)", "Contact (1997)"], "k": 10},
                     {"history": ["50", "100"], "candidates": ["181", "258", "Toy Story (1995)"]}]})

    history: list[ItemRef] = Field(min_length=1, description=(
        f"The user's items, oldest first: catalog ids or exact titles. Past {MAX_HISTORY:,} items only the most recent are "
        "kept; the model reads its last max_history (20 for the shipped one)."))
    candidates: list[ItemRef] | None = Field(None, min_length=1, max_length=MAX_CANDIDATES, description=(
        "Rank these items (ids or titles) instead of the whole catalog."))
    k: int | None = Field(None, ge=1, le=MAX_K, description="Length of the ranked list (default 10).")
    beams: int | None = Field(None, ge=1, le=MAX_BEAMS, description="Beam width of the full-catalog search (default 10).")
    user_id: Annotated[Union[str, int], AfterValidator(_check_ref)] | None = Field(
        None, description="Echoed back in the answer.")
    assist: bool = Field(True, description="Fuse the model's collaborative assistant (SASRec), where it ships one.")


FIELDS = tuple(RankRequest.model_fields)
_WHAT = {"k": "the list length", "beams": "the beam width"}
_LIMIT = {"k": MAX_K, "beams": MAX_BEAMS}


def _message(error: dict[str, Any]) -> tuple[str, str]:
    """(where, what) of one pydantic error, in this tool's words."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    field = str(loc[0]) if loc else ""
    if not loc:
        return "", 'expected a JSON object like {"history": [...]}'
    if kind == "extra_forbidden":
        return "", f"unknown field {show(field, 40)}; allowed: {', '.join(FIELDS)}"
    if field in ("history", "candidates") and len(loc) == 1:
        if kind == "too_long":
            return "", f"field {field!r} has {len(value):,} items; the limit is {MAX_CANDIDATES:,}: split the request"
        return "", f"field {field!r} must be a non-empty list of item ids or titles" + (", oldest first" if field == "history" else "")
    if field in ("history", "candidates", "user_id"):
        where = f"{field}[{loc[1]}]" if field != "user_id" else "user_id"
        if kind == "value_error":
            return where, str(error["ctx"]["error"])
        if field == "user_id":
            return "", f"field 'user_id' must be a string or an integer, got {show(value)}"
        return where, f"expected an item id or title (string or integer), got {show(value)}"
    if field in _LIMIT:
        if kind in ("greater_than_equal", "less_than_equal"):
            return "", f"field {field!r} is {show(value)}; it must be from 1 to {_LIMIT[field]} ({_WHAT[field]})"
        return "", f"field {field!r} must be an integer from 1 to {_LIMIT[field]} ({_WHAT[field]}), got {show(value)}"
    if field == "assist":
        return "", f"field 'assist' must be true or false, got {show(value)}"
    return field, error["msg"]


def check_request(req: Any, path: str) -> RankRequest:
    """A parsed JSON value as a request, every problem in it named in one :class:`InputError`
    (``path``: the file, stdin, or the request's place in a batch)."""
    if isinstance(req, dict) and isinstance(req.get("history"), list) and len(req["history"]) > MAX_HISTORY:
        log.warning("%s: the history has %s items; the most recent %s are kept", path, f"{len(req['history']):,}",
                    f"{MAX_HISTORY:,}")
        req = {**req, "history": req["history"][-MAX_HISTORY:]}
    try:
        return RankRequest.model_validate(req)
    except ValidationError as e:
        problems: dict[str, str] = {}  # one message per place (a union reports each of its branches)
        for error in e.errors(include_url=False):
            where, what = _message(error)
            problems.setdefault(where or what, f"{path}: {where + ': ' if where else ''}{what}")
        raise InputError(joined(list(problems.values()))) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InputError(f"field {key!r} appears twice")
        seen[key] = value
    return seen


def parse_request(raw: bytes, path: str) -> RankRequest:
    """A request from the bytes of a JSON document (a file, stdin, an HTTP body); errors name ``path``."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise InputError(f"{path}: larger than the {MAX_REQUEST_BYTES // 2**20} MiB a request may have")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    try:
        req = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; a request is one object of lists of ids or titles") from None
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except ValueError as e:  # Python reads no integer of more than 4,300 digits
        why = "an integer with more than 4,300 digits" if "digits" in str(e) else " ".join(str(e).split())[:100]
        raise InputError(f"{path}: not a usable JSON value ({why})") from None
    return check_request(req, path)


def read_request(path: Path) -> RankRequest:
    """The request in the JSON file ``path``, or on standard input when ``path`` is ``-``."""
    if str(path) == STDIN:
        return parse_request(sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1), STDIN_NAME)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_REQUEST_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_request(raw, str(path))
