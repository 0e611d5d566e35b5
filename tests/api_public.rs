//! The public API walked route by route in-process (actix's test service: real handlers, real
//! store in a temporary directory, no WireGuard), and over a real TLS listener on 127.0.0.1:0
//! for the certificate pin.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{App, test};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lemonade_nexus::api::auth::{self, AuthResponse, ChallengeResponse, make_proof};
use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::api::join::{JoinResponse, Registration};
use lemonade_nexus::api::{self, ApiState, DataplaneInfo, Settings};
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::store::Store;
use lemonade_nexus::testkit;
use lemonade_nexus::tls::{self, JoinUrl, Pin};
use serde_json::{Value, json};

const SERVER_SEED: [u8; 32] = [1; 32];

/// A genesis server's API state in `dir`.
fn api_state(dir: &std::path::Path, registration: Registration) -> Arc<ApiState> {
    Arc::new(build_state(dir, registration))
}

fn build_state(dir: &std::path::Path, registration: Registration) -> ApiState {
    let server = NodeKey::from_seed(&SERVER_SEED);
    testkit::genesis_api_state(dir, server, registration, None, IpamConfig::default())
}

macro_rules! app {
    ($state:expr) => {
        test::init_service(App::new().configure(api::public($state.clone()))).await
    };
}

