//! The kernel backend: WireGuard over generic netlink, the link over rtnetlink.

pub mod dump;
pub mod encode;
#[cfg(test)]
pub(crate) mod setmodel;
