//! The public HTTPS API (bootstrap: before the tunnel exists). One module per resource:
//!
//! | route                      | module       | auth                                  |
//! |----------------------------|--------------|---------------------------------------|
//! | `GET  /api/health`         | [`health`]   | none                                  |
//! | `GET  /api/servers`        | [`servers`]  | none                                  |
//! | `POST /api/auth/challenge` | [`auth`]     | none (issues a single-use challenge)  |
//! | `POST /api/auth`           | [`auth`]     | Ed25519 proof over a challenge        |
//! | `POST /api/join`           | [`join`]     | the same proof, inline                |
//! | `POST /api/trust/revocations` | [`trust`] | none: the cluster root's signature on the revocation |
//!
//! Handlers are thin: they parse, call the pure functions of their module (unit-tested without
//! HTTP), and append to the store. Every error is JSON of one stable shape,
//! `{"error": {"code": "...", "message": "..."}}` ([`ApiError`]); bad input is a 4xx, never a 500
//! or a panic (the JSON extractor's errors, unknown routes and wrong methods included).

pub mod auth;
pub mod client;
pub mod health;
pub mod http_log;
pub mod join;
pub mod observed;
pub mod private;
pub mod ratelimit;
pub mod servers;
pub mod trust;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError, web};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use tokio::sync::watch;

use crate::identity::NodeKey;
use crate::store::Store;
use crate::tls::Pin;

/// Largest JSON body accepted by any route (the biggest legitimate one, a join, is < 1 KiB).
pub const MAX_JSON_BYTES: usize = 16 * 1024;

/// An API error: an HTTP status and a stable machine-readable code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// A server-side failure. The details go to the log, not to the client.
    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// A stable machine-readable `code` and a human `message`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        })
    }
}

/// Wall-clock time in unix ms, with an adjustable offset (tests move time forward to expire
/// challenges and tokens through the real routes).
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        let sys = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        sys.saturating_add(self.offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }
    /// Moves this clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Which dataplane backend programs the client plane (shown by `/api/health`).
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DataplaneInfo {
    /// `kernel`, `userspace`, or `none` (no dataplane: API-only tests).
    pub backend: String,
    /// Why `auto` fell back to userspace, if it did.
    pub fallback_reason: Option<String>,
    /// The client-plane WireGuard interface.
    pub interface: Option<String>,
}

/// What the join answer tells a client about this server.
#[derive(Clone, Debug)]
pub struct Settings {
    pub registration: join::Registration,
    /// The server's client-plane WireGuard public key.
    pub wg_public_key: [u8; 32],
    /// The client-plane WireGuard UDP port.
    pub wg_port: u16,
    /// The host clients use to reach this server (WireGuard endpoint host). `None`: the host the
    /// client used in its request.
    pub public_host: Option<String>,
    pub private_api_port: u16,
    /// The port of this public API (what `/api/servers` advertises).
    pub api_port: u16,
    /// The API certificate's pin (returned to clients so they keep pinning it).
    pub tls_pin: Option<Pin>,
}

/// Asks the dataplane reconciler to bring the WireGuard device to the store's state, and waits
/// until it has. Requests made while a reconcile runs are coalesced into the next one.
///
/// Progress is counted in state versions ([`ApiState::version`]): the reconciler publishes the
/// version of the state it read (under the store lock) once the device matches it, so a caller
/// whose change has version `v` waits exactly for the first reconcile that read a state at least
/// that new, not for one more after it.
#[derive(Debug)]
pub struct PeerSync {
    requested: watch::Sender<u64>,
    applied: watch::Receiver<u64>,
}

/// The reconciler's end of a [`PeerSync`].
#[derive(Debug)]
pub struct PeerSyncWorker {
    /// The highest state version a caller waits for.
    pub requested: watch::Receiver<u64>,
    /// The version of the state the device last matched.
    pub applied: watch::Sender<u64>,
}