async fn post(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let req = test::TestRequest::post()
        .uri(path)
        .set_json(body)
        .to_request();
    let resp = test::call_service(app, req).await;
    let status = resp.status();
    let bytes = test::read_body(resp).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{path}: body is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

/// Asks for a challenge for `key` and returns the proof answering it.
async fn proof_for(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
    key: &NodeKey,
) -> String {
    let (s, v) = post(
        app,
        "/api/auth/challenge",
        json!({ "pubkey": key.public().to_string() }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c: ChallengeResponse = serde_json::from_value(v).expect("challenge shape");
    assert_eq!(c.domain, auth::TAG_AUTH);
    let server = c.server_key.parse().expect("server key");
    make_proof(
        key.pair(),
        &c.challenge().expect("challenge"),
        server,
        now(),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn wg(seed: u8) -> String {
    STANDARD.encode([seed; 32])
}

#[actix_web::test]
async fn health_reports_backend_state_hash_and_server_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let resp = test::call_service(
        &app,
        test::TestRequest::get().uri("/api/health").to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = test::read_body_json(resp).await;
    assert_eq!(v["status"], "ok");
    assert_eq!(v["dataplane"]["backend"], "none");
    assert_eq!(v["dataplane_fell_back"], false);
    assert_eq!(
        v["server_key"],
        NodeKey::from_seed(&SERVER_SEED).public().to_string()
    );
    assert_eq!(v["state_hash"].as_str().expect("hash").len(), 64);
}

#[actix_web::test]
async fn bad_input_is_a_json_4xx_never_a_500() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let cases: Vec<(test::TestRequest, StatusCode, &str)> = vec![
        (
            test::TestRequest::post()
                .uri("/api/auth/challenge")
                .insert_header(("content-type", "application/json"))
                .set_payload("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            test::TestRequest::post()
                .uri("/api/auth/challenge")
                .set_json(json!({ "pubkey": 5 })),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            test::TestRequest::post()
                .uri("/api/auth/challenge")
                .set_json(json!({ "pubkey": "AAAA" })),
            StatusCode::BAD_REQUEST,
            "bad_pubkey",
        ),
        (
            test::TestRequest::post()
                .uri("/api/auth/challenge")
                .set_json(json!({ "pubkey": "x", "extra": 1 })),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            test::TestRequest::post()
                .uri("/api/auth/challenge")
                .insert_header(("content-type", "text/plain"))
                .set_payload("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            test::TestRequest::post()
                .uri("/api/join")
                .insert_header(("content-type", "application/json"))
                .set_payload(vec![b' '; 64 * 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            test::TestRequest::post()
                .uri("/api/join")
                .set_json(json!({ "proof": "x", "wg_pubkey": "short" })),
            StatusCode::BAD_REQUEST,
            "bad_wg_pubkey",
        ),
        (
            test::TestRequest::post()
                .uri("/api/auth")
                .set_json(json!({ "proof": "%%%" })),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            test::TestRequest::get().uri("/api/nope"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            test::TestRequest::get().uri("/api/join"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (req, status, code) in cases {
        let req = req.to_request();
        let what = format!("{} {}", req.method(), req.path());
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), status, "{what}");
        let v: Value = test::read_body_json(resp).await;
        assert_eq!(error_code(&v), code, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
    }
}

#[actix_web::test]
async fn a_token_needs_proof_of_possession_and_a_challenge_works_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let client = NodeKey::from_seed(&[2; 32]);

    // No proof, no token: a proof signed by another key for the client's challenge fails.
    let (s, v) = post(
        &app,
        "/api/auth/challenge",
        json!({ "pubkey": client.public().to_string() }),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let c: ChallengeResponse = serde_json::from_value(v).expect("shape");
    let mallory = NodeKey::from_seed(&[3; 32]);
    let forged = make_proof(
        mallory.pair(),
        &c.challenge().expect("c"),
        state.server.public(),
        now(),
    );
    let (s, v) = post(&app, "/api/auth", json!({ "proof": forged })).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "{v}"
    );

    // A valid proof gives a token that verifies against the tree.
    let proof = proof_for(&app, &client).await;
    let (s, v) = post(&app, "/api/auth", json!({ "proof": proof })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let a: AuthResponse = serde_json::from_value(v).expect("auth shape");
    assert_eq!(a.subject, client.public().to_string());
    assert_eq!(a.node_id, None, "not joined yet");
    let claims = {
        let store = state.store.lock().expect("lock");
        auth::verify_token(store.state().tree(), &a.token, now()).expect("token verifies")
    };
    assert_eq!(claims.subject, client.public());

    // The same proof again: the challenge is spent.
    let (s, v) = post(&app, "/api/auth", json!({ "proof": proof })).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("already used"),
        "{v}"
    );

    // A token is not a proof.
    let as_proof = STANDARD.encode(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&a.token)
            .expect("b64"),
    );
    let (s, _) = post(&app, "/api/auth", json!({ "proof": as_proof })).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn an_expired_challenge_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let client = NodeKey::from_seed(&[2; 32]);
    let proof = proof_for(&app, &client).await;
    state.clock.advance(auth::CHALLENGE_TTL_MS as i64 + 1);
    let (s, v) = post(&app, "/api/auth", json!({ "proof": proof })).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("expired"),
        "{v}"
    );
    // Nor can it be joined with.
    let proof = proof_for(&app, &client).await;
    state.clock.advance(auth::CHALLENGE_TTL_MS as i64 + 1);
    let (s, _) = post(
        &app,
        "/api/join",
        json!({ "proof": proof, "wg_pubkey": wg(2) }),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn joins_get_distinct_addresses_and_rejoin_keeps_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let hash_before = state.state_hash();
    let mut seen = Vec::new();
    for seed in [2u8, 3] {
        let key = NodeKey::from_seed(&[seed; 32]);
        let proof = proof_for(&app, &key).await;
        let (s, v) = post(
            &app,
            "/api/join",
            json!({ "proof": proof, "wg_pubkey": wg(seed), "hostname": format!("laptop{seed}") }),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let j: JoinResponse = serde_json::from_value(v).expect("join shape");
        assert!(!j.existing);
        assert_eq!(j.server_wg_endpoint, "203.0.113.7:51940");
        assert_eq!(j.server_wg_pubkey, wg(5));
        assert_eq!(j.server_tunnel_ipv4, "10.64.0.1");
        assert_eq!(j.allowed_ips, vec!["10.64.0.0/10", "fd6c:6e00::/48"]);
        assert_eq!(j.private_api, "https://10.64.0.1:9101");
        assert_eq!(j.addresses.len(), 2);
        let claims = {
            let store = state.store.lock().expect("lock");
            auth::verify_token(store.state().tree(), &j.token, now()).expect("token")
        };
        assert_eq!(claims.node.map(|n| n.to_string()), Some(j.node_id.clone()));
        seen.push(j);
    }
    assert_ne!(seen[0].tunnel_ipv4, seen[1].tunnel_ipv4);
    assert_ne!(seen[0].tunnel_ipv6, seen[1].tunnel_ipv6);
    assert_ne!(
        seen[0].group_id, seen[1].group_id,
        "each device in its own group"
    );
    assert_ne!(
        state.state_hash(),
        hash_before,
        "health's hash follows the store"
    );

    // The first device again: same node, same address.
    let key = NodeKey::from_seed(&[2; 32]);
    let proof = proof_for(&app, &key).await;
    let (s, v) = post(
        &app,
        "/api/join",
        json!({ "proof": proof, "wg_pubkey": wg(2) }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let again: JoinResponse = serde_json::from_value(v).expect("shape");
    assert!(again.existing);
    assert_eq!(
        (again.node_id, again.tunnel_ipv4),
        (seen[0].node_id.clone(), seen[0].tunnel_ipv4.clone())
    );

    // Another device presenting the first one's WireGuard key is refused.
    let thief = NodeKey::from_seed(&[9; 32]);
    let proof = proof_for(&app, &thief).await;
    let (s, v) = post(
        &app,
        "/api/join",
        json!({ "proof": proof, "wg_pubkey": wg(2) }),
    )
    .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "wg_key_in_use"),
        "{v}"
    );

    // A bad hostname is a 400 (after authentication, which consumed the challenge).
    let k4 = NodeKey::from_seed(&[4; 32]);
    let proof = proof_for(&app, &k4).await;
    let (s, v) = post(
        &app,
        "/api/join",
        json!({ "proof": proof, "wg_pubkey": wg(4), "hostname": "no spaces" }),
    )
    .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "bad_hostname"),
        "{v}"
    );
}

#[actix_web::test]
async fn closed_registration_refuses_new_devices_but_not_enrolled_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let enrolled = NodeKey::from_seed(&[2; 32]);
    {
        let state = api_state(dir.path(), Registration::Open);
        let app = app!(state);
        let proof = proof_for(&app, &enrolled).await;
        let (s, v) = post(
            &app,
            "/api/join",
            json!({ "proof": proof, "wg_pubkey": wg(2) }),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let state = {
        // Reopen the same store with registration closed.
        let server = NodeKey::from_seed(&SERVER_SEED);
        let (store, _) = Store::open(&dir.path().join("state.redb")).expect("open");
        let settings = Settings {
            registration: Registration::Closed,
            wg_public_key: [5; 32],
            wg_port: 51940,
            public_host: None,
            private_api_port: 9101,
            api_port: 9100,
            tls_pin: None,
        };
        let dp = DataplaneInfo {
            backend: "none".into(),
            fallback_reason: None,
            interface: None,
        };
        Arc::new(ApiState::new(server, store, settings, dp, None))
    };
    let app = app!(state);
    let newcomer = NodeKey::from_seed(&[3; 32]);
    let proof = proof_for(&app, &newcomer).await;
    let (s, v) = post(
        &app,
        "/api/join",
        json!({ "proof": proof, "wg_pubkey": wg(3) }),
    )
    .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::FORBIDDEN, "registration_closed"),
        "{v}"
    );
    let proof = proof_for(&app, &enrolled).await;
    let (s, v) = post(
        &app,
        "/api/join",
        json!({ "proof": proof, "wg_pubkey": wg(2) }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["existing"], true);
}

/// A real HTTPS listener with the generated certificate: the pinned client gets through with the
/// right pin (and joins), and refuses the server with any other pin.
#[core::prelude::v1::test]
fn the_pin_check_refuses_a_wrong_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let cert = tls::load_or_generate(None, None, dir.path(), &["localhost".into()]).expect("cert");
    let tls_cfg = tls::server_config(&cert).expect("tls config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    let st = state.clone();
    let server_thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let srv =
                actix_web::HttpServer::new(move || App::new().configure(api::public(st.clone())))
                    .workers(1)
                    .disable_signals()
                    .listen_rustls_0_23(listener, tls_cfg)
                    .expect("listen")
                    .run();
            tx.send(srv.handle()).expect("send handle");
            srv.await.expect("server");
        })
    });
    let handle = rx.recv().expect("server started");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let good = PinnedClient::new(JoinUrl {
            host: "127.0.0.1".into(),
            port,
            pin: cert.pin,
        })
        .expect("client");
        let h: Value = good
            .get("/api/health")
            .await
            .expect("health")
            .json()
            .expect("json");
        assert_eq!(h["status"], "ok");
        let key = NodeKey::from_seed(&[7; 32]);
        let j = good
            .join(&key, &wg(7), Some("pinned"))
            .await
            .expect("join over https");
        assert_eq!(j.server_wg_endpoint, "203.0.113.7:51940");
        let a = good.auth(&key).await.expect("auth over https");
        assert_eq!(a.node_id, Some(j.node_id));

        let mut wrong = cert.pin.0;
        wrong[0] ^= 1;
        let bad = PinnedClient::new(JoinUrl {
            host: "127.0.0.1".into(),
            port,
            pin: Pin(wrong),
        })
        .expect("client");
        let e = bad
            .get("/api/health")
            .await
            .expect_err("wrong pin must fail");
        let msg = format!("{e:#}");
        assert!(msg.contains("pin"), "{msg}");
    });
    rt.block_on(handle.stop(true));
    server_thread.join().expect("server thread");
}

/// The committed OpenAPI document is the one the code generates (regenerate with
/// `LN_UPDATE_OPENAPI=1 cargo test --test api_public openapi`), and the server serves it.
#[actix_web::test]
async fn the_committed_openapi_document_matches_the_code_and_is_served() {
    let generated = api::openapi_document();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data-schema/openapi-public.json"
    );
    if std::env::var_os("LN_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).expect("write the document");
    }
    let committed = std::fs::read_to_string(path)
        .expect("data-schema/openapi-public.json (create it with LN_UPDATE_OPENAPI=1)");
    assert!(
        committed == generated,
        "data-schema/openapi-public.json differs from the code; regenerate it with LN_UPDATE_OPENAPI=1 cargo test --test api_public openapi"
    );
    let doc: Value = serde_json::from_str(&generated).expect("JSON");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    for route in [
        "/api/health",
        "/api/auth/challenge",
        "/api/auth",
        "/api/join",
    ] {
        assert!(doc["paths"][route].is_object(), "{route} documented");
    }

    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let resp = test::call_service(
        &app,
        test::TestRequest::get()
            .uri("/api/openapi.json")
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = test::read_body(resp).await;
    assert_eq!(body, generated.as_bytes());
}

#[actix_web::test]
async fn each_client_address_is_rate_limited_with_a_json_429() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = Arc::new(build_state(dir.path(), Registration::Open).with_rate_limit(1, 2));
    let app = app!(state);
    let a: std::net::SocketAddr = "192.0.2.1:40000".parse().expect("a");
    let b: std::net::SocketAddr = "192.0.2.2:40000".parse().expect("b");
    let get = |peer| {
        test::TestRequest::get()
            .uri("/api/health")
            .peer_addr(peer)
            .to_request()
    };
    for _ in 0..2 {
        assert_eq!(
            test::call_service(&app, get(a)).await.status(),
            StatusCode::OK
        );
    }
    let resp = test::call_service(&app, get(a)).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let v: Value = test::read_body_json(resp).await;
    assert_eq!(error_code(&v), "rate_limited");
    // Unknown routes count too, and another address is unaffected.
    let resp = test::call_service(
        &app,
        test::TestRequest::get().uri("/x").peer_addr(a).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        test::call_service(&app, get(b)).await.status(),
        StatusCode::OK
    );
}

#[actix_web::test]
async fn servers_lists_this_server_first_with_its_api_endpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let app = app!(state);
    let resp = test::call_service(
        &app,
        test::TestRequest::get().uri("/api/servers").to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = test::read_body_json(resp).await;
    let list = v.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["is_self"], true);
    assert_eq!(list[0]["server_key"], state.server.public().to_string());
    assert_eq!(list[0]["api_endpoint"], "203.0.113.7:9100");
    assert_eq!(list[0]["hostname"], "srv");
}
