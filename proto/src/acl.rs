//! Access control by CIDR prefix.
//!
//! An [`Acl`] maps IPv4 and IPv6 prefixes to an [`AclAction`]; a source gets
//! the action of the most specific (longest) prefix that contains it, or the
//! ACL's default when none does. IPv4-mapped IPv6 sources (`::ffff:a.b.c.d`,
//! what a dual-stack socket reports for IPv4 clients) are looked up as IPv4,
//! and prefixes written inside `::ffff:0:0/96` are stored as the IPv4
//! prefixes they denote, so one rule covers a client however it arrives.
//! `::/0` therefore means "all of IPv6", not IPv4 too; use `0.0.0.0/0` for
//! that.
//!
//! # Lookup
//!
//! Rules live in one hash map per prefix length and family, keyed by the
//! network bits. A lookup masks the address to each prefix length that has
//! rules, longest first, and probes that length's map: the first hit is the
//! most specific match. That is O(number of distinct prefix lengths in use)
//! (at most 33 for IPv4, 129 for IPv6, usually a handful), and allocates
//! nothing. The maps use a fixed, unkeyed hasher: their keys come from the
//! configuration, not from the network, and probing with any address costs
//! the same bounded work. A sorted copy of the rules serves
//! [`Acl::rules`] for listing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
///
/// The address is always the network address (host bits zero: `10.1.2.3/8`
/// is accepted and becomes `10.0.0.0/8`), and a prefix inside
/// `::ffff:0:0/96` is stored as IPv4 (`::ffff:10.0.0.0/104` is `10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a string is not a prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid prefix {0:?}")]
pub struct CidrError(pub String);

