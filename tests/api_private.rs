//! The private API walked route by route, role by role, in-process (actix's test service: real
//! handlers, real store in a temporary directory, no WireGuard). Devices enrol through the real
//! public join; tokens come from the real join and `/api/auth`, or are forged the way an attacker
//! or a stale client would hold them (expired, issued by another cluster).

use std::sync::Arc;

use actix_web::http::{Method, StatusCode};
use actix_web::{App, test};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lemonade_nexus::api::auth::{self, ChallengeResponse, TokenClaims, make_proof};
use lemonade_nexus::api::join::{JoinResponse, Registration};
use lemonade_nexus::api::{self, ApiState};
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::testkit;
use serde_json::{Value, json};

const SERVER_SEED: [u8; 32] = [1; 32];
const ADMIN_SEED: [u8; 32] = [9; 32];

fn api_state(dir: &std::path::Path, registration: Registration) -> Arc<ApiState> {
    api_state_with(dir, registration, IpamConfig::default())
}

fn api_state_with(
    dir: &std::path::Path,
    registration: Registration,
    ipam: IpamConfig,
) -> Arc<ApiState> {
    let server = NodeKey::from_seed(&SERVER_SEED);
    let admin = NodeKey::from_seed(&ADMIN_SEED).public();
    Arc::new(testkit::genesis_api_state(
        dir,
        server,
        registration,
        Some(admin),
        ipam,
    ))
}

trait Svc:
    actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >
{
}
impl<T> Svc for T where
    T: actix_web::dev::Service<
            actix_http::Request,
            Response = actix_web::dev::ServiceResponse,
            Error = actix_web::Error,
        >
{
}

