//! The trust commands of the command line: `root init|show`, `enroll-server`, `revoke-server`.
//! They run on the (offline) machine that holds the cluster root key; only `revoke-server
//! --submit` talks to a server. Doc comments here are the `--help` text.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, Subcommand};
use ring::rand::SystemRandom;

use super::{MAX_TRUST_OBJECT_BYTES, Revocation, ServerCert, root_key};
use crate::identity::NodeKey;
use crate::keys::PublicKey;
use crate::tls::{JoinUrl, Pin};

/// The environment variable holding the root key's passphrase (or use `--passphrase-file`).
pub const PASSPHRASE_ENV: &str = "LEMONADE_NEXUS_ROOT_PASSPHRASE";
/// Default validity of a server certificate, in days.
pub const DEFAULT_EXPIRES_DAYS: u64 = 365;

#[derive(Subcommand, Debug)]
pub enum RootCommand {
    /// Create the cluster's offline root key: it signs server certificates and revocations. The
    /// file is encrypted with a passphrase (Argon2id + ChaCha20-Poly1305), written with mode 0600,
    /// and never overwritten. Prints the root public key: give it to `serve --root`.
    Init(RootInitArgs),
    /// Print the root public key recorded in a root key file (no passphrase needed).
    Show {
        /// The root key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RootInitArgs {
    /// Where to write the root key (must not exist). Keep it offline.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
}

/// Where the root key's passphrase comes from.
#[derive(Args, Debug, Clone)]
pub struct PassphraseArgs {
    /// File whose first line is the root key's passphrase. Default: the environment variable
    /// LEMONADE_NEXUS_ROOT_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// The server's Ed25519 identity key (base64; `lemonade-nexus identity show` on the server).
    #[arg(value_name = "SERVER_PUBKEY")]
    pub server: PublicKey,
    /// The server's name, a DNS label (also its hostname in the tree unless --server-name says
    /// otherwise).
    #[arg(long, value_name = "NAME")]
    pub id: String,
    /// The cluster root key file (`lemonade-nexus root init`).
    #[arg(long, value_name = "FILE")]
    pub root_key: PathBuf,
    /// Days the certificate can be used to admit the server (0 = never expires). Expiry is
    /// checked when the server admits itself, not afterwards.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EXPIRES_DAYS)]
    pub expires_days: u64,
    /// Write the certificate (base64, one line) to this file instead of standard output; give it
    /// to `serve --server-cert`.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The revoked server's Ed25519 identity key (base64).
    #[arg(value_name = "SERVER_PUBKEY")]
    pub server: PublicKey,
    /// The cluster root key file.
    #[arg(long, value_name = "FILE")]
    pub root_key: PathBuf,
    /// Why (at most 256 bytes; shown to operators).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    /// Write the revocation (base64, one line) to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Submit it to a running server of the cluster: https://HOST:PORT (its public API); it
    /// enters that server's log and reaches every server. The URL may carry #pin=sha256:...
    #[arg(long, value_name = "URL")]
    pub submit: Option<String>,
    /// The server's certificate pin (sha256:..., printed by `serve`), when --submit has none.
    #[arg(long, value_name = "PIN", requires = "submit")]
    pub pin: Option<Pin>,
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
}

/// The JSON body of `POST /api/trust/revocations`.
#[derive(serde::Serialize, serde::Deserialize, Debug, utoipa::ToSchema)]
pub struct RevocationBody {
    /// Base64 of the revocation envelope signed by the cluster root (`revoke-server --out`).
    /// Standard base64 with padding (RFC 4648 §4) of the signed envelope bytes (at most 64 KiB).
    #[schema(pattern = "^[A-Za-z0-9+/]*={0,2}$")]
    pub revocation: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the passphrase: `--passphrase-file` (first line), else the environment variable.
fn passphrase(args: &PassphraseArgs) -> Result<Vec<u8>> {
    if let Some(f) = &args.passphrase_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the passphrase file {}", f.display()))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("the passphrase file {} is empty", f.display());
        }
        return Ok(line.as_bytes().to_vec());
    }
    match std::env::var(PASSPHRASE_ENV) {
        Ok(p) if !p.is_empty() => Ok(p.into_bytes()),
        _ => bail!(
            "no passphrase for the root key: set {PASSPHRASE_ENV} or pass --passphrase-file FILE"
        ),
    }
}

fn load_root(path: &Path, pass: &PassphraseArgs) -> Result<NodeKey> {
    let p = passphrase(pass)?;
    Ok(root_key::load(path, &p)?)
}

/// Writes `text` to `out` (0600, refusing to overwrite) or to standard output.
fn emit(out: Option<&Path>, text: &str, w: &mut dyn std::io::Write) -> Result<()> {
    match out {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?;
            writeln!(f, "{text}")?;
            f.sync_all()?;
        }
        None => writeln!(w, "{text}")?,
    }
    Ok(())
}

