"""
Every error the API answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Notable:
- APIError is what the routes raise; install_error_handlers also converts FastAPI's and Starlette's own
  errors, so no client sees FastAPI's default bodies: a body that fails validation (malformed JSON
  included) is a 400, not FastAPI's 422, with the offending field in `param` ("messages[0].role"), and
  a field we do not know is "Unrecognized request argument supplied: <field>", as OpenAI says it; an
  unknown route is a 404 and a wrong method a 405, both in the same shape.
- an unexpected exception is still answered in the shape (a 500 "server_error"), and logged with its
  traceback by the server as usual.
- `type` and `code` follow OpenAI where it has a name for the case (invalid_request_error,
  invalid_api_key, model_not_found, context_length_exceeded); overload is a 429 (the queue is full, come
  back soon) or a 503 (shutting down, or no model trained yet), both with Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.schemas import ErrorDetail, ErrorResponse

RETRY_AFTER_S = 1  # a continuous-batching engine frees a slot within a few steps
NO_MODEL_RETRY_AFTER_S = 5  # a model takes a while to train; clients that retry (openai's) still give up soon


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.detail, self.headers)


class ClientDisconnected(Exception):
    """The client went away while its request was waiting on the engine; nobody reads the answer."""


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")


def invalid_api_key() -> APIError:
    return APIError(401, "Missing or invalid API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")


def queue_full() -> APIError:
    return APIError(429, "The server is at capacity: retry shortly", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def no_model(hint: str, refused: str | None = None) -> APIError:
    """No checkpoint is served yet; hint says where the server looks and how to train one, refused (when
    set) why the checkpoint there is not served."""
    message = f"No model is served: {refused}" if refused else f"No model is trained yet: {hint}"
    return APIError(503, message, type="server_error", code="model_not_loaded",
                    headers={"Retry-After": str(NO_MODEL_RETRY_AFTER_S)})


def engine_failed() -> APIError:
    return APIError(500, "The engine failed on this request (the server log says why)", type="server_error",
                    code="internal_error")


def param_path(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as OpenAI writes a param:
    ("body", "messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


def describe_validation_error(error: dict[str, Any]) -> ErrorDetail:
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error")
        message = f"The body is not valid JSON: {reason}" if reason else "The body is not valid JSON"
        return ErrorDetail(message=message, type="invalid_request_error")
    param = param_path(tuple(error.get("loc", ())))
    if param is None:  # the body itself: missing, not an object, or not sent as JSON
        return ErrorDetail(message="The body must be a JSON object, sent with Content-Type: application/json",
                           type="invalid_request_error")
    if error.get("type") == "extra_forbidden":  # OpenAI's own words for a field it does not define
        return ErrorDetail(message=f"Unrecognized request argument supplied: {param}", type="invalid_request_error",
                           param=param, code="unrecognized_argument")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return ErrorDetail(message=f"{param}: {message}", type="invalid_request_error", param=param,
                       code=error.get("type"))


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    return error_response(400, describe_validation_error(errors[0] if errors else {}))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, ErrorDetail(message=message, type=kind), exc.headers)


async def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request", for the access log


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after answering, so the server still logs the traceback
    detail = ErrorDetail(message="Internal server error", type="server_error", code="internal_error")
    return error_response(500, detail)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected_error)
