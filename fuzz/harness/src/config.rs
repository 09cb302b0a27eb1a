//! `config`: chimed's configuration file parser and validator.

use chime_server::config::Config;

/// Parses `data` as a chimed configuration file; one that is accepted
/// prints (as `--print-config` does) to a file that parses to the same
/// configuration, and converts to the types chimed runs with.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_toml_str(text) else { return };
    if let Err(e) = config.validate() {
        panic!("an accepted configuration does not validate: {e}");
    }
    let printed = config.to_toml_string().unwrap_or_else(|e| panic!("an accepted configuration does not print: {e}"));
    match Config::from_toml_str(&printed) {
        Ok(back) => assert_eq!(back, config, "printed configuration reads back differently:\n{printed}"),
        Err(e) => panic!("the printed configuration is refused: {e}\n{printed}"),
    }
    let workers = config.worker_count();
    let responder = config.responder_config(workers.max(1));
    assert!(responder.min_poll <= responder.max_poll);
    if let Err(e) = config.acl() {
        panic!("an accepted configuration has a bad ACL: {e}");
    }
    let _ = (config.reference_id(), config.local_stratum(), config.update_interval(), config.source_config());
    let _ = (config.serves_ntp(), config.uses_xdp(), config.run_as_user(), config.nts.key_ring_config());
}
