//! Request handling: authentication, routing, the endpoint handlers and the
//! audit log of mutating calls.

use super::api::{
    CloseOutcome, ErrorBody, PostureOutcome, PostureRequest, ReloadOutcome, RevocationRequest,
    SessionList,
};
use super::auth::{Caller, TokenRejection};
use super::server::ServerState;
use super::validate;
use super::AUDIT_TARGET;
use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub(super) type AdminResponse = Response<Full<Bytes>>;

/// The client at the other end of one connection.
pub(super) enum Peer {
    /// A Unix socket peer: its credentials, when the kernel reported them,
    /// and the access policy's verdict on them.
    Unix {
        credentials: Option<Caller>,
        verdict: Result<(), String>,
    },
    Tcp(SocketAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix {
                credentials: Some(caller),
                ..
            } => write!(f, "unix {caller}"),
            Peer::Unix {
                credentials: None, ..
            } => write!(f, "unix peer with unknown credentials"),
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

/// A failed request: the status, a message with the fix, and the request
/// field at fault.
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<&'static str>,
    pub errors: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: None,
            errors: Vec::new(),
        }
    }

    pub fn bad_request(field: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            field,
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn into_response(self) -> AdminResponse {
        let body = ErrorBody {
            error: self.message,
            field: self.field.map(str::to_string),
            errors: self.errors,
        };
        json_response(self.status, &body)
    }
}

/// One line of the audit log: what a mutating call asked for and how it ended.
struct AuditRecord {
    action: &'static str,
    request: String,
    outcome: String,
}

/// Handles one request and returns its response. Errors become JSON error
/// bodies with their status.
pub(super) async fn handle(
    request: Request<Incoming>,
    peer: &Peer,
    state: &ServerState,
) -> AdminResponse {
    let caller = match authenticate(&request, peer, state) {
        Ok(caller) => caller,
        Err(response) => return *response,
    };
    let path = request.uri().path().to_string();
    let method = request.method().clone();

    let Some(route) = Route::parse(&path) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint {path}; the admin API serves /v1/health, /v1/ready, \
                 /v1/sessions, /v1/sessions/ID, /v1/revocations, /v1/posture and /v1/reload"
            ),
        )
        .into_response();
    };
    if !route.allows(&method) {
        let allowed = route.methods().join(", ");
        let mut response = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} does not accept {method}; use {allowed}"),
        )
        .into_response();
        if let Ok(value) = HeaderValue::from_str(&allowed) {
            response.headers_mut().insert(ALLOW, value);
        }
        return response;
    }

    let (response, audit) = match route {
        Route::Health => (
            json_response(StatusCode::OK, &Health { status: "ok" }),
            None,
        ),
        Route::Ready => (ready(state), None),
        Route::Sessions => (sessions(state), None),
        Route::Session(id) => {
            let (response, record) = close_session(&id, state);
            (response, Some(record))
        }
        Route::Revocations => {
            let (response, record) = revoke(request, &caller, state).await;
            (response, Some(record))
        }
        Route::Posture => {
            let (response, record) = posture(request, &caller, state).await;
            (response, Some(record))
        }
        Route::Reload => {
            let (response, record) = reload(state).await;
            (response, Some(record))
        }
    };
    if let Some(record) = audit {
        tracing::info!(
            target: AUDIT_TARGET,
            caller = ?caller.to_string(),
            action = record.action,
            request = %record.request,
            status = response.status().as_u16(),
            outcome = ?record.outcome,
            "admin call"
        );
    }
    response
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

enum Route {
    Health,
    Ready,
    Sessions,
    /// `/v1/sessions/{id}`, with the id as sent.
    Session(String),
    Revocations,
    Posture,
    Reload,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let route = match path {
            "/v1/health" => Route::Health,
            "/v1/ready" => Route::Ready,
            "/v1/sessions" => Route::Sessions,
            "/v1/revocations" => Route::Revocations,
            "/v1/posture" => Route::Posture,
            "/v1/reload" => Route::Reload,
            _ => {
                let id = path.strip_prefix("/v1/sessions/")?;
                if id.is_empty() || id.contains('/') {
                    return None;
                }
                Route::Session(id.to_string())
            }
        };
        Some(route)
    }

    fn methods(&self) -> &'static [&'static str] {
        match self {
            Route::Health | Route::Ready | Route::Sessions => &["GET"],
            Route::Session(_) => &["DELETE"],
            Route::Revocations | Route::Posture | Route::Reload => &["POST"],
        }
    }

    fn allows(&self, method: &Method) -> bool {
        self.methods().contains(&method.as_str())
    }
}

