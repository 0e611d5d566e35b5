//! The kernel backend: WireGuard over generic netlink (family `wireguard`), the link over
//! rtnetlink.
//!
//! - [`encode`] builds `WG_CMD_SET_DEVICE` messages from a diff, packed under a byte budget.
//! - [`dump`] merges a multi-part `WG_CMD_GET_DEVICE` dump by public key.
//! - [`detect`] finds out whether this kernel has WireGuard and picks the backend.

/// The generic netlink packet types of the `wireguard` family, re-exported for tools and
/// benchmarks that build or inspect messages.
pub use netlink_packet_wireguard as wire;

pub mod detect;
pub mod dump;
pub mod encode;
#[cfg(test)]
pub(crate) mod setmodel;

use std::{collections::VecDeque, io};

use futures::StreamExt;
use genetlink::{GenetlinkError, GenetlinkHandle};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};

use crate::{
    backend::{BackendKind, WgBackend},
    diff::{AllowedIpsChange, Capabilities, DeviceDiff, PeerChange, PeerUpdate},
    model::{DeviceState, IpNet, Key, PeerConfig},
    rtnl::{Rtnl, RtnlError},
};
use dump::{DumpError, merge_dump};
use encode::{Budget, EncodeError, PeerEntry, check_ifname, diff_packer, encode_diff, to_netlink};

/// A kernel backend failure.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// This kernel has no WireGuard (or we may not use it); the reason says why.
    #[error("kernel WireGuard is not available: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Rtnl(#[from] RtnlError),
    #[error("{op}: generic netlink: {source}")]
    Genetlink {
        op: String,
        #[source]
        source: GenetlinkError,
    },
    /// The kernel refused a request.
    #[error("{op}: the kernel answered: {source}")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}: cannot decode the kernel's reply: {why}")]
    Decode { op: String, why: String },
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Dump(#[from] DumpError),
    #[error("{0:?} exists and is not a WireGuard link (kind {1:?})")]
    NotWireguard(String, Option<String>),
}

impl KernelError {
    /// The errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Kernel { source, .. } => source.raw_os_error(),
            KernelError::Rtnl(e) => e.errno(),
            KernelError::Genetlink {
                source: GenetlinkError::NetlinkError(e),
                ..
            } => e.raw_os_error(),
            _ => None,
        }
    }
}

/// The kernel WireGuard backend. Build it with [`KernelBackend::connect`] inside a tokio runtime
/// (its sockets belong to the network namespace current at that moment).
#[derive(Clone, Debug)]
pub struct KernelBackend {
    genl: GenetlinkHandle,
    family_id: u16,
    rtnl: Rtnl,
    caps: Capabilities,
    budget: Budget,
}

impl KernelBackend {
    /// Opens the sockets, resolves the `wireguard` generic netlink family and probes whether
    /// single allowed IPs can be removed. Fails with [`KernelError::Unavailable`] when the
    /// kernel has no WireGuard.
    pub async fn connect(budget: Budget) -> Result<Self, KernelError> {
        let (genl, family_id, rtnl) = detect::open().await?;
        let mut backend = KernelBackend {
            genl,
            family_id,
            rtnl,
            caps: Capabilities::default(),
            budget,
        };
        backend.caps.allowed_ip_removal = backend.probe_allowed_ip_removal().await;
        Ok(backend)
    }

    /// Like [`connect`](Self::connect) but with the capabilities given instead of probed (tests,
    /// or an operator who knows better).
    pub async fn connect_with(budget: Budget, caps: Capabilities) -> Result<Self, KernelError> {
        let (genl, family_id, rtnl) = detect::open().await?;
        Ok(KernelBackend {
            genl,
            family_id,
            rtnl,
            caps,
            budget,
        })
    }

    /// The rtnetlink connection this backend uses (for addresses and routes of its links).
    pub fn rtnl(&self) -> &Rtnl {
        &self.rtnl
    }

    /// The message budget used for SET messages.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Sends SET messages in order and waits for every acknowledgement. Returns the number of
    /// messages sent.
    pub async fn send_set(
        &self,
        msgs: Vec<WireguardMessage>,
        op: &str,
    ) -> Result<usize, KernelError> {
        let mut sender = SetSender::new(self, op);
        for msg in msgs {
            sender.send(msg).await?;
        }
        sender.finish().await
    }

