//! chime's NTS-KE server (filled in by the NTS issue).
//!
//! This crate will hold the Network Time Security key-establishment server of
//! RFC 8915: TLS 1.3 only (rustls) on TCP port 4460 with ALPN `ntske/1`, a mio
//! event loop with per-connection timeouts and limits, key export with
//! `export_keying_material`, and cookies sealed under the current master key
//! of the `KeyRing` shared with the NTP workers. It runs inside chimed by
//! default and can also run on its own as an NTS-KE front end.
#![forbid(unsafe_code)]