impl PeerSync {
    pub fn new() -> (PeerSync, PeerSyncWorker) {
        let (req_tx, req_rx) = watch::channel(0u64);
        let (app_tx, app_rx) = watch::channel(0u64);
        (
            PeerSync {
                requested: req_tx,
                applied: app_rx,
            },
            PeerSyncWorker {
                requested: req_rx,
                applied: app_tx,
            },
        )
    }

    /// Waits up to `timeout` until the device matches a state of at least `version`, asking for
    /// a reconcile if it does not yet. Returns whether it happened in time (if not, it still
    /// happens: the client's handshake simply waits for it).
    pub async fn sync(&self, version: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.clone();
        if *applied.borrow_and_update() >= version {
            return true;
        }
        // The highest version asked for: a reconcile that already covers it is not repeated.
        self.requested.send_if_modified(|r| {
            let newer = *r < version;
            *r = (*r).max(version);
            newer
        });
        matches!(
            tokio::time::timeout(timeout, applied.wait_for(|a| *a >= version)).await,
            Ok(Ok(_))
        )
    }
}

/// Everything the handlers share.
pub struct ApiState {
    /// The server's identity (signs ops and tokens).
    pub server: NodeKey,
    pub store: Mutex<Store>,
    pub challenges: Mutex<auth::Challenges>,
    pub settings: Settings,
    pub dataplane: DataplaneInfo,
    /// `None` when no dataplane runs (API-only tests).
    pub peers: Option<PeerSync>,
    pub clock: Clock,
    /// Requests per client address (unlimited unless set with [`ApiState::with_rate_limit`]).
    pub limiter: ratelimit::Limiter,
    /// The cluster's trust anchor (fixed for the store's life; kept here so no route needs the
    /// store lock just to name the cluster).
    pub root: crate::keys::PublicKey,
    /// The state hash, computed when asked after a change (computing it encodes the whole
    /// state, so joins only mark it stale: `None`).
    state_hash: Mutex<Option<[u8; 32]>>,
    /// Counts the local changes of the state ([`ApiState::state_changed`]); see [`PeerSync`].
    version: std::sync::atomic::AtomicU64,
    /// The last dump of the client-plane device: endpoints and handshakes ([`observed`]).
    pub observations: Mutex<observed::Observations>,
    rng: SystemRandom,
    /// The queue to the join group committer (started by the first join; see [`join`]).
    joins: std::sync::OnceLock<std::sync::mpsc::Sender<join::PendingJoin>>,
}

impl ApiState {
    pub fn new(
        server: NodeKey,
        store: Store,
        settings: Settings,
        dataplane: DataplaneInfo,
        peers: Option<PeerSync>,
    ) -> Self {
        let hash = store.state_hash();
        let root = store.root();
        ApiState {
            root,
            server,
            store: Mutex::new(store),
            challenges: Mutex::new(auth::Challenges::new()),
            settings,
            dataplane,
            peers,
            clock: Clock::default(),
            limiter: ratelimit::Limiter::unlimited(),
            state_hash: Mutex::new(Some(hash)),
            version: std::sync::atomic::AtomicU64::new(0),
            observations: Mutex::new(observed::Observations::default()),
            rng: SystemRandom::new(),
            joins: std::sync::OnceLock::new(),
        }
    }

    /// Limits every client address to `per_sec` requests per second (bursts of `burst`).
    pub fn with_rate_limit(mut self, per_sec: u32, burst: u32) -> Self {
        self.limiter = ratelimit::Limiter::new(per_sec, burst);
        self
    }