async fn call(
    app: &impl Svc,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = test::TestRequest::default()
        .method(method.clone())
        .uri(path);
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    if let Some(b) = body {
        req = req.set_json(b);
    }
    let resp = test::call_service(app, req.to_request()).await;
    let status = resp.status();
    let bytes = test::read_body(resp).await;
    if bytes.is_empty() {
        return (status, Value::Null);
    }
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{method} {path}: body is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn proof_for(public: &impl Svc, key: &NodeKey) -> String {
    let (s, v) = call(
        public,
        Method::POST,
        "/api/auth/challenge",
        None,
        Some(json!({ "pubkey": key.public().to_string() })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c: ChallengeResponse = serde_json::from_value(v).expect("challenge shape");
    let server = c.server_key.parse().expect("server key");
    make_proof(
        key.pair(),
        &c.challenge().expect("challenge"),
        server,
        now(),
    )
}

/// Joins device `seed` through the public API; returns the status and the body.
async fn join(public: &impl Svc, seed: u8, setup_key: Option<&str>) -> (StatusCode, Value) {
    let key = NodeKey::from_seed(&[seed; 32]);
    let proof = proof_for(public, &key).await;
    let mut body = json!({ "proof": proof, "wg_pubkey": STANDARD.encode([seed; 32]) });
    if let Some(k) = setup_key {
        body["setup_key"] = json!(k);
    }
    call(public, Method::POST, "/api/join", None, Some(body)).await
}

async fn joined(public: &impl Svc, seed: u8, setup_key: Option<&str>) -> JoinResponse {
    let (s, v) = join(public, seed, setup_key).await;
    assert_eq!(s, StatusCode::OK, "join {seed}: {v}");
    serde_json::from_value(v).expect("join shape")
}

/// The administrator's token, through the real `/api/auth`.
async fn admin_token(public: &impl Svc) -> String {
    let admin = NodeKey::from_seed(&ADMIN_SEED);
    let proof = proof_for(public, &admin).await;
    let (s, v) = call(
        public,
        Method::POST,
        "/api/auth",
        None,
        Some(json!({ "proof": proof })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["token"].as_str().expect("token").to_owned()
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

fn ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes: {v}"))
        .iter()
        .map(|n| n["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

macro_rules! apps {
    ($state:expr) => {
        (
            test::init_service(App::new().configure(api::public($state.clone()))).await,
            test::init_service(App::new().configure(api::private::routes($state.clone()))).await,
        )
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Admin,
    Owner,
    Other,
    NoToken,
    Expired,
    Foreign,
}
use Role::*;
const ROLES: [Role; 6] = [Admin, Owner, Other, NoToken, Expired, Foreign];

/// Every private route, every role: the status (and error code) each one gets.
#[actix_web::test]
async fn every_private_route_answers_every_role_as_its_permissions_say() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);

    // The owner (device 2, its own group under open registration) and another customer's device.
    let tokens = Tokens::new(&public, &state).await;
    let (a, c, admin) = (&tokens.owner, &tokens.other, &tokens.admin);
    let token = |r: Role| tokens.of(r);
    let unauth = |r: Role| matches!(r, NoToken | Expired | Foreign);
    let g = a.group_id.clone();

    // GET /api/tree: each sees the subtrees it may read, the unauthenticated nothing.
    for r in ROLES {
        let (s, v) = call(
            &private,
            Method::GET,
            "/api/tree",
            token(r).as_deref(),
            None,
        )
        .await;
        if unauth(r) {
            assert_eq!(
                (s, code(&v)),
                (StatusCode::UNAUTHORIZED, "unauthorized"),
                "{r:?}"
            );
            continue;
        }
        assert_eq!(s, StatusCode::OK, "{r:?}: {v}");
        let seen = ids(&v);
        match r {
            Admin => {
                for id in [&a.group_id, &a.node_id, &c.group_id, &c.node_id] {
                    assert!(seen.contains(id), "admin sees {id}");
                }
            }
            Owner => {
                let mut want = vec![a.group_id.clone(), a.node_id.clone()];
                want.sort();
                assert_eq!(seen, want, "the owner sees its group's subtree only");
            }
            Other => assert!(!seen.contains(&a.group_id) && seen.contains(&c.node_id)),
            _ => unreachable!(),
        }
    }

    // Reads of the owner's group and its children.
    for path in [format!("/api/tree/{g}"), format!("/api/tree/{g}/children")] {
        for r in ROLES {
            let (s, v) = call(&private, Method::GET, &path, token(r).as_deref(), None).await;
            let want = match r {
                Admin | Owner => StatusCode::OK,
                Other => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            assert_eq!(s, want, "{r:?} GET {path}: {v}");
        }
    }
    let (_, v) = call(
        &private,
        Method::GET,
        &format!("/api/tree/{g}/children"),
        Some(&a.token),
        None,
    )
    .await;
    assert_eq!(ids(&v), vec![a.node_id.clone()]);

    // Create, update, delete a child of the owner's group.
    let mut created = Vec::new();
    for (i, r) in ROLES.into_iter().enumerate() {
        let body = json!({ "kind": "endpoint", "hostname": format!("made-{i}") });
        let (s, v) = call(
            &private,
            Method::POST,
            &format!("/api/tree/{g}/children"),
            token(r).as_deref(),
            Some(body),
        )
        .await;
        match r {
            Admin | Owner => {
                assert_eq!(s, StatusCode::CREATED, "{r:?}: {v}");
                assert_eq!(v["parent"], json!(g));
                created.push((r, v["id"].as_str().expect("id").to_owned()));
            }
            Other => assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{r:?}"),
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    let target = created[1].1.clone(); // the owner's
    for (i, r) in ROLES.into_iter().enumerate() {
        let body =
            json!({ "hostname": format!("renamed-{i}"), "metadata": { "role": format!("{r:?}") } });
        let (s, v) = call(
            &private,
            Method::PATCH,
            &format!("/api/tree/{target}"),
            token(r).as_deref(),
            Some(body),
        )
        .await;
        let want = match r {
            Admin | Owner => StatusCode::OK,
            Other => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        assert_eq!(s, want, "{r:?} PATCH: {v}");
        if s == StatusCode::OK {
            assert_eq!(v["hostname"], json!(format!("renamed-{i}")));
        }
    }
    for r in [Other, NoToken, Expired, Foreign, Owner] {
        let (s, v) = call(
            &private,
            Method::DELETE,
            &format!("/api/tree/{target}"),
            token(r).as_deref(),
            None,
        )
        .await;
        let want = match r {
            Owner => StatusCode::NO_CONTENT,
            Other => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        assert_eq!(s, want, "{r:?} DELETE: {v}");
    }
    let (s, _) = call(
        &private,
        Method::GET,
        &format!("/api/tree/{target}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "deleted");
    let (s, _) = call(
        &private,
        Method::DELETE,
        &format!("/api/tree/{}", created[0].1),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // Heartbeat: each device on its own node; the admin's token names no device.
    for r in ROLES {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/heartbeat",
            token(r).as_deref(),
            Some(json!({ "endpoint": "198.51.100.2:51820" })),
        )
        .await;
        match r {
            Admin => assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "no_device")),
            Owner | Other => {
                assert_eq!(s, StatusCode::OK, "{r:?}: {v}");
                assert_eq!(v["changed"], true);
            }
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/heartbeat",
        Some(&a.token),
        Some(json!({ "endpoint": "198.51.100.2:51820" })),
    )
    .await;
    assert_eq!(
        (s, &v["changed"]),
        (StatusCode::OK, &json!(false)),
        "unchanged: no op"
    );
    let (_, v) = call(
        &private,
        Method::GET,
        &format!("/api/tree/{}", a.node_id),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(v["endpoint"], "198.51.100.2:51820");

    // Setup keys: for the owner's group.
    let mut keys = Vec::new();
    for r in ROLES {
        let body = json!({ "group": g, "expires_in_secs": 3600 });
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/setup-keys",
            token(r).as_deref(),
            Some(body),
        )
        .await;
        match r {
            Admin | Owner => {
                assert_eq!(s, StatusCode::CREATED, "{r:?}: {v}");
                keys.push(v["setup_key"].as_str().expect("key").to_owned());
            }
            Other => assert_eq!(s, StatusCode::FORBIDDEN, "{r:?}: {v}"),
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }

    // Mesh peers: B joins the owner's group with the owner's key; A and B see each other, C neither.
    let b = joined(&public, 3, Some(&keys[1])).await;
    assert_eq!(b.group_id, g, "the setup key's group");
    let b_token = b.token.clone();
    for r in ROLES {
        let (s, v) = call(
            &private,
            Method::GET,
            "/api/mesh/peers",
            token(r).as_deref(),
            None,
        )
        .await;
        match r {
            Admin => assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "no_device")),
            Owner => {
                assert_eq!(s, StatusCode::OK, "{v}");
                let peers: Vec<&str> = v["peers"]
                    .as_array()
                    .expect("peers")
                    .iter()
                    .map(|p| p["node_id"].as_str().expect("id"))
                    .collect();
                assert_eq!(peers, vec![b.node_id.as_str()]);
                assert_eq!(
                    v["peers"][0]["allowed_ips"][0],
                    json!(format!("{}/32", b.tunnel_ipv4))
                );
            }
            Other => {
                assert_eq!(s, StatusCode::OK, "{v}");
                assert_eq!(v["peers"], json!([]), "C is alone in its group");
            }
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    let (s, v) = call(
        &private,
        Method::GET,
        "/api/mesh/peers",
        Some(&b_token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["peers"][0]["node_id"], json!(a.node_id));
    assert_eq!(v["peers"][0]["endpoint"], "198.51.100.2:51820");

    // Unknown routes and bad ids are JSON 4xx too.
    let (s, v) = call(&private, Method::GET, "/api/nope", Some(admin), None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = call(&private, Method::GET, "/api/tree/zz", Some(admin), None).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_node_id"));
    let (s, v) = call(&private, Method::GET, "/api/tree", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The scheme is case-insensitive; anything but Bearer is refused.
    for (header, want) in [
        (format!("bearer {admin}"), StatusCode::OK),
        (format!("Basic {admin}"), StatusCode::UNAUTHORIZED),
        (admin.clone(), StatusCode::UNAUTHORIZED),
        ("Bearer ".to_owned(), StatusCode::UNAUTHORIZED),
        ("Bearer not-a-token".to_owned(), StatusCode::UNAUTHORIZED),
    ] {
        let req = test::TestRequest::get()
            .uri("/api/tree")
            .insert_header(("authorization", header.clone()))
            .to_request();
        let resp = test::call_service(&private, req).await;
        assert_eq!(resp.status(), want, "{header}");
    }
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("Bearer")
    );
}

/// A device admitted by a setup key reads its group but cannot change it, and nobody changes
/// nodes outside their subtree, even by naming them directly.
#[actix_web::test]
async fn a_user_neither_reads_nor_changes_nodes_outside_its_subtree() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);
    let a = joined(&public, 2, None).await;
    let c = joined(&public, 4, None).await;
    let cg = &c.group_id;
    for (m, path, body) in [
        (Method::GET, format!("/api/tree/{cg}"), None),
        (Method::GET, format!("/api/tree/{}", c.node_id), None),
        (Method::GET, format!("/api/tree/{cg}/children"), None),
        (
            Method::POST,
            format!("/api/tree/{cg}/children"),
            Some(json!({"kind": "endpoint", "hostname": "x"})),
        ),
        (
            Method::PATCH,
            format!("/api/tree/{}", c.node_id),
            Some(json!({"hostname": "x"})),
        ),
        (Method::DELETE, format!("/api/tree/{}", c.node_id), None),
        (
            Method::GET,
            "/api/tree/00000000000000000000000000000000".to_owned(),
            None,
        ),
        (
            Method::POST,
            "/api/tree/00000000000000000000000000000000/children".to_owned(),
            Some(json!({"kind": "endpoint", "hostname": "x"})),
        ),
        (
            Method::POST,
            "/api/setup-keys".to_owned(),
            Some(json!({"group": cg, "expires_in_secs": 60})),
        ),
    ] {
        let (s, v) = call(&private, m.clone(), &path, Some(&a.token), body).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{m} {path}: {v}"
        );
    }
    // Nor upwards: the root, the server node.
    let (s, _) = call(
        &private,
        Method::GET,
        &format!("/api/tree/{}", "00".repeat(16)),
        Some(&a.token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The escalations the API refuses outright: a server node, someone else's key as owner.
    let (s, v) = call(
        &private,
        Method::POST,
        &format!("/api/tree/{}/children", a.group_id),
        Some(&a.token),
        Some(json!({"kind": "server", "hostname": "evil"})),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_kind"));
    let victim = NodeKey::from_seed(&[4; 32]).public().to_string();
    let (s, v) = call(
        &private,
        Method::POST,
        &format!("/api/tree/{}/children", a.group_id),
        Some(&a.token),
        Some(json!({"kind": "endpoint", "hostname": "trap", "owner": victim})),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    let (s, v) = call(
        &private,
        Method::PATCH,
        &format!("/api/tree/{}", a.group_id),
        Some(&a.token),
        Some(json!({"metadata": {"ln:sk:00": "1:reusable"}})),
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "reserved_metadata")
    );

    // A setup-key device: reads its group, changes nothing but its own endpoint.
    let (_, v) = call(
        &private,
        Method::POST,
        "/api/setup-keys",
        Some(&a.token),
        Some(json!({"group": a.group_id, "expires_in_secs": 60, "reusable": true})),
    )
    .await;
    let key = v["setup_key"].as_str().expect("key").to_owned();
    let d = joined(&public, 6, Some(&key)).await;
    let (s, _) = call(
        &private,
        Method::GET,
        &format!("/api/tree/{}", a.group_id),
        Some(&d.token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for (m, path, body) in [
        (
            Method::POST,
            format!("/api/tree/{}/children", a.group_id),
            Some(json!({"kind": "endpoint", "hostname": "x"})),
        ),
        (
            Method::PATCH,
            format!("/api/tree/{}", a.node_id),
            Some(json!({"hostname": "x"})),
        ),
        (Method::DELETE, format!("/api/tree/{}", a.node_id), None),
        (
            Method::POST,
            "/api/setup-keys".to_owned(),
            Some(json!({"group": a.group_id, "expires_in_secs": 60})),
        ),
    ] {
        let (s, v) = call(&private, m.clone(), &path, Some(&d.token), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{m} {path}: {v}");
    }
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/heartbeat",
        Some(&d.token),
        Some(json!({"endpoint": "[2001:db8::1]:5"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[actix_web::test]
async fn setup_keys_single_use_expiry_and_target_group_under_closed_registration() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Closed);
    let (public, private) = apps!(state);
    let admin = admin_token(&public).await;

    // Closed: no key, no entry.
    let (s, v) = join(&public, 2, None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "registration_closed")
    );

    // The admin makes a group and keys for it.
    let (s, v) = call(
        &private,
        Method::POST,
        &format!("/api/tree/{}/children", "00".repeat(16)),
        Some(&admin),
        Some(json!({"kind": "customer", "hostname": "acme"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let acme = v["id"].as_str().expect("id").to_owned();
    let mk = |reusable: bool, secs: u64| json!({"group": acme, "reusable": reusable, "expires_in_secs": secs});
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/setup-keys",
        Some(&admin),
        Some(mk(false, 3600)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["reusable"], false);
    let single = v["setup_key"].as_str().expect("key").to_owned();

    // Single use: the first device joins acme, the second is refused, the first rejoins freely.
    let d2 = joined(&public, 2, Some(&single)).await;
    assert_eq!(d2.group_id, acme, "landed in the key's group");
    let (s, v) = join(&public, 3, Some(&single)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "setup_key_invalid"),
        "used twice"
    );
    let again = joined(&public, 2, Some(&single)).await;
    assert_eq!((again.node_id, again.existing), (d2.node_id.clone(), true));

    // Unknown key.
    let (s, v) = join(&public, 3, Some("lnsk_not-a-key")).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "setup_key_invalid"));

    // Reusable: two devices, same group.
    let (_, v) = call(
        &private,
        Method::POST,
        "/api/setup-keys",
        Some(&admin),
        Some(mk(true, 60)),
    )
    .await;
    let reusable = v["setup_key"].as_str().expect("key").to_owned();
    let d3 = joined(&public, 3, Some(&reusable)).await;
    let d4 = joined(&public, 4, Some(&reusable)).await;
    assert_eq!(
        (d3.group_id.as_str(), d4.group_id.as_str()),
        (acme.as_str(), acme.as_str())
    );

    // Wrong group: the device owner cannot make keys for acme (it only reads it), nor for a node
    // that is not a group; bad expiry is a 400.
    let (s, _) = call(
        &private,
        Method::POST,
        "/api/setup-keys",
        Some(&d3.token),
        Some(mk(true, 60)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/setup-keys",
        Some(&admin),
        Some(json!({"group": d3.node_id, "expires_in_secs": 60})),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "not_a_group"));
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/setup-keys",
        Some(&admin),
        Some(mk(true, 0)),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_expiry"));

    // Expired: a minute later the reusable key is refused.
    state.clock.advance(61_000);
    let (s, v) = join(&public, 8, Some(&reusable)).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "setup_key_expired"));
}

/// One HTTPS request with a bearer token over a pinned TLS connection; returns the status line's
/// code and the body.
async fn https(port: u16, pin: lemonade_nexus::tls::Pin, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = lemonade_nexus::tls::pinned_client_config(pin).expect("client config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req =
        format!("GET /api/tree HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\r\n");
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

/// The private routes over a real TLS listener with the server's certificate (here on
/// 127.0.0.1:0: no tunnel exists in this test; `serve` binds the tunnel address).
#[core::prelude::v1::test]
fn the_private_api_over_real_tls_needs_a_bearer_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let cert = lemonade_nexus::tls::load_or_generate(None, None, dir.path(), &["localhost".into()])
        .expect("cert");
    let tls_cfg = lemonade_nexus::tls::server_config(&cert).expect("tls config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    let st = state.clone();
    let server_thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let srv = actix_web::HttpServer::new(move || {
                App::new().configure(api::private::routes(st.clone()))
            })
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
    // A device joins in-process (same state), then talks HTTPS to the private listener.
    let sys = actix_web::rt::System::new();
    let token = sys.block_on(async {
        let public = test::init_service(App::new().configure(api::public(state.clone()))).await;
        joined(&public, 2, None).await.token
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let (code, body) = https(port, cert.pin, Some(&token)).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).expect("json")["nodes"]
                .as_array()
                .expect("nodes")
                .len(),
            2,
            "its group and its device"
        );
        let (code, body) = https(port, cert.pin, None).await;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("\"unauthorized\""), "{body}");
    });
    rt.block_on(handle.stop(true));
    server_thread.join().expect("server thread");
}

/// The committed OpenAPI document of the private API is the one the code generates (regenerate:
/// `LN_UPDATE_OPENAPI=1 cargo test --test api_private openapi`), and the private listener serves it.
#[actix_web::test]
async fn the_committed_private_openapi_document_matches_the_code() {
    let generated = api::private::openapi_document();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data-schema/openapi-private.json"
    );
    if std::env::var_os("LN_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).expect("write the document");
    }
    let committed = std::fs::read_to_string(path)
        .expect("data-schema/openapi-private.json (create it with LN_UPDATE_OPENAPI=1)");
    assert!(
        committed == generated,
        "data-schema/openapi-private.json differs from the code; regenerate it with LN_UPDATE_OPENAPI=1 cargo test --test api_private openapi"
    );
    let doc: Value = serde_json::from_str(&generated).expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    for route in [
        "/api/tree",
        "/api/tree/{id}",
        "/api/tree/{id}/children",
        "/api/heartbeat",
        "/api/mesh/peers",
        "/api/setup-keys",
    ] {
        assert!(doc["paths"][route].is_object(), "{route} documented");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (_, private) = apps!(state);
    let (s, v) = call(&private, Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, doc);
}

/// The tokens of every role, for a state where device 2 (the owner) and device 4 (another
/// customer) have joined.
struct Tokens {
    admin: String,
    owner: JoinResponse,
    other: JoinResponse,
    expired: String,
    foreign: String,
}

impl Tokens {
    async fn new(public: &impl Svc, state: &ApiState) -> Tokens {
        let owner = joined(public, 2, None).await;
        let other = joined(public, 4, None).await;
        let admin = admin_token(public).await;
        let server = NodeKey::from_seed(&SERVER_SEED);
        let claims = TokenClaims {
            subject: NodeKey::from_seed(&[2; 32]).public(),
            node: Some(lemonade_nexus::tree::NodeId(
                hex::decode(&owner.node_id)
                    .expect("hex")
                    .try_into()
                    .expect("16"),
            )),
            cluster: state.root,
        };
        let expired = auth::issue_token(server.pair(), &claims, now() - 2 * auth::TOKEN_TTL_MS, 1);
        let stranger = NodeKey::from_seed(&[77; 32]);
        let foreign = auth::issue_token(
            stranger.pair(),
            &TokenClaims {
                cluster: stranger.public(),
                ..claims
            },
            now(),
            2,
        );
        Tokens {
            admin,
            owner,
            other,
            expired,
            foreign,
        }
    }

    fn of(&self, r: Role) -> Option<String> {
        match r {
            Admin => Some(self.admin.clone()),
            Owner => Some(self.owner.token.clone()),
            Other => Some(self.other.token.clone()),
            NoToken => None,
            Expired => Some(self.expired.clone()),
            Foreign => Some(self.foreign.clone()),
        }
    }
}

/// Subnet allocation and expansion, role by role: only allocate_ip / expand_subnet holders (the
/// administrator here; a group owner has neither) change the IPAM; bad lengths are 400s with the
/// allowed range, a full pool and a taken supernet are 409s.
#[actix_web::test]
async fn ipam_subnet_routes_answer_every_role_as_its_permissions_say() {
    let dir = tempfile::tempdir().expect("tmp");
    // A shared pool of exactly one /20, so it can be exhausted.
    let cfg = IpamConfig {
        shared: "172.20.0.0/20".parse().expect("net"),
        ..IpamConfig::default()
    };
    let state = api_state_with(dir.path(), Registration::Open, cfg);
    let (public, private) = apps!(state);
    let t = Tokens::new(&public, &state).await;
    let g = t.owner.group_id.clone();

    for r in ROLES {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/ipam/subnets",
            t.of(r).as_deref(),
            Some(json!({ "node": g, "pool": "private", "prefix_len": 24 })),
        )
        .await;
        match r {
            Admin => {
                assert_eq!(s, StatusCode::CREATED, "{v}");
                assert_eq!(v["subnet"], json!("10.128.0.0/24"));
                assert_eq!(v["pool"], json!("private"));
            }
            Owner | Other => {
                assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{r:?}")
            }
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    let admin = Some(t.admin.as_str());
    // A second one in the same pool, a bad length, an unknown node, a bad pool name.
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": g, "pool": "private", "prefix_len": 24 })),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "already_has_subnet"));
    for len in [8, 15, 31, 255] {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/ipam/subnets",
            admin,
            Some(json!({ "node": t.other.node_id, "pool": "private", "prefix_len": len })),
        )
        .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "bad_prefix_len"),
            "/{len}"
        );
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains("/16..=/30"), "{msg}");
    }
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": "ff".repeat(16), "pool": "private", "prefix_len": 24 })),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": "00".repeat(16), "pool": "private", "prefix_len": 24 })),
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "wrong_kind"),
        "the root: {v}"
    );
    let (s, _) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": g, "pool": "public", "prefix_len": 24 })),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // The shared pool: one /20 fills it; the next request is a clear 409, not a 500.
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": t.other.node_id, "pool": "shared", "prefix_len": 20 })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["subnet"], json!("172.20.0.0/20"));
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": g, "pool": "shared", "prefix_len": 30 })),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "exhausted"), "{v}");

    // Expand the group's /24 to /23.
    let path = format!("/api/ipam/subnets/{g}/expand");
    for r in ROLES {
        let (s, v) = call(
            &private,
            Method::POST,
            &path,
            t.of(r).as_deref(),
            Some(json!({ "pool": "private", "prefix_len": 23 })),
        )
        .await;
        match r {
            Admin => {
                assert_eq!(s, StatusCode::OK, "{v}");
                assert_eq!(v["subnet"], json!("10.128.0.0/23"));
            }
            Owner | Other => {
                assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{r:?}")
            }
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    let (s, v) = call(
        &private,
        Method::POST,
        &path,
        admin,
        Some(json!({ "pool": "private", "prefix_len": 23 })),
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "bad_prefix_len"),
        "not shorter"
    );
    let (s, v) = call(
        &private,
        Method::POST,
        &format!("/api/ipam/subnets/{}/expand", t.owner.node_id),
        admin,
        Some(json!({ "pool": "private", "prefix_len": 20 })),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "no_subnet"), "{v}");
    // A neighbour right after the /23 blocks a /22 (which would cover it).
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ipam/subnets",
        admin,
        Some(json!({ "node": t.owner.node_id, "pool": "private", "prefix_len": 23 })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["subnet"], json!("10.128.2.0/23"));
    let (s, v) = call(
        &private,
        Method::POST,
        &path,
        admin,
        Some(json!({ "pool": "private", "prefix_len": 22 })),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "overlap"), "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("overlaps"), "{msg}");
}

/// The mesh status of a group, role by role: read on the group (its devices, the administrator)
/// sees each device with its tunnel addresses and reported endpoint; another customer is refused.
#[actix_web::test]
async fn mesh_status_answers_every_role_as_its_permissions_say() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);
    let t = Tokens::new(&public, &state).await;
    let g = t.owner.group_id.clone();
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/heartbeat",
        Some(&t.owner.token),
        Some(json!({ "endpoint": "198.51.100.2:51820" })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    for (path, label) in [
        ("/api/mesh/status".to_owned(), "own group"),
        (format!("/api/mesh/status?group={g}"), "named group"),
    ] {
        for r in ROLES {
            let (s, v) = call(&private, Method::GET, &path, t.of(r).as_deref(), None).await;
            match (r, label) {
                (Owner, _) | (Admin, "named group") => {
                    assert_eq!(s, StatusCode::OK, "{r:?} {label}: {v}");
                    assert_eq!(v["group_id"], json!(g));
                    let devices = v["devices"].as_array().expect("devices");
                    assert_eq!(devices.len(), 1, "{v}");
                    let d = &devices[0];
                    assert_eq!(d["node_id"], json!(t.owner.node_id));
                    assert_eq!(d["endpoint"], json!("198.51.100.2:51820"));
                    assert_eq!(d["is_caller"], json!(r == Owner));
                    let v4 = d["tunnel_ipv4"].as_str().expect("v4");
                    assert!(v4.starts_with("10."), "{v4}");
                    assert!(
                        d["tunnel_ipv6"]
                            .as_str()
                            .expect("v6")
                            .starts_with("fd6c:6e00")
                    );
                    assert!(v["liveness"].as_str().expect("liveness").contains("180 s"));
                    // No dataplane here: nothing observed, so no liveness either way.
                    assert_eq!(d["online"], Value::Null, "{v}");
                    assert_eq!(v["observed_at_ms"], Value::Null, "{v}");
                }
                (Admin, _) => assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "no_device")),
                (Other, "own group") => {
                    // Its own group: itself, no endpoint reported yet.
                    assert_eq!(s, StatusCode::OK, "{v}");
                    assert_eq!(v["group_id"], json!(t.other.group_id));
                    assert_eq!(v["devices"][0]["endpoint"], Value::Null);
                    assert_eq!(v["devices"][0]["is_caller"], json!(true));
                }
                (Other, _) => {
                    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}")
                }
                _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
            }
        }
    }
    let (s, v) = call(
        &private,
        Method::GET,
        "/api/mesh/status?group=nothex",
        Some(&t.admin),
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_node_id"));
}

/// Link tokens, role by role: a single-use setup key with a short life, made by a member with
/// add_child on the group; a new device joins the group with it once, a second device cannot.
#[actix_web::test]
async fn link_tokens_answer_every_role_and_work_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);
    let t = Tokens::new(&public, &state).await;
    let g = t.owner.group_id.clone();

    // Naming the owner's group: the owner and the administrator may, the other customer not.
    let mut made = Vec::new();
    for r in ROLES {
        let before = now();
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/link-tokens",
            t.of(r).as_deref(),
            Some(json!({ "group": g })),
        )
        .await;
        match r {
            Admin | Owner => {
                assert_eq!(s, StatusCode::CREATED, "{r:?}: {v}");
                assert_eq!(v["group_id"], json!(g));
                let exp = v["expires_at_ms"].as_u64().expect("expiry");
                // The default life is ten minutes.
                assert!(exp >= before + 600_000 && exp <= now() + 600_000, "{exp}");
                made.push(v["link_token"].as_str().expect("token").to_owned());
            }
            Other => assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}"),
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    // Without a group: the caller's own group; the administrator's token names no device.
    for r in [Admin, Owner, Other] {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/link-tokens",
            t.of(r).as_deref(),
            Some(json!({})),
        )
        .await;
        match r {
            Admin => assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "no_device")),
            Owner => {
                assert_eq!(s, StatusCode::CREATED, "{v}");
                assert_eq!(v["group_id"], json!(g));
            }
            _ => {
                assert_eq!(s, StatusCode::CREATED, "{v}");
                assert_eq!(v["group_id"], json!(t.other.group_id));
            }
        }
    }
    // Life: at most 24 hours, at least a second.
    for (secs, want) in [
        (86_400u64, StatusCode::CREATED),
        (86_401, StatusCode::BAD_REQUEST),
        (0, StatusCode::BAD_REQUEST),
    ] {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/link-tokens",
            Some(&t.owner.token),
            Some(json!({ "expires_in_secs": secs })),
        )
        .await;
        assert_eq!(s, want, "{secs}: {v}");
        if s != StatusCode::CREATED {
            assert_eq!(code(&v), "bad_expiry");
        }
    }

    // The owner's token: device 6 joins the owner's group with it; device 7 cannot reuse it.
    let owners = &made[1];
    let d = joined(&public, 6, Some(owners)).await;
    assert_eq!(d.group_id, g);
    let (s, v) = join(&public, 7, Some(owners)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "setup_key_invalid"),
        "{v}"
    );
    // The new device sees its group's status (the owner and itself).
    let (s, v) = call(
        &private,
        Method::GET,
        "/api/mesh/status",
        Some(&d.token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["devices"].as_array().expect("devices").len(), 2, "{v}");
}

/// A change signed by the caller (`POST /api/ops`), role by role: appended with the author's proof
/// when the signer may cause it; refused when signed by another key than the token's, when the
/// signer lacks the permission, when replayed, or when the envelope is bad.
#[actix_web::test]
async fn client_signed_ops_answer_every_role_as_its_permissions_say() {
    use lemonade_nexus::op::{self, OpBody};
    use lemonade_nexus::tree::{NodeField, NodeId, TreeOp};
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);
    let t = Tokens::new(&public, &state).await;
    let g = t.owner.group_id.clone();
    let group = NodeId(hex::decode(&g).expect("hex").try_into().expect("16"));
    let signer = |r: Role| match r {
        Admin => NodeKey::from_seed(&ADMIN_SEED),
        Other => NodeKey::from_seed(&[4; 32]),
        _ => NodeKey::from_seed(&[2; 32]),
    };
    let request = |key: &NodeKey, value: &str, nonce: u64| {
        let body = OpBody::Tree(TreeOp::Update {
            node: group,
            field: NodeField::Metadata {
                key: "note".into(),
                value: Some(value.into()),
            },
        });
        STANDARD.encode(op::seal_request(
            key.pair(),
            &body,
            now(),
            now() + 60_000,
            nonce,
        ))
    };
    for (i, r) in ROLES.into_iter().enumerate() {
        let req = request(&signer(r), &format!("by-{r:?}"), i as u64);
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/ops",
            t.of(r).as_deref(),
            Some(json!({ "request": req })),
        )
        .await;
        match r {
            Admin | Owner => {
                assert_eq!(s, StatusCode::CREATED, "{r:?}: {v}");
                assert_eq!(v["author"], json!(signer(r).public().to_string()));
                let (_, n) = call(
                    &private,
                    Method::GET,
                    &format!("/api/tree/{g}"),
                    Some(&t.admin),
                    None,
                )
                .await;
                assert_eq!(n["metadata"]["note"], json!(format!("by-{r:?}")), "{n}");
            }
            Other => assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}"),
            _ => assert_eq!(s, StatusCode::UNAUTHORIZED, "{r:?}: {v}"),
        }
    }
    // The owner's request sent with the other customer's token: not its own signature.
    let owners = request(&signer(Owner), "stolen", 100);
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ops",
        Some(&t.other.token),
        Some(json!({ "request": owners })),
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "author_mismatch"),
        "{v}"
    );
    // What the routes refuse, a signed op cannot do: a server node (its owner could sign
    // cluster tokens), a reserved metadata key (a setup key), an owner change without admin.
    let policy = [
        OpBody::Tree(TreeOp::Create {
            parent: group,
            kind: lemonade_nexus::tree::NodeKind::Server,
            hostname: "evil".into(),
            owner: Some(signer(Owner).public()),
            wg_pubkey: None,
        }),
        OpBody::Tree(TreeOp::Update {
            node: group,
            field: NodeField::Metadata {
                key: "ln:sk:00".into(),
                value: Some("99999999999999:reusable".into()),
            },
        }),
    ];
    for (i, body) in policy.iter().enumerate() {
        let req = STANDARD.encode(op::seal_request(
            signer(Owner).pair(),
            body,
            now(),
            now() + 60_000,
            200 + i as u64,
        ));
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/ops",
            Some(&t.owner.token),
            Some(json!({ "request": req })),
        )
        .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "op_not_allowed"),
            "{i}: {v}"
        );
    }
    let owner_change = OpBody::Tree(TreeOp::Update {
        node: group,
        field: NodeField::Owner(Some(signer(Owner).public())),
    });
    let req = STANDARD.encode(op::seal_request(
        signer(Owner).pair(),
        &owner_change,
        now(),
        now() + 60_000,
        210,
    ));
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/ops",
        Some(&t.owner.token),
        Some(json!({ "request": req })),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    // A request takes effect once.
    let once = request(&signer(Owner), "once", 101);
    for want in [StatusCode::CREATED, StatusCode::CONFLICT] {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/ops",
            Some(&t.owner.token),
            Some(json!({ "request": once })),
        )
        .await;
        assert_eq!(s, want, "{v}");
        if s == StatusCode::CONFLICT {
            assert_eq!(code(&v), "refused_by_state");
        }
    }
    // Not base64; a flipped byte (bad signature); an expired request.
    let mut flipped = STANDARD
        .decode(request(&signer(Owner), "x", 102))
        .expect("b64");
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let expired = {
        let body = OpBody::Tree(TreeOp::Update {
            node: group,
            field: NodeField::Hostname("late".into()),
        });
        STANDARD.encode(op::seal_request(
            signer(Owner).pair(),
            &body,
            now() - 120_000,
            now() - 60_000,
            103,
        ))
    };
    for (req, want) in [
        ("%%%".to_owned(), "bad_request_encoding"),
        (STANDARD.encode(&flipped), "bad_signed_request"),
        (expired, "bad_signed_request"),
    ] {
        let (s, v) = call(
            &private,
            Method::POST,
            "/api/ops",
            Some(&t.owner.token),
            Some(json!({ "request": req })),
        )
        .await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, want), "{v}");
    }
}