/// Checks the peer's credentials (Unix socket) or bearer token (TCP), and
/// logs every rejection at warn with the peer.
fn authenticate(
    request: &Request<Incoming>,
    peer: &Peer,
    state: &ServerState,
) -> Result<Caller, Box<AdminResponse>> {
    match peer {
        Peer::Unix {
            credentials: Some(caller),
            verdict: Ok(()),
        } => Ok(caller.clone()),
        Peer::Unix { verdict, .. } => {
            let reason = match verdict {
                Err(reason) => reason.clone(),
                Ok(()) => "the kernel reported no peer credentials".to_string(),
            };
            tracing::warn!(
                peer = %peer,
                method = %request.method(),
                path = request.uri().path(),
                reason = %reason,
                "admin request rejected"
            );
            Err(Box::new(
                ApiError::new(StatusCode::FORBIDDEN, reason).into_response(),
            ))
        }
        Peer::Tcp(addr) => {
            let verdict = match &state.token {
                Some(token) => token.verify(request.headers().get(AUTHORIZATION)),
                None => Err(TokenRejection::Invalid),
            };
            match verdict {
                Ok(()) => Ok(Caller::Token { peer: *addr }),
                Err(rejection) => {
                    if let Some(suppressed) =
                        state.rejection_limiter.check(addr.ip(), Instant::now())
                    {
                        tracing::warn!(
                            peer = %peer,
                            method = %request.method(),
                            path = request.uri().path(),
                            reason = rejection.message(),
                            suppressed,
                            "admin request rejected"
                        );
                    }
                    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, rejection.message())
                        .into_response();
                    response
                        .headers_mut()
                        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    Err(Box::new(response))
                }
            }
        }
    }
}

fn ready(state: &ServerState) -> AdminResponse {
    let readiness = state.backend.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &readiness)
}

fn sessions(state: &ServerState) -> AdminResponse {
    let list = SessionList {
        sessions: state.backend.sessions(),
    };
    json_response(StatusCode::OK, &list)
}

fn close_session(id: &str, state: &ServerState) -> (AdminResponse, AuditRecord) {
    let mut record = AuditRecord {
        action: "close-session",
        request: format!("id={id}"),
        outcome: String::new(),
    };
    let Ok(id) = id.parse::<u64>() else {
        record.outcome = "rejected: the id is not a number".to_string();
        let error = ApiError::bad_request(
            Some("id"),
            format!("session id {id:?} is not a number; take the id from GET /v1/sessions"),
        );
        return (error.into_response(), record);
    };
    if state.backend.close_session(id) {
        record.outcome = "closed".to_string();
        let body = CloseOutcome { id, closed: true };
        (json_response(StatusCode::OK, &body), record)
    } else {
        record.outcome = "not found".to_string();
        let error = ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no live session has id {id}; list them with GET /v1/sessions"),
        );
        (error.into_response(), record)
    }
}

async fn revoke(
    request: Request<Incoming>,
    caller: &Caller,
    state: &ServerState,
) -> (AdminResponse, AuditRecord) {
    let mut record = AuditRecord {
        action: "revoke",
        request: String::new(),
        outcome: String::new(),
    };
    let body: RevocationRequest = match read_json(request, state).await {
        Ok(body) => body,
        Err(error) => return rejected(error, record),
    };
    record.request = serde_json::to_string(&body).unwrap_or_default();
    let push = match validate::revocation(body, unix_now()) {
        Ok(push) => push,
        Err(error) => return rejected(error, record),
    };
    record.request = serde_json::to_string(&push).unwrap_or_default();

    let backend = state.backend.clone();
    let caller = caller.to_string();
    let pushed = tokio::task::spawn_blocking(move || backend.push_revocation(push, &caller)).await;
    match pushed {
        Ok(Ok(outcome)) => {
            record.outcome = format!("pushed; closed {} sessions", outcome.closed_sessions);
            (json_response(StatusCode::OK, &outcome), record)
        }
        Ok(Err(message)) => rejected(
            ApiError::internal(format!(
                "the gateway did not record the revocation: {message}"
            )),
            record,
        ),
        Err(join_error) => rejected(
            ApiError::internal(format!("the revocation push failed: {join_error}")),
            record,
        ),
    }
}

