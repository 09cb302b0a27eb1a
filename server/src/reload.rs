//! SIGHUP: reading the configuration again and applying what can change
//! while serving, without restarting workers or dropping packets.
//!
//! A reload is all or nothing. The file is read and validated with the
//! command-line overrides of the start applied again; then the settings
//! that changed are compared with [`LIVE`]. If any other setting changed,
//! nothing is applied and the refusal names those settings (they need a
//! restart). Otherwise the steps that can fail run first — opening a new
//! upstream source, reading a new certificate — and only then the rest is
//! published:
//!
//! - `[access]`: the ACL the workers read once per batch, and the XDP
//!   program's kernel deny list;
//! - `[rate_limit]`, `[ntp]`: every worker's responder, applied before its
//!   next batch (the limiter keeps its clients, see
//!   `RateLimiter::reconfigure`; a new `table_entries` or
//!   `interleaved_capacity` re-allocates that worker's table, a pause of a
//!   few milliseconds per worker);
//! - `[upstream]`: the control thread's policy and cadence, and a new
//!   upstream source if its settings changed (the holdover state carries
//!   over);
//! - `nts.tls_cert`, `nts.tls_key`: read again even when unchanged (a
//!   renewed certificate under the same name), served from the next
//!   handshake;
//! - `nts.rotation_interval`, `nts.keep_keys`: the key ring (see
//!   `NtsKeys::set_rotation`);
//! - `xdp.source_rate`, `xdp.source_burst` (and `rate_limit.enabled`): the
//!   XDP program's per-source flood guard, in its config map (sources keep
//!   their place in the table).

use std::collections::{BTreeMap, BTreeSet};

use toml::Value;

use crate::config::Config;

/// Settings a reload applies live: a dotted key, or a whole `[section].`
/// Every other setting needs a restart.
pub const LIVE: &[&str] = &[
    "access.",
    "rate_limit.",
    "ntp.",
    "upstream.",
    "nts.tls_cert",
    "nts.tls_key",
    "nts.rotation_interval",
    "nts.keep_keys",
    "xdp.source_rate",
    "xdp.source_burst",
];

/// Whether `key` (dotted) is applied live.
pub fn is_live(key: &str) -> bool {
    LIVE.iter().any(|l| if l.ends_with('.') { key.starts_with(l) } else { key == *l })
}

/// The dotted keys whose values differ between `old` and `new` (arrays
/// compare whole: `access.deny` is one key).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let flat = |cfg: &Config| {
        let mut out = BTreeMap::new();
        if let Ok(v) = Value::try_from(cfg) {
            flatten("", &v, &mut out);
        }
        out
    };
    let (a, b) = (flat(old), flat(new));
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).collect();
    keys.into_iter().cloned().collect()
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

/// What a reload would do: the settings that changed, or the refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadPlan {
    /// Only live settings changed (possibly none); apply them.
    Apply {
        /// The settings that changed.
        changed: Vec<String>,
    },
    /// These settings changed and need a restart; apply nothing.
    Refuse {
        /// The settings that need a restart.
        restart: Vec<String>,
    },
}

/// Compares the running configuration with the one just read.
pub fn plan(old: &Config, new: &Config) -> ReloadPlan {
    let changed = changed_keys(old, new);
    let restart: Vec<String> = changed.iter().filter(|k| !is_live(k)).cloned().collect();
    if restart.is_empty() { ReloadPlan::Apply { changed } } else { ReloadPlan::Refuse { restart } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn live_changes_are_applied_and_named() {
        let old = parse("[access]\ndeny = [\"192.0.2.0/24\"]\n");
        let new = parse(
            "[access]\ndeny = [\"192.0.2.0/24\", \"198.51.100.0/24\"]\n[rate_limit]\nburst = 8\n[upstream]\nlocal_stratum = 9\n\
             [nts]\nkeep_keys = 3\n",
        );
        assert_eq!(
            plan(&old, &new),
            ReloadPlan::Apply {
                changed: vec![
                    "access.deny".into(),
                    "nts.keep_keys".into(),
                    "rate_limit.burst".into(),
                    "upstream.local_stratum".into()
                ]
            }
        );
        assert_eq!(plan(&old, &old), ReloadPlan::Apply { changed: vec![] });
    }

    #[test]
    fn restart_settings_refuse_the_whole_reload() {
        let old = Config::default();
        let new = parse("[server]\nworkers = 3\n[access]\ndeny = [\"192.0.2.0/24\"]\n[xdp]\nqueues = 2\n");
        assert_eq!(
            plan(&old, &new),
            ReloadPlan::Refuse { restart: vec!["server.workers".into(), "xdp.queues".into()] }
        );
        let new = parse("[nts]\nlisten = [\"127.0.0.1:4460\"]\n");
        assert_eq!(plan(&old, &new), ReloadPlan::Refuse { restart: vec!["nts.listen".into()] });
    }

    #[test]
    fn the_reference_file_documents_every_live_setting() {
        let reference = include_str!("../../ops/chimed.toml");
        let (head, _) = reference.split_once("[server]").unwrap();
        for live in LIVE {
            let shown = match live.strip_suffix('.') {
                Some(section) => format!("[{section}]"),
                None => live.to_string(),
            };
            assert!(head.contains(&shown), "ops/chimed.toml's Reload note does not mention {shown}");
        }
    }

    #[test]
    fn live_list_matches_sections_and_keys_that_exist() {
        let defaults = Value::try_from(Config::default()).unwrap();
        let mut keys = BTreeMap::new();
        flatten("", &defaults, &mut keys);
        for live in LIVE {
            assert!(keys.keys().any(|k| is_live(k) && k.starts_with(live)), "{live} names no setting");
        }
        // Restart-only settings that must never slip into the live list.
        for key in ["server.listen", "server.backend", "server.user", "xdp.mode", "nts.enabled", "metrics.listen"] {
            assert!(keys.contains_key(key), "{key} exists");
            assert!(!is_live(key), "{key} needs a restart");
        }
    }
}