/// A client-signed op that would have no effect (a replayed request, or a change the state
/// refuses) is answered 409 without being appended: the log does not grow. An op that takes
/// effect is appended (one op), and only once.
#[actix_web::test]
async fn refused_client_ops_are_answered_without_growing_the_log() {
    use lemonade_nexus::op::{self, OpBody};
    use lemonade_nexus::tree::{NodeField, NodeId, NodeKind, TreeOp};
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);
    let t = Tokens::new(&public, &state).await;
    let group = NodeId(
        hex::decode(&t.owner.group_id)
            .expect("hex")
            .try_into()
            .expect("16"),
    );
    let owner = NodeKey::from_seed(&[2; 32]);
    let ops_in_log = || {
        state
            .store
            .lock()
            .expect("store")
            .op_count()
            .expect("count")
    };
    let submit = |body: OpBody, nonce: u64| {
        let req = STANDARD.encode(op::seal_request(
            owner.pair(),
            &body,
            now(),
            now() + 60_000,
            nonce,
        ));
        let private = &private;
        let token = t.owner.token.clone();
        async move {
            call(
                private,
                Method::POST,
                "/api/ops",
                Some(&token),
                Some(json!({ "request": req })),
            )
            .await
        }
    };
    let note = OpBody::Tree(TreeOp::Update {
        node: group,
        field: NodeField::Metadata {
            key: "note".into(),
            value: Some("hello".into()),
        },
    });

    // Takes effect: appended, exactly one op.
    let before = ops_in_log();
    let (s, v) = submit(note.clone(), 1).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(ops_in_log(), before + 1);

    // The same request again: a replay, refused before the append.
    let (s, v) = submit(note.clone(), 1).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "refused_by_state"),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("already submitted"),
        "{v}"
    );
    assert_eq!(ops_in_log(), before + 1, "a replay must not be appended");

    // Refused by the state: a second child with the hostname the owner's device already has.
    let (_, device) = call(
        &private,
        Method::GET,
        &format!("/api/tree/{}", t.owner.node_id),
        Some(&t.owner.token),
        None,
    )
    .await;
    let taken = device["hostname"].as_str().expect("hostname").to_owned();
    let twin = OpBody::Tree(TreeOp::Create {
        parent: group,
        kind: NodeKind::Endpoint,
        hostname: taken,
        owner: None,
        wg_pubkey: None,
    });
    let (s, v) = submit(twin, 2).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "refused_by_state"),
        "{v}"
    );
    assert_eq!(
        ops_in_log(),
        before + 1,
        "a refused op must not be appended"
    );

    // A fresh request with the same change takes effect again (the nonce, not the body, is
    // what makes a replay), and is appended.
    let (s, v) = submit(note, 3).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(ops_in_log(), before + 2);
}