impl Cidr {
    /// The prefix of length `prefix_len` containing `addr` (its host bits
    /// are cleared). Fails when `prefix_len` exceeds the address's width.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let (family, bits) = Family::split(addr);
        if prefix_len > family.width() {
            return Err(CidrError(format!("{addr}/{prefix_len}")));
        }
        if let (Family::V6, Some(v4)) = (family, Ipv6Addr::from_bits(bits).to_ipv4_mapped())
            && prefix_len >= 96
        {
            return Self::new(IpAddr::V4(v4), prefix_len - 96);
        }
        Ok(Self::from_parts(family, bits & family.mask(prefix_len), prefix_len))
    }

    /// The network address (host bits zero).
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` lies in this prefix. An IPv4-mapped IPv6 address is
    /// taken as the IPv4 address it carries.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let (family, bits) = Family::split(canonical(addr));
        let (own_family, own_bits) = Family::split(self.addr);
        family == own_family && bits & family.mask(self.prefix_len) == own_bits
    }

    fn from_parts(family: Family, net: u128, prefix_len: u8) -> Self {
        let addr = match family {
            // A masked IPv4 network fits in 32 bits.
            Family::V4 => IpAddr::V4(Ipv4Addr::from_bits(net as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from_bits(net)),
        };
        Self { addr, prefix_len }
    }
}

impl core::str::FromStr for Cidr {
    type Err = CidrError;

    /// Parses `address/length` or a bare address (a host prefix). The
    /// length is 1 to 3 decimal digits, at most 32 for IPv4 and 128 for
    /// IPv6.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => {
                if !(1..=3).contains(&len.len()) || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                (addr, Some(len.parse::<u8>().map_err(|_| err())?))
            }
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let len = len.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Self::new(addr, len).map_err(|_| err())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Allow/deny/restrict rules by prefix; the most specific match wins.
#[derive(Clone, Debug)]
pub struct Acl {
    default: AclAction,
    v4: Table,
    v6: Table,
    /// Every rule, for listing: family, network bits, length.
    rules: BTreeMap<(Family, u128, u8), AclAction>,
}

impl Default for Acl {
    fn default() -> Self {
        Self::new(AclAction::Allow)
    }
}

impl Acl {
    /// An ACL with no rules that answers `default`.
    pub fn new(default: AclAction) -> Self {
        Self { default, v4: Table::new(Family::V4), v6: Table::new(Family::V6), rules: BTreeMap::new() }
    }

    /// Adds a rule; a later rule for the same prefix replaces the earlier.
    pub fn insert(&mut self, cidr: Cidr, action: AclAction) {
        let (family, net) = Family::split(cidr.addr);
        self.table_mut(family).insert(net, cidr.prefix_len, action);
        self.rules.insert((family, net, cidr.prefix_len), action);
    }

    /// Removes the rule for exactly `cidr`, returning its action.
    pub fn remove(&mut self, cidr: Cidr) -> Option<AclAction> {
        let (family, net) = Family::split(cidr.addr);
        self.table_mut(family).remove(net, cidr.prefix_len);
        self.rules.remove(&(family, net, cidr.prefix_len))
    }

    /// What to do with `addr`.
    pub fn lookup(&self, addr: IpAddr) -> AclAction {
        let (family, bits) = Family::split(canonical(addr));
        let table = match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        table.lookup(bits).unwrap_or(self.default)
    }

    /// The action for sources no rule matches.
    pub fn default_action(&self) -> AclAction {
        self.default
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (every source gets the default).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule: IPv4 before IPv6, then by network address, then by
    /// prefix length (so a prefix comes right before the ones inside it).
    pub fn rules(&self) -> impl Iterator<Item = (Cidr, AclAction)> + '_ {
        self.rules.iter().map(|(&(family, net, len), &action)| (Cidr::from_parts(family, net, len), action))
    }

    fn table_mut(&mut self, family: Family) -> &mut Table {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }
}

/// The rules of one address family.
#[derive(Clone, Debug)]
struct Table {
    family: Family,
    /// Prefix lengths that have rules, longest first.
    lengths: Vec<u8>,
    /// Indexed by prefix length: network bits to action.
    by_len: Vec<HashMap<u128, AclAction, FixedState>>,
}

impl Table {
    fn new(family: Family) -> Self {
        let by_len = (0..=family.width()).map(|_| HashMap::with_hasher(FixedState)).collect();
        Self { family, lengths: Vec::new(), by_len }
    }

    fn insert(&mut self, net: u128, len: u8, action: AclAction) {
        self.by_len[usize::from(len)].insert(net, action);
        if let Err(at) = self.lengths.binary_search_by(|probe| len.cmp(probe)) {
            self.lengths.insert(at, len);
        }
    }

    fn remove(&mut self, net: u128, len: u8) {
        let map = &mut self.by_len[usize::from(len)];
        map.remove(&net);
        if map.is_empty() {
            self.lengths.retain(|&l| l != len);
        }
    }

    fn lookup(&self, bits: u128) -> Option<AclAction> {
        self.lengths.iter().find_map(|&len| self.by_len[usize::from(len)].get(&(bits & self.family.mask(len))).copied())
    }
}

/// Address family, in listing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The family and the address bits (IPv4 in the low 32 bits).
    fn split(addr: IpAddr) -> (Self, u128) {
        match addr {
            IpAddr::V4(a) => (Self::V4, u128::from(a.to_bits())),
            IpAddr::V6(a) => (Self::V6, a.to_bits()),
        }
    }

    const fn width(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The netmask of a prefix of `len` bits (at most the width), in the
    /// layout of [`Self::split`].
    fn mask(self, len: u8) -> u128 {
        let ones = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        ones >> (128 - u32::from(self.width()))
    }
}

/// `addr`, with an IPv4-mapped IPv6 address turned into IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The rule maps' hasher: a fixed multiply-xorshift mix of the 128-bit
/// network bits (see the module docs for why no key is needed).
#[derive(Clone, Copy, Debug, Default)]
struct FixedState;

impl BuildHasher for FixedState {
    type Hasher = FixedHasher;

    fn build_hasher(&self) -> FixedHasher {
        FixedHasher(0)
    }
}

#[derive(Debug)]
struct FixedHasher(u64);

impl FixedHasher {
    fn mix(&mut self, word: u64) {
        let x = (self.0 ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
}

impl Hasher for FixedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.mix(v as u64);
        self.mix((v >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^ (x >> 31)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        for (input, shown) in [
            ("192.0.2.0/24", "192.0.2.0/24"),
            ("192.0.2.77/24", "192.0.2.0/24"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("203.0.113.5", "203.0.113.5/32"),
            ("255.255.255.255/32", "255.255.255.255/32"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:db8:ffff::1/32", "2001:db8::/32"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("::/0", "::/0"),
            ("2001:db8::/127", "2001:db8::/127"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:192.0.2.1", "192.0.2.1/32"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::ffff:0:0/95", "::fffe:0:0/95"),
            ("10.0.0.0/008", "10.0.0.0/8"),
        ] {
            let c = cidr(input);
            assert_eq!(c.to_string(), shown, "{input}");
            assert_eq!(cidr(shown), c, "round trip of {shown}");
        }
        let c = cidr("198.51.100.9/20");
        assert_eq!(c.addr(), ip("198.51.96.0"));
        assert_eq!(c.prefix_len(), 20);
    }

    #[test]
    fn parse_rejects() {
        for bad in [
            "",
            "/",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/256",
            "10.0.0.0/1000",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "10.0.0.0 /8",
            " 10.0.0.0/8",
            "10.0.0.0/8/8",
            "10.0.0.0/0x8",
            "10.0.0/8",
            "10.0.0.256/8",
            "::/129",
            "2001:db8::/200",
            "fe80::1%eth0/64",
            "garbage",
            "10.0.0.0/eight",
            "2001:db8::/٣",
        ] {
            let err = bad.parse::<Cidr>().expect_err(bad);
            assert_eq!(err, CidrError(bad.to_owned()));
        }
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_err());
        assert!(Cidr::new(ip("::"), 129).is_err());
    }

    #[test]
    fn contains() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.255.1.2")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "mapped counts as IPv4");
        assert!(!net.contains(ip("11.0.0.0")));
        assert!(!net.contains(ip("a00::")), "other family");
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(!cidr("::/0").contains(ip("::ffff:192.0.2.1")), "mapped is IPv4, not IPv6");
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1234::5")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::")));
        assert!(cidr("192.0.2.1").contains(ip("192.0.2.1")));
        assert!(!cidr("192.0.2.1").contains(ip("192.0.2.2")));
    }

    #[test]
    fn most_specific_wins() {
        let mut acl = Acl::new(AclAction::Allow);
        assert!(acl.is_empty());
        assert_eq!(acl.lookup(ip("10.1.2.3")), AclAction::Allow);

        acl.insert(cidr("10.0.0.0/8"), AclAction::Deny);
        acl.insert(cidr("10.1.0.0/16"), AclAction::Allow);
        acl.insert(cidr("10.1.2.0/24"), AclAction::Restrict);
        acl.insert(cidr("10.1.2.3"), AclAction::Allow);
        acl.insert(cidr("2001:db8::/32"), AclAction::Deny);
        acl.insert(cidr("2001:db8:1::/48"), AclAction::Restrict);
        assert_eq!(acl.len(), 6);

        assert_eq!(acl.lookup(ip("10.9.9.9")), AclAction::Deny);
        assert_eq!(acl.lookup(ip("10.1.9.9")), AclAction::Allow);
        assert_eq!(acl.lookup(ip("10.1.2.9")), AclAction::Restrict);
        assert_eq!(acl.lookup(ip("10.1.2.3")), AclAction::Allow);
        assert_eq!(acl.lookup(ip("11.0.0.1")), AclAction::Allow);
        assert_eq!(acl.lookup(ip("::ffff:10.1.2.9")), AclAction::Restrict);
        assert_eq!(acl.lookup(ip("2001:db8:2::1")), AclAction::Deny);
        assert_eq!(acl.lookup(ip("2001:db8:1::1")), AclAction::Restrict);
        assert_eq!(acl.lookup(ip("2001:db9::1")), AclAction::Allow);
        // An IPv6 rule never catches IPv4 sources, nor the reverse.
        acl.insert(cidr("::/0"), AclAction::Deny);
        assert_eq!(acl.lookup(ip("192.0.2.1")), AclAction::Allow);
        assert_eq!(acl.lookup(ip("::ffff:192.0.2.1")), AclAction::Allow);
        assert_eq!(acl.lookup(ip("2002::1")), AclAction::Deny);
    }

    #[test]
    fn same_prefix_replaces_and_remove() {
        let mut acl = Acl::new(AclAction::Deny);
        acl.insert(cidr("192.0.2.0/24"), AclAction::Allow);
        acl.insert(cidr("192.0.2.128/24"), AclAction::Restrict); // same prefix after masking
        assert_eq!(acl.len(), 1);
        assert_eq!(acl.lookup(ip("192.0.2.1")), AclAction::Restrict);
        acl.insert(cidr("::ffff:192.0.2.0/120"), AclAction::Allow); // the same, written as mapped
        assert_eq!(acl.len(), 1);
        assert_eq!(acl.lookup(ip("192.0.2.1")), AclAction::Allow);

        assert_eq!(acl.remove(cidr("192.0.2.0/25")), None);
        assert_eq!(acl.remove(cidr("192.0.2.0/24")), Some(AclAction::Allow));
        assert!(acl.is_empty());
        assert_eq!(acl.lookup(ip("192.0.2.1")), AclAction::Deny);
        assert_eq!(acl.default_action(), AclAction::Deny);
        assert!(acl.v4.lengths.is_empty());
    }

    #[test]
    fn rules_listing_is_sorted() {
        let mut acl = Acl::default();
        for (c, a) in [
            ("2001:db8::/32", AclAction::Deny),
            ("10.1.0.0/16", AclAction::Allow),
            ("10.0.0.0/8", AclAction::Deny),
            ("192.0.2.1", AclAction::Restrict),
        ] {
            acl.insert(cidr(c), a);
        }
        let listed: Vec<String> = acl.rules().map(|(c, a)| format!("{c} {a:?}")).collect();
        assert_eq!(listed, ["10.0.0.0/8 Deny", "10.1.0.0/16 Allow", "192.0.2.1/32 Restrict", "2001:db8::/32 Deny"]);
    }

    fn action() -> impl Strategy<Value = AclAction> {
        prop_oneof![Just(AclAction::Allow), Just(AclAction::Deny), Just(AclAction::Restrict)]
    }

    /// A rule: a family, network bits drawn from a few top-bit patterns (so
    /// rules nest and overlap) plus random low bits, and a length.
    fn rule() -> impl Strategy<Value = (Cidr, AclAction)> {
        let v4 = (0u32..4, any::<u32>(), 0u8..=32, 0u8..=32).prop_map(|(top, low, keep, len)| {
            let bits = (top << 30) | (low >> 2 & u32::MAX.checked_shr(u32::from(keep)).unwrap_or(0));
            Cidr::new(IpAddr::V4(Ipv4Addr::from_bits(bits)), len).unwrap()
        });
        let v6 = (0u128..4, any::<u128>(), 0u8..=128, 0u8..=128).prop_map(|(top, low, keep, len)| {
            let bits = (top << 126) | (low >> 2 & u128::MAX.checked_shr(u32::from(keep)).unwrap_or(0));
            Cidr::new(IpAddr::V6(Ipv6Addr::from_bits(bits)), len).unwrap()
        });
        (prop_oneof![v4, v6], action())
    }

    /// The most specific matching rule, by brute force; a later rule for
    /// the same prefix wins.
    fn reference(rules: &[(Cidr, AclAction)], default: AclAction, addr: IpAddr) -> AclAction {
        let mut best: Option<(u8, AclAction)> = None;
        for &(c, a) in rules {
            if c.contains(addr) && best.is_none_or(|(len, _)| c.prefix_len() >= len) {
                best = Some((c.prefix_len(), a));
            }
        }
        best.map_or(default, |(_, a)| a)
    }

    proptest! {
        #[test]
        fn lookup_matches_brute_force(
            default in action(),
            rules in proptest::collection::vec(rule(), 0..40),
            probes in proptest::collection::vec((any::<usize>(), any::<u128>(), 0u8..=128, 0u8..4), 1..60),
        ) {
            let mut acl = Acl::new(default);
            for &(c, a) in &rules {
                acl.insert(c, a);
            }
            let distinct: std::collections::HashSet<Cidr> = rules.iter().map(|r| r.0).collect();
            prop_assert_eq!(acl.len(), distinct.len());
            prop_assert_eq!(acl.rules().count(), distinct.len());

            for (pick, noise, keep, how) in probes {
                // An address near a rule (its top `keep` bits), or anywhere.
                let addr = match (rules.get(pick % rules.len().max(1)), how) {
                    (Some((c, _)), 0..=2) => match c.addr() {
                        IpAddr::V4(a) => {
                            let keep = u32::from(keep.min(32));
                            let fixed = u32::MAX.checked_shl(32 - keep).unwrap_or(0);
                            let v4 = Ipv4Addr::from_bits(a.to_bits() & fixed | noise as u32 & !fixed);
                            if how == 2 { IpAddr::V6(v4.to_ipv6_mapped()) } else { IpAddr::V4(v4) }
                        }
                        IpAddr::V6(a) => {
                            let fixed = u128::MAX.checked_shl(128 - u32::from(keep)).unwrap_or(0);
                            IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & fixed | noise & !fixed))
                        }
                    },
                    _ if noise & 1 == 0 => IpAddr::V4(Ipv4Addr::from_bits((noise >> 64) as u32)),
                    _ => IpAddr::V6(Ipv6Addr::from_bits(noise)),
                };
                prop_assert_eq!(acl.lookup(addr), reference(&rules, default, addr), "{}", addr);
            }
        }

        #[test]
        fn display_parses_back(c in rule()) {
            let shown = c.0.to_string();
            prop_assert_eq!(shown.parse::<Cidr>(), Ok(c.0));
        }
    }
}
