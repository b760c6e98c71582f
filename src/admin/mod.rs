//! The local admin API: HTTP/1.1 with JSON bodies on a Unix socket and/or
//! loopback TCP, served with hyper.
//!
//! | method and path | does |
//! | --- | --- |
//! | `GET /v1/health` | liveness: always 200 while the server runs |
//! | `GET /v1/ready` | 200 or 503, with each revocation source's age and staleness |
//! | `GET /v1/sessions` | lists live sessions |
//! | `DELETE /v1/sessions/{id}` | closes a session (code administratively-closed); 404 if unknown |
//! | `POST /v1/revocations` | pushes a revocation and reports the sessions it closed |
//! | `POST /v1/posture` | pushes posture attributes for a device |
//! | `POST /v1/reload` | reloads the configuration and lists its errors if it fails |
//!
//! Every request is authenticated, the health check included. On the Unix
//! socket the peer's credentials (SO_PEERCRED) must show root, the gateway's
//! own user, or a member of the configured group, and others get 403. On TCP the
//! request must carry `Authorization: Bearer TOKEN` with the token from the
//! token file, and others get 401. Rejections are logged at warn with the peer.
//! Mutating calls are logged on the `ztgate::audit` tracing target with the
//! caller, the request and the outcome.
//!
//! The gateway plugs in through the [`AdminBackend`] trait, and this module
//! reaches into no other module's state. [`client`] is the thin client behind
//! `ztgate sessions`, `close-session`, `revoke` and `reload`.

mod api;
mod auth;
pub mod client;
mod routes;
mod server;
mod settings;
mod validate;

pub use api::{
    AdminBackend, CloseOutcome, ErrorBody, PostureOutcome, PostureRequest, PushOutcome, Readiness,
    ReloadFuture, ReloadOutcome, RevocationPush, RevocationRequest, RevocationSourceStatus,
    RevocationTarget, SessionList, SessionView,
};
pub use auth::read_token_file;
pub use server::{serve, AdminHandle};
pub use settings::{
    AdminSettings, DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_SOCKET_PATH,
};

/// The tracing target of the audit log of mutating admin calls.
pub const AUDIT_TARGET: &str = "ztgate::audit";