/// What the server's own WireGuard device shows (a dump, as the dataplane loop takes every 5 s)
/// becomes liveness in `GET /api/mesh/status` (online: a handshake < 180 s ago; last seen) and,
/// for the endpoint, a recorded op that `GET /api/mesh/peers` hands to the device's peers in
/// preference to the endpoint the device reported (behind NAT, its private address).
#[actix_web::test]
async fn the_server_observed_handshakes_and_endpoints_reach_mesh_status_and_peers() {
    use lemonade_nexus::api::observed;
    use lemonade_nexus_netlink::{DeviceState, Key, PeerConfig, PeerState};
    let dir = tempfile::tempdir().expect("tmp");
    let state = api_state(dir.path(), Registration::Open);
    let (public, private) = apps!(state);
    let a = joined(&public, 2, None).await;
    // B joins A's group with a link token A made.
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/link-tokens",
        Some(&a.token),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let link = v["link_token"].as_str().expect("token").to_owned();
    let b = joined(&public, 6, Some(&link)).await;
    assert_eq!(b.group_id, a.group_id);
    // B reports its private (inside-the-NAT) address.
    let (s, v) = call(
        &private,
        Method::POST,
        "/api/heartbeat",
        Some(&b.token),
        Some(json!({ "endpoint": "10.1.0.2:51820" })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let peers_of_a = || async {
        let (s, v) = call(
            &private,
            Method::GET,
            "/api/mesh/peers",
            Some(&a.token),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["peers"][0].clone()
    };
    let p = peers_of_a().await;
    assert_eq!(
        (p["endpoint"].clone(), p["endpoint_source"].clone()),
        (json!("10.1.0.2:51820"), json!("reported"))
    );

    // The server's device: B shook hands 20 s ago from its NAT's public mapping; A 10 min ago.
    let now_ms = now();
    let at = |ms: u64| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let peer = |seed: u8, endpoint: &str, handshake_ms: u64| {
        let mut config = PeerConfig::new(Key([seed; 32]));
        config.endpoint = Some(endpoint.parse().expect("addr"));
        PeerState {
            config,
            last_handshake: Some(at(handshake_ms)),
            rx_bytes: 1,
            tx_bytes: 1,
        }
    };
    let dump = DeviceState {
        peers: vec![
            peer(6, "203.0.113.9:40123", now_ms - 20_000),
            peer(2, "198.51.100.4:51820", now_ms - 600_000),
        ],
        ..DeviceState::default()
    };
    let ops_before = state
        .store
        .lock()
        .expect("store")
        .op_count()
        .expect("count");
    assert_eq!(
        observed::record(&state, &dump, now_ms),
        Ok(1),
        "only B is online"
    );
    assert_eq!(
        state
            .store
            .lock()
            .expect("store")
            .op_count()
            .expect("count"),
        ops_before + 1
    );
    // The same dump again: nothing changed, nothing appended.
    assert_eq!(observed::record(&state, &dump, now_ms + 5_000), Ok(0));

    let p = peers_of_a().await;
    assert_eq!(
        (p["endpoint"].clone(), p["endpoint_source"].clone()),
        (json!("203.0.113.9:40123"), json!("observed")),
        "A is given B's NAT mapping, not its private address: {p}"
    );
    let (s, v) = call(
        &private,
        Method::GET,
        "/api/mesh/status",
        Some(&a.token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["observed_at_ms"].as_u64().is_some(), "{v}");
    let devices = v["devices"].as_array().expect("devices");
    let find = |node: &str| {
        devices
            .iter()
            .find(|d| d["node_id"] == json!(node))
            .unwrap_or_else(|| panic!("{node} in {v}"))
    };
    let (da, db) = (find(&a.node_id), find(&b.node_id));
    assert_eq!(db["online"], json!(true), "{db}");
    assert_eq!(db["last_handshake_ms"], json!(now_ms - 20_000));
    assert_eq!(db["observed_endpoint"], json!("203.0.113.9:40123"));
    assert_eq!(
        db["endpoint"],
        json!("10.1.0.2:51820"),
        "the reported one stays"
    );
    assert_eq!(
        da["online"],
        json!(false),
        "10 min without a handshake: {da}"
    );
    assert!(da["last_handshake_age_s"].as_u64().expect("age") >= 600);
    // Not a client's to set: the observed endpoint's metadata key is reserved.
    let (s, v) = call(
        &private,
        Method::PATCH,
        &format!("/api/tree/{}", b.node_id),
        Some(&b.token),
        Some(json!({ "metadata": { "ln:observed-endpoint": "192.0.2.66:1" } })),
    )
    .await;
    assert!(s.is_client_error(), "{s}: {v}");
}
