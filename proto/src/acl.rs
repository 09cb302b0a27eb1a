//! Access control by CIDR: PLACEHOLDER, being written.

use std::net::IpAddr;

/// What the ACL says about a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AclAction {
    /// Serve time.
    Allow,
    /// Refuse (KoD DENY or silence).
    Deny,
    /// Refuse with KoD RSTR.
    Restrict,
}

/// An IPv4 or IPv6 prefix such as `192.0.2.0/24` or `2001:db8::/32`; a bare
/// address is a host prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a string is not a prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid prefix {0:?}")]
pub struct CidrError(pub String);

impl core::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr: IpAddr = s.parse().map_err(|_| CidrError(s.to_owned()))?;
        Ok(Self { addr, prefix_len: if addr.is_ipv4() { 32 } else { 128 } })
    }
}

/// Allow/deny/restrict rules by prefix; the most specific match wins.
#[derive(Clone, Debug)]
pub struct Acl {
    default: AclAction,
}

impl Default for Acl {
    fn default() -> Self {
        Self::new(AclAction::Allow)
    }
}

impl Acl {
    /// An ACL with no rules that answers `default`.
    pub fn new(default: AclAction) -> Self {
        Self { default }
    }

    /// Adds a rule; a later rule for the same prefix replaces the earlier.
    pub fn insert(&mut self, cidr: Cidr, action: AclAction) {
        let _ = (cidr, action);
    }

    /// What to do with `addr`.
    pub fn lookup(&self, addr: IpAddr) -> AclAction {
        let _ = addr;
        self.default
    }
}