/// Reads a base64 trust object (certificate or revocation) from a file, bounded.
pub fn read_object_file(path: &Path) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > (MAX_TRUST_OBJECT_BYTES * 2) as u64 {
        bail!(
            "{} is too large to be a certificate or revocation",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_object(&text).with_context(|| format!("{}", path.display()))
}

/// Decodes the base64 text of a trust object, bounded.
pub fn decode_object(text: &str) -> Result<Vec<u8>> {
    let text = text.trim();
    if text.len() > MAX_TRUST_OBJECT_BYTES * 2 {
        bail!("too large to be a certificate or revocation");
    }
    STANDARD
        .decode(text)
        .context("not base64 (expected the one line written by enroll-server / revoke-server)")
}

/// `root init` and `root show`.
pub fn root_command(cmd: RootCommand, out: &mut dyn std::io::Write) -> Result<()> {
    match cmd {
        RootCommand::Init(args) => {
            let p = passphrase(&args.passphrase)?;
            let key = root_key::create(&args.out, &p, &SystemRandom::new())?;
            writeln!(
                out,
                "root key written to {} (mode 0600, encrypted)",
                args.out.display()
            )?;
            writeln!(out, "root public key: {}", key.public())?;
        }
        RootCommand::Show { key } => {
            writeln!(out, "{}", root_key::public_key(&key)?)?;
        }
    }
    Ok(())
}

/// `enroll-server`: signs a certificate for a server key.
pub fn enroll_command(args: EnrollArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let name = args.id.to_ascii_lowercase();
    super::check_name(&name)?;
    let root = load_root(&args.root_key, &args.passphrase)?;
    let issued = now_ms();
    let expires = match args.expires_days {
        0 => 0,
        d => d
            .checked_mul(86_400_000)
            .and_then(|ms| ms.checked_add(issued))
            .context("--expires-days is too large")?,
    };
    let cert = ServerCert {
        server: args.server,
        name,
        issued_at_ms: issued,
        expires_at_ms: expires,
    };
    let bytes = super::seal_server_cert(root.pair(), &cert);
    emit(args.out.as_deref(), &STANDARD.encode(&bytes), out)?;
    if let Some(p) = &args.out {
        writeln!(
            out,
            "server certificate for {} ({}) written to {}; start that server with --root {} --server-cert {}",
            cert.server,
            cert.name,
            p.display(),
            root.public(),
            p.display()
        )?;
    }
    Ok(())
}

/// `revoke-server`: signs a revocation; writes it and/or submits it to a server.
pub fn revoke_command(args: RevokeArgs, out: &mut dyn std::io::Write) -> Result<()> {
    if args.reason.len() > super::MAX_REASON_BYTES {
        bail!(
            "--reason is {} bytes; the limit is {}",
            args.reason.len(),
            super::MAX_REASON_BYTES
        );
    }
    let root = load_root(&args.root_key, &args.passphrase)?;
    if args.server == root.public() {
        bail!("the cluster root {} cannot be revoked", args.server);
    }
    let r = Revocation {
        server: args.server,
        issued_at_ms: now_ms(),
        reason: args.reason.clone(),
    };
    let text = STANDARD.encode(super::seal_revocation(root.pair(), &r));
    if args.out.is_some() || args.submit.is_none() {
        emit(args.out.as_deref(), &text, out)?;
    }
    if let Some(url) = &args.submit {
        let url = submit_url(url, args.pin)?;
        let answer = submit(&url, &text)?;
        writeln!(out, "submitted to {}:{}: {answer}", url.host, url.port)?;
    }
    Ok(())
}

/// `https://HOST:PORT[/][#pin=...]` plus an optional separate pin.
fn submit_url(url: &str, pin: Option<Pin>) -> Result<JoinUrl> {
    let url = url.trim();
    let full = match (url.contains("#pin="), pin) {
        (true, None) => url.to_owned(),
        (true, Some(_)) => bail!("give the pin either in the --submit URL or with --pin, not both"),
        (false, Some(p)) => format!("{}/#pin={p}", url.trim_end_matches('/')),
        (false, None) => bail!(
            "--submit needs the server's certificate pin: --pin sha256:... (printed by serve as \"TLS pin\")"
        ),
    };
    JoinUrl::parse(&full)
}

fn submit(url: &JoinUrl, revocation: &str) -> Result<String> {
    let client = crate::api::client::PinnedClient::new(url.clone())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = RevocationBody {
        revocation: revocation.to_owned(),
    };
    let resp = rt.block_on(client.post("/api/trust/revocations", &body))?;
    let v: serde_json::Value = resp.json()?;
    Ok(v.get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("accepted")
        .to_owned())
}
