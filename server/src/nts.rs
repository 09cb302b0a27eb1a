//! NTS master keys in chimed: where the [`KeyRing`] comes from, when it
//! rotates, and how it is persisted. The control thread calls
//! [`NtsKeys::tick`]; the ring is published in an `Arc<ArcSwap<KeyRing>>`
//! shared by the workers (through [`Shared::nts`](crate::shared::Shared))
//! and the NTS-KE server.
//!
//! - **Standalone** (`nts.fleet_secret` empty): at start `nts.key_file` is
//!   read if it exists (a file that does not decode stops chimed: silently
//!   replacing it would invalidate every client's cookies), else a random
//!   key is made. A rotation draws a random key with a fresh random id.
//!   After every change the ring is written to a temporary file in the same
//!   directory (mode 0600), fsync'd, and renamed over the key file.
//! - **Fleet**: the ring is [`KeyRing::for_fleet`] of the shared secret and
//!   the current time, recomputed when the epoch changes; nothing is
//!   persisted.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use chime_nts_ke::{os_random, read_secret_file};
use chime_proto::nts::keyring::MASTER_KEY_LEN;
use chime_proto::nts::{KeyRing, KeyRingConfig, MasterKey};
use tracing::{info, warn};

use crate::config::NtsSection;

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

enum Source {
    /// Random keys, persisted to the file (if any).
    Random { key_file: Option<PathBuf> },
    /// Derived from a fleet secret.
    Fleet { secret: Vec<u8> },
}

/// The key ring's owner.
pub struct NtsKeys {
    source: Source,
    cfg: KeyRingConfig,
    ring: Arc<ArcSwap<KeyRing>>,
}