async fn posture(
    request: Request<Incoming>,
    caller: &Caller,
    state: &ServerState,
) -> (AdminResponse, AuditRecord) {
    let mut record = AuditRecord {
        action: "posture",
        request: String::new(),
        outcome: String::new(),
    };
    let body: PostureRequest = match read_json(request, state).await {
        Ok(body) => body,
        Err(error) => return rejected(error, record),
    };
    // The attribute names only: values can be long and are the backend's to keep.
    let names: Vec<&String> = body.attributes.keys().collect();
    record.request = format!("device_id={:?} attributes={names:?}", body.device_id);
    if let Err(error) = validate::posture(&body) {
        return rejected(error, record);
    }

    let backend = state.backend.clone();
    let caller = caller.to_string();
    let pushed = tokio::task::spawn_blocking(move || {
        backend.push_posture(body.device_id, body.attributes, &caller)
    })
    .await;
    match pushed {
        Ok(Ok(reevaluated_sessions)) => {
            record.outcome = format!("pushed; re-evaluated {reevaluated_sessions} sessions");
            let body = PostureOutcome {
                reevaluated_sessions,
            };
            (json_response(StatusCode::OK, &body), record)
        }
        Ok(Err(message)) => rejected(
            ApiError::internal(format!("the gateway did not record the posture: {message}")),
            record,
        ),
        Err(join_error) => rejected(
            ApiError::internal(format!("the posture push failed: {join_error}")),
            record,
        ),
    }
}

async fn reload(state: &ServerState) -> (AdminResponse, AuditRecord) {
    let mut record = AuditRecord {
        action: "reload",
        request: String::new(),
        outcome: String::new(),
    };
    match state.backend.reload().await {
        Ok(generation) => {
            record.outcome = format!("reloaded; generation {generation} in force");
            (
                json_response(StatusCode::OK, &ReloadOutcome { generation }),
                record,
            )
        }
        Err(errors) => {
            record.outcome = format!(
                "rejected with {} errors: {}",
                errors.len(),
                errors.join("; ")
            );
            let mut error = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the configuration was not reloaded because of {} error(s); the previous \
                     configuration stays in force",
                    errors.len()
                ),
            );
            error.errors = errors;
            (error.into_response(), record)
        }
    }
}

fn rejected(error: ApiError, mut record: AuditRecord) -> (AdminResponse, AuditRecord) {
    record.outcome = format!("rejected: {}", error.message);
    (error.into_response(), record)
}

/// Reads a JSON body of at most `max_body_bytes` within `body_read_timeout`.
async fn read_json<T: DeserializeOwned>(
    request: Request<Incoming>,
    state: &ServerState,
) -> Result<T, ApiError> {
    let limit = state.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }

    let body = Limited::new(request.into_body(), limit);
    let collected = match tokio::time::timeout(state.body_read_timeout, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<LengthLimitError>() => return Err(too_large()),
        Ok(Err(error)) => {
            return Err(ApiError::bad_request(
                None,
                format!("cannot read the request body: {error}"),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms",
                    state.body_read_timeout.as_millis()
                ),
            ))
        }
    };
    if collected.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            None,
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(&collected)
        .map_err(|error| ApiError::bad_request(None, format!("invalid JSON body: {error}")))
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> AdminResponse {
    let (status, bytes) = match serde_json::to_vec(body) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            (status, bytes)
        }
        Err(error) => {
            tracing::error!(error = %error, "cannot encode an admin response as JSON");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"error":"cannot encode the response"}"#.to_vec(),
            )
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parsed() {
        assert!(matches!(Route::parse("/v1/health"), Some(Route::Health)));
        assert!(matches!(Route::parse("/v1/sessions/42"), Some(Route::Session(id)) if id == "42"));
        assert!(Route::parse("/v1/sessions/").is_none());
        assert!(Route::parse("/v1/sessions/4/2").is_none());
        assert!(Route::parse("/v2/health").is_none());
    }

    #[test]
    fn route_methods() {
        assert!(Route::Sessions.allows(&Method::GET));
        assert!(!Route::Sessions.allows(&Method::POST));
        assert!(Route::Session("1".into()).allows(&Method::DELETE));
        assert!(Route::Reload.allows(&Method::POST));
        assert!(!Route::Reload.allows(&Method::GET));
    }
}
