"""The gateway's exception tree; each class carries its HTTP status and error code (SPEC §4).

    GatewayError                      500 InternalError
    ├── InvalidRequestError           400 InvalidRequest
    ├── SubscriptionKeyNotFoundError  401 SubscriptionKeyNotFound
    ├── SubscriptionKeyInvalidError   401 SubscriptionKeyInvalid
    ├── OperationNotFoundError        404 OperationNotFound
    ├── MethodNotAllowedError         405 MethodNotAllowed (+ Allow)
    ├── RequestTooLargeError          413 RequestTooLarge
    ├── TokenLimitExceededError       429 TokenLimitExceeded (+ Retry-After)
    ├── TokenQuotaExceededError       403 TokenQuotaExceeded (+ Retry-After)
    ├── ContentBlockedError           403 ContentBlocked
    ├── TokenStoreUnavailableError    503 StoreUnavailable (store-failure-mode: closed)
    └── BackendError
        ├── BackendConnectionError    502 BackendConnectionFailure
        ├── BackendUnavailableError   503 BackendUnavailable (+ Retry-After)
        └── BackendTimeoutError       504 BackendTimeout
            └── BackendConnectTimeoutError  (connecting timed out: nothing was sent)

Messages are safe to show to clients: they never carry backend addresses, credentials or
stack traces. `errors` imports nothing from proxy.
"""

from __future__ import annotations

import math


class GatewayError(Exception):
    """An error the gateway answers itself, in the OpenAI error shape."""

    status = 500
    code = "InternalError"
    type = "server_error"
    default_message = "The gateway failed to process the request."

    def __init__(self, message: str | None = None, *, headers: tuple[tuple[str, str], ...] = ()):
        self.message = message or self.default_message
        self.headers = headers
        super().__init__(self.message)


class InvalidRequestError(GatewayError):
    status = 400
    code = "InvalidRequest"
    type = "invalid_request_error"
    default_message = "The request is invalid."


class SubscriptionKeyNotFoundError(GatewayError):
    status = 401
    code = "SubscriptionKeyNotFound"
    type = "authentication_error"
    default_message = (
        "Access denied due to missing subscription key. "
        "Make sure to include subscription key when making requests to an API."
    )


class SubscriptionKeyInvalidError(GatewayError):
    status = 401
    code = "SubscriptionKeyInvalid"
    type = "authentication_error"
    default_message = (
        "Access denied due to invalid subscription key. "
        "Make sure to provide a valid key for an active subscription."
    )


class OperationNotFoundError(GatewayError):
    status = 404
    code = "OperationNotFound"
    type = "invalid_request_error"
    default_message = "Unable to match incoming request to an operation."


class MethodNotAllowedError(GatewayError):
    status = 405
    code = "MethodNotAllowed"
    type = "invalid_request_error"

    def __init__(self, allow: tuple[str, ...]):
        allowed = ", ".join(allow)
        super().__init__(f"Method not allowed; use {allowed}.", headers=(("allow", allowed),))


class RequestTooLargeError(GatewayError):
    status = 413
    code = "RequestTooLarge"
    type = "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(f"The request body exceeds the gateway's limit of {limit} bytes.")


class _RetryAfterError(GatewayError):
    template = "{seconds}"

    def __init__(
        self,
        retry_after: float,
        header_name: str = "Retry-After",
        *,
        detail: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ):
        seconds = max(1, math.ceil(retry_after))
        self.retry_after = seconds
        message = self.template.format(seconds=seconds) + (f" {detail}" if detail else "")
        super().__init__(message, headers=((header_name, str(seconds)), *headers))


class TokenLimitExceededError(_RetryAfterError):
    status = 429
    code = "TokenLimitExceeded"
    type = "rate_limit_error"
    template = "Token limit is exceeded. Try again in {seconds} seconds."


class TokenQuotaExceededError(_RetryAfterError):
    status = 403
    code = "TokenQuotaExceeded"
    type = "quota_exceeded_error"
    template = "Token quota is exceeded. Try again in {seconds} seconds."


class TokenStoreUnavailableError(GatewayError):
    status = 503
    code = "StoreUnavailable"
    type = "server_error"
    default_message = (
        "The token-limit store is unavailable and the gateway is configured to refuse "
        "requests it cannot count (store-failure-mode: closed)."
    )


class ContentBlockedError(GatewayError):
    status = 403
    code = "ContentBlocked"
    type = "content_filter_error"
    default_message = "The request was blocked by the content safety policy."


class ContentSafetyUnavailableError(GatewayError):
    """The content-safety backend failed or was too slow and the policy says `on-error:
    block`: the request is refused unscreened, not called harmful."""

    status = 503
    code = "ContentSafetyUnavailable"
    type = "server_error"
    default_message = (
        "The content safety service did not answer in time, and the policy refuses what it "
        "cannot screen (on-error: block). Try again later."
    )


class BackendError(GatewayError):
    """A failure reaching or hearing from a backend. Messages never name the backend's address."""

    type = "server_error"


class BackendConnectionError(BackendError):
    status = 502
    code = "BackendConnectionFailure"
    default_message = "The gateway could not connect to the backend."


class BackendUnavailableError(BackendError):
    status = 503
    code = "BackendUnavailable"
    default_message = "No backend is available to serve the request."

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0):
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, headers=(("Retry-After", str(seconds)),))


class BackendTimeoutError(BackendError):
    status = 504
    code = "BackendTimeout"
    default_message = "The backend did not answer in time."


class BackendConnectTimeoutError(BackendTimeoutError):
    """The connection was not made in time, so the backend never saw the request."""


# --- the admin API's (proxy/admin.py) -------------------------------------------------------


class AdminKeyNotFoundError(GatewayError):
    status = 401
    code = "AdminKeyNotFound"
    type = "authentication_error"
    default_message = (
        "Access denied due to missing admin key. Send it as Authorization: Bearer <admin key>."
    )


class AdminKeyInvalidError(GatewayError):
    status = 401
    code = "AdminKeyInvalid"
    type = "authentication_error"
    default_message = "Access denied due to invalid admin key."


class NotFoundError(GatewayError):
    status = 404
    code = "NotFound"
    type = "invalid_request_error"
    default_message = "No such subscription."


class ConflictError(GatewayError):
    status = 409
    code = "Conflict"
    type = "invalid_request_error"
    default_message = "The request conflicts with the current state."


class StoreUnavailableAdminError(GatewayError):
    status = 503
    code = "StoreUnavailable"
    type = "server_error"
    default_message = (
        "The subscription store is unavailable; the subscriptions known stay in effect, "
        "changes are refused until it is back."
    )