    /// Sends a GET dump request and returns its parts, undecoded into the model.
    pub async fn get_parts(&self, ifname: &str) -> Result<Vec<WireguardMessage>, KernelError> {
        check_ifname(ifname)?;
        let op = format!("read WireGuard device {ifname}");
        let mut genl = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(ifname.to_owned())],
        });
        genl.set_resolved_family_id(self.family_id);
        let mut nl = NetlinkMessage::from(genl);
        nl.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        nl.finalize();
        let mut stream =
            self.genl
                .clone()
                .send_request(nl)
                .map_err(|source| KernelError::Genetlink {
                    op: op.clone(),
                    source,
                })?;
        let mut parts = Vec::new();
        while let Some(reply) = stream.next().await {
            let reply = reply.map_err(|e| KernelError::Decode {
                op: op.clone(),
                why: e.to_string(),
            })?;
            match reply.payload {
                NetlinkPayload::InnerMessage(g) => parts.push(g.payload),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(KernelError::Kernel {
                        op,
                        source: e.to_io(),
                    });
                }
                _ => {}
            }
        }
        Ok(parts)
    }

    /// Finds out whether this kernel removes single allowed IPs (`WGALLOWEDIP_F_REMOVE_ME`,
    /// Linux 6.16+), on a throwaway link: give a peer two prefixes, ask to remove one, read
    /// back. An older kernel either refuses the unknown attribute (EINVAL) or ignores the flag and
    /// keeps both. Any failure counts as "not supported", which is always safe (the diff then
    /// replaces that peer's allowed IPs instead).
    async fn probe_allowed_ip_removal(&self) -> bool {
        let name = format!("lnprobe{}", std::process::id() % 10_000_000);
        let result = self.probe_on(&name).await;
        if let Err(e) = self.rtnl.delete_link(&name).await {
            tracing::warn!(link = %name, error = %e, "could not delete the probe link");
        }
        match result {
            Ok(supported) => {
                tracing::info!(supported, "probed WireGuard per-allowed-IP removal");
                supported
            }
            Err(e) => {
                tracing::info!(error = %e, "per-allowed-IP removal not available; will replace allowed-IP lists");
                false
            }
        }
    }

    async fn probe_on(&self, name: &str) -> Result<bool, KernelError> {
        self.rtnl.create_wireguard(name).await?;
        let key = Key([0x42; 32]);
        let a: IpNet = "192.0.2.1/32"
            .parse()
            .map_err(|_| KernelError::Unavailable("probe".into()))?;
        let b: IpNet = "192.0.2.2/32"
            .parse()
            .map_err(|_| KernelError::Unavailable("probe".into()))?;
        let add = DeviceDiff {
            peers: vec![PeerChange::Add(PeerConfig {
                allowed_ips: vec![a, b],
                ..PeerConfig::new(key)
            })],
            ..Default::default()
        };
        self.send_set(encode_diff(name, &add, self.budget)?, "probe: add peer")
            .await?;
        let remove = DeviceDiff {
            peers: vec![PeerChange::Update(PeerUpdate {
                public_key: key,
                preshared_key: None,
                endpoint: None,
                persistent_keepalive: None,
                allowed_ips: AllowedIpsChange::Incremental {
                    remove: vec![a],
                    add: vec![],
                },
            })],
            ..Default::default()
        };
        if let Err(e) = self
            .send_set(
                encode_diff(name, &remove, self.budget)?,
                "probe: remove one allowed IP",
            )
            .await
        {
            if e.errno() == Some(libc::EINVAL) || e.errno() == Some(libc::EOPNOTSUPP) {
                return Ok(false);
            }
            return Err(e);
        }
        let state = merge_dump(&self.get_parts(name).await?)?;
        Ok(state.peers.len() == 1 && state.peers[0].config.allowed_ips == vec![b])
    }
}