    /// The current state hash (recomputed if the state changed since it was last asked).
    pub fn state_hash(&self) -> [u8; 32] {
        let cached = *self.state_hash.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = cached {
            return h;
        }
        // Computed outside the cache lock; a join racing with us only marks it stale again.
        let h = self.lock_store().state_hash();
        let mut c = self.state_hash.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some(h);
        }
        h
    }

    /// Marks the cached hash stale and counts a new version (after an append; called with the
    /// store still locked, the version then names exactly the state that includes the append).
    pub fn state_changed(&self) {
        *self.state_hash.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// The number of local changes so far (read it under the store lock to name that state).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], ApiError> {
        let mut b = [0u8; N];
        self.rng
            .fill(&mut b)
            .map_err(|_| ApiError::internal("system random number generator failed"))?;
        Ok(b)
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half-written (every change is
        // one redb transaction), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_challenges(&self) -> std::sync::MutexGuard<'_, auth::Challenges> {
        self.challenges.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The JSON extractor's configuration: bounded bodies, and every rejection as an [`ApiError`].
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_JSON_BYTES)
        .error_handler(|err, _req| {
            use actix_web::error::JsonPayloadError as E;
            let e = match &err {
                E::ContentType => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "the body must be JSON (Content-Type: application/json)",
                ),
                E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is larger than {limit} bytes"),
                ),
                other => ApiError::bad_request("invalid_json", other.to_string()),
            };
            e.into()
        })
}

/// The answer to a request no route matches (an unknown path, a wrong method, the `*` target).
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route (or method not allowed)",
    ))
}

/// The OpenAPI 3.1 document of the public API, generated from the handlers and types
/// (committed as `data-schema/openapi-public.json`; a test fails when the two drift apart).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Lemonade Nexus public API",
        description = "Bootstrap API: health, Ed25519 proof-of-possession authentication, join. Errors are {\"error\": {\"code\", \"message\"}}."
    ),
    paths(
        health::get,
        servers::get,
        auth::post_challenge,
        auth::post_auth,
        join::post_join,
        trust::post_revocation
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&CommonResponses)
)]
pub struct PublicApiDoc;

/// Adds to every operation the answers the HTTP layer gives before its handler runs (the rate
/// limiter's 429; for a route with a body, the JSON extractor's 400, 413 and 415; for a route
/// with a path parameter, the path's 400; for a route that needs a token, the 401), so the
/// documents list every answer a route can give. Answers a route documents itself are kept.
pub struct CommonResponses;

impl CommonResponses {
    fn add(op: &mut utoipa::openapi::path::Operation) {
        let mut add = |status: &str, what: &str| {
            let error = utoipa::openapi::ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                .build();
            let r = utoipa::openapi::ResponseBuilder::new()
                .description(what)
                .content("application/json", error)
                .build();
            op.responses
                .responses
                .entry(status.into())
                .or_insert(r.into());
        };
        add("429", "Too many requests from this address (rate limit)");
        if op.request_body.is_some() {
            add("400", "Malformed JSON body, or a field out of range");
            add("413", "Body larger than 16 KiB");
            add("415", "Body not sent as Content-Type: application/json");
        }
        if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
            add("400", "Malformed path or query parameter");
        }
        if op.security.is_some() {
            add("401", "Missing, expired or foreign token");
        }
    }
}

impl utoipa::Modify for CommonResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                Self::add(op);
            }
        }
    }
}

/// The document as pretty JSON (what is committed).
pub fn openapi_document() -> String {
    use utoipa::OpenApi;
    let mut doc = PublicApiDoc::openapi();
    // The crate version would make the committed file change on every release bump.
    doc.info.version = "1".into();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi_document())
}

/// Registers the public API on an actix app: `App::new().configure(api::public(state))`.
pub fn public(state: Arc<ApiState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::from(state))
            .app_data(json_config())
            // Outside every scope too (`OPTIONS *` matches no scope), so no answer is bare.
            .default_service(web::to(not_found))
            .service(
                // One scope so every route, the unknown ones too, passes the rate limiter.
                web::scope("")
                    .wrap(actix_web::middleware::from_fn(ratelimit::limit))
                    .route("/api/health", web::get().to(health::get))
                    .route("/api/servers", web::get().to(servers::get))
                    .route("/api/auth/challenge", web::post().to(auth::post_challenge))
                    .route("/api/auth", web::post().to(auth::post_auth))
                    .route("/api/join", web::post().to(join::post_join))
                    .route(
                        "/api/trust/revocations",
                        web::post().to(trust::post_revocation),
                    )
                    .route("/api/openapi.json", web::get().to(openapi_json))
                    .default_service(web::to(not_found)),
            );
    }
}
