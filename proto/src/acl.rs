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

    /// What to do with `addr`.
    pub fn lookup(&self, addr: IpAddr) -> AclAction {
        let _ = addr;
        self.default
    }
}