impl WgBackend for KernelBackend {
    type Error = KernelError;

    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn ensure_device(&self, ifname: &str) -> Result<(), KernelError> {
        check_ifname(ifname)?;
        if let Some(link) = self.rtnl.link(ifname).await? {
            if link.kind.as_deref() == Some("wireguard") {
                return Ok(());
            }
            return Err(KernelError::NotWireguard(ifname.to_owned(), link.kind));
        }
        match self.rtnl.create_wireguard(ifname).await {
            Ok(()) => Ok(()),
            // Created meanwhile by someone else: fine if it is a WireGuard link.
            Err(e) if e.errno() == Some(libc::EEXIST) => match self.rtnl.link(ifname).await? {
                Some(link) if link.kind.as_deref() == Some("wireguard") => Ok(()),
                Some(link) => Err(KernelError::NotWireguard(ifname.to_owned(), link.kind)),
                None => Err(e.into()),
            },
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Err(KernelError::Unavailable(
                format!("creating link {ifname} of type wireguard: {e}"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get(&self, ifname: &str) -> Result<DeviceState, KernelError> {
        Ok(merge_dump(&self.get_parts(ifname).await?)?)
    }

    /// Encodes and sends as it goes: each message leaves as soon as it is complete, with a
    /// bounded number awaiting acknowledgement, so programming 50,000 peers never holds the
    /// whole encoded configuration in memory.
    async fn apply(&self, ifname: &str, diff: &DeviceDiff) -> Result<(), KernelError> {
        let Some(mut packer) = diff_packer(ifname, diff, self.budget)? else {
            return Ok(());
        };
        let op = format!("configure WireGuard device {ifname}");
        let mut sender = SetSender::new(self, &op);
        for change in &diff.peers {
            packer.push(PeerEntry::from_change(change))?;
            while let Some(msg) = packer.pop_ready() {
                sender.send(msg).await?;
            }
        }
        for msg in packer.finish() {
            sender.send(msg).await?;
        }
        sender.finish().await?;
        Ok(())
    }

    async fn remove_peer(&self, ifname: &str, peer: &Key) -> Result<(), KernelError> {
        let diff = DeviceDiff {
            peers: vec![PeerChange::Remove(*peer)],
            ..Default::default()
        };
        self.apply(ifname, &diff).await
    }

    async fn delete_device(&self, ifname: &str) -> Result<(), KernelError> {
        check_ifname(ifname)?;
        Ok(self.rtnl.delete_link(ifname).await?)
    }
}

/// How many SET messages may await their acknowledgement at once. The kernel handles messages
/// of one socket in order; keeping several in flight saves a round trip per message, and the
/// bound keeps queued bytes (and acknowledgements) small.
const SET_WINDOW: usize = 32;

type ReplyStream = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<
                    NetlinkMessage<GenlMessage<WireguardMessage>>,
                    netlink_packet_core::DecodeError,
                >,
            >,
    >,
>;

/// Sends SET messages with a bounded window of unacknowledged ones, in order.
struct SetSender<'a> {
    backend: &'a KernelBackend,
    genl: GenetlinkHandle,
    op: &'a str,
    inflight: VecDeque<(usize, ReplyStream)>,
    sent: usize,
}

impl<'a> SetSender<'a> {
    fn new(backend: &'a KernelBackend, op: &'a str) -> Self {
        SetSender {
            backend,
            genl: backend.genl.clone(),
            op,
            inflight: VecDeque::new(),
            sent: 0,
        }
    }

    async fn send(&mut self, msg: WireguardMessage) -> Result<(), KernelError> {
        if self.inflight.len() >= SET_WINDOW {
            self.wait_oldest().await?;
        }
        let n = self.sent;
        let stream = self
            .genl
            .send_request(to_netlink(msg, self.backend.family_id, 0))
            .map_err(|source| KernelError::Genetlink {
                op: format!("{} (message {n})", self.op),
                source,
            })?;
        self.inflight.push_back((n, Box::pin(stream)));
        self.sent += 1;
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), KernelError> {
        let Some((n, mut stream)) = self.inflight.pop_front() else {
            return Ok(());
        };
        while let Some(reply) = stream.next().await {
            let reply = reply.map_err(|e| KernelError::Decode {
                op: format!("{} (message {n})", self.op),
                why: e.to_string(),
            })?;
            if let NetlinkPayload::Error(e) = reply.payload
                && e.code.is_some()
            {
                return Err(KernelError::Kernel {
                    op: format!("{} (message {n})", self.op),
                    source: e.to_io(),
                });
            }
        }
        Ok(())
    }

    /// Waits for every outstanding acknowledgement; returns how many messages were sent.
    async fn finish(mut self) -> Result<usize, KernelError> {
        while !self.inflight.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(self.sent)
    }
}