impl std::fmt::Debug for NtsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtsKeys").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl NtsKeys {
    /// The ring at start, per the configuration (see the module docs).
    /// Errors name the file at fault.
    pub fn load(n: &NtsSection, now: u64) -> Result<Self, String> {
        let cfg = n.key_ring_config();
        if !n.fleet_secret.as_os_str().is_empty() {
            let path = &n.fleet_secret;
            let secret = read_secret_file(path).map_err(|e| format!("nts.fleet_secret: {e}"))?;
            let ring = KeyRing::for_fleet(&secret, now, cfg)
                .map_err(|e| format!("nts.fleet_secret: {}: {e}", path.display()))?;
            info!(key_id = ring.current().id(), "NTS keys derived from the fleet secret");
            return Ok(Self { source: Source::Fleet { secret }, cfg, ring: Arc::new(ArcSwap::from_pointee(ring)) });
        }
        let key_file = (!n.key_file.as_os_str().is_empty()).then(|| n.key_file.clone());
        let loaded = match &key_file {
            Some(path) if path.exists() => {
                let bytes = read_secret_file(path).map_err(|e| format!("nts.key_file: {e}"))?;
                let ring = KeyRing::decode(&bytes).map_err(|e| {
                    format!("nts.key_file: {}: {e} (move it away to start with new keys)", path.display())
                })?;
                info!(file = %path.display(), key_id = ring.current().id(), "NTS keys loaded");
                Some(ring)
            }
            _ => None,
        };
        let fresh = loaded.is_none();
        let ring = match loaded {
            Some(r) => r,
            None => {
                let (key, id) = random_key(&[]).map_err(|e| format!("reading random bytes: {e}"))?;
                KeyRing::new(MasterKey::new(id, key), cfg.keep, now)
            }
        };
        let keys = Self { source: Source::Random { key_file }, cfg, ring: Arc::new(ArcSwap::from_pointee(ring)) };
        if fresh {
            keys.persist()?;
            if let Source::Random { key_file: Some(p) } = &keys.source {
                info!(file = %p.display(), "new NTS master key made and saved");
            }
        }
        Ok(keys)
    }

    /// The published ring.
    pub fn ring(&self) -> Arc<ArcSwap<KeyRing>> {
        Arc::clone(&self.ring)
    }

    /// Rotates (or re-derives) if due at `now`; returns whether the ring
    /// changed. A failure to persist is returned after the new ring is
    /// published (serving goes on; the next restart would lose the key).
    pub fn tick(&mut self, now: u64) -> Result<bool, String> {
        let current = self.ring.load_full();
        match &self.source {
            Source::Fleet { secret } => {
                let epoch_start = now / self.cfg.interval_secs * self.cfg.interval_secs;
                if epoch_start == current.rotated_at() {
                    return Ok(false);
                }
                let ring = KeyRing::for_fleet(secret, now, self.cfg).map_err(|e| e.to_string())?;
                info!(key_id = ring.current().id(), "NTS fleet key epoch changed");
                self.ring.store(Arc::new(ring));
                Ok(true)
            }
            Source::Random { .. } => {
                if !current.rotation_due(now, self.cfg.interval_secs) {
                    return Ok(false);
                }
                let held: Vec<u32> = current.ids().collect();
                let (key, id) = random_key(&held).map_err(|e| format!("reading random bytes: {e}"))?;
                let mut ring = KeyRing::clone(&current);
                ring.rotate(key, id, now).map_err(|e| e.to_string())?;
                info!(key_id = id, "NTS master key rotated");
                self.ring.store(Arc::new(ring));
                self.persist()?;
                Ok(true)
            }
        }
    }

    /// The rotation settings in effect.
    pub fn rotation(&self) -> KeyRingConfig {
        self.cfg
    }

    /// New rotation settings (a reload). The interval applies from the
    /// next rotation check; a smaller `keep` forgets the oldest previous
    /// keys now (their cookies get a NAK). In fleet mode the ring is
    /// derived again at once: a changed interval renumbers the epochs, so
    /// cookies issued under the old schedule get a NAK and clients run
    /// NTS-KE again; every member of a fleet must change it together.
    pub fn set_rotation(&mut self, cfg: KeyRingConfig, now: u64) -> Result<(), String> {
        if cfg == self.cfg {
            return Ok(());
        }
        if cfg.interval_secs == 0 {
            return Err("nts.rotation_interval must be at least 1".to_owned());
        }
        self.cfg = cfg;
        match &self.source {
            Source::Fleet { secret } => {
                let ring = KeyRing::for_fleet(secret, now, cfg).map_err(|e| e.to_string())?;
                info!(key_id = ring.current().id(), "NTS fleet keys derived again for new rotation settings");
                self.ring.store(Arc::new(ring));
            }
            Source::Random { .. } => {
                let current = self.ring.load_full();
                if current.keep() != cfg.keep {
                    let mut ring = KeyRing::clone(&current);
                    ring.set_keep(cfg.keep);
                    self.ring.store(Arc::new(ring));
                    self.persist()?;
                }
            }
        }
        info!(interval_secs = cfg.interval_secs, keep = cfg.keep, "NTS key rotation settings changed");
        Ok(())
    }

    fn persist(&self) -> Result<(), String> {
        if let Source::Random { key_file: Some(path) } = &self.source {
            write_atomic(path, &self.ring.load().encode())
                .map_err(|e| format!("nts.key_file: cannot save {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// A random key and a random id not in `held`.
fn random_key(held: &[u32]) -> io::Result<([u8; MASTER_KEY_LEN], u32)> {
    let key = os_random::<MASTER_KEY_LEN>()?;
    loop {
        let id = u32::from_be_bytes(os_random::<4>()?);
        if !held.contains(&id) {
            return Ok((key, id));
        }
    }
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same
/// directory, mode 0600, fsync'd, renamed over `path`, and the directory
/// fsync'd.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir)
            && let Err(e) = d.sync_all()
        {
            warn!(dir = %dir.display(), error = %e, "cannot fsync the key file's directory");
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("chime-nts-keys-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn section(key_file: &Path) -> NtsSection {
        NtsSection { key_file: key_file.to_owned(), rotation_interval: 100, keep_keys: 2, ..NtsSection::default() }
    }

    #[test]
    fn fresh_persisted_rotated_reloaded() {
        let d = dir("fresh");
        let file = d.join("keys");
        let mut keys = NtsKeys::load(&section(&file), 1_000).unwrap();
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = keys.ring().load().current().id();
        assert!(!keys.tick(1_050).unwrap());
        assert!(keys.tick(1_100).unwrap());
        let ring = keys.ring().load_full();
        assert_ne!(ring.current().id(), first);
        assert!(ring.get(first).is_some());
        // Reload from the file: the same keys.
        let again = NtsKeys::load(&section(&file), 1_101).unwrap();
        assert_eq!(again.ring().load().encode(), ring.encode());
        // No stray temporary files.
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_or_readable_key_file_refused() {
        let d = dir("corrupt");
        let file = d.join("keys");
        fs::write(&file, b"garbage").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let e = NtsKeys::load(&section(&file), 1_000).unwrap_err();
        assert!(e.contains("nts.key_file") && e.contains(&file.display().to_string()), "{e}");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let e = NtsKeys::load(&section(&file), 1_000).unwrap_err();
        assert!(e.contains("group or others"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fleet_mode_follows_epochs() {
        let d = dir("fleet");
        let secret = d.join("secret");
        fs::write(&secret, [7u8; 32]).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let n = NtsSection { fleet_secret: secret.clone(), ..section(&d.join("unused")) };
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o640)).unwrap();
        let e = NtsKeys::load(&n, 1_000).err().unwrap();
        assert!(e.starts_with(&format!("nts.fleet_secret: {}: mode 0640", secret.display())), "{e}");
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let mut a = NtsKeys::load(&n, 1_000).unwrap();
        let b = NtsKeys::load(&n, 1_050).unwrap();
        assert_eq!(a.ring().load().encode(), b.ring().load().encode());
        assert!(!a.tick(1_099).unwrap());
        assert!(a.tick(1_100).unwrap());
        assert_eq!(a.ring().load().current().id(), 11);
        assert!(!d.join("unused").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
