//! Replays the captured seeds (`fuzz/seeds/<target>/`), the committed fuzz
//! corpus (`fuzz/corpus/<target>/`) and the regression inputs of fixed
//! findings (`fuzz/regressions/<target>/`) through the target bodies on
//! stable Rust: the fuzzing campaigns' results as a regression test.

use std::fs;
use std::path::{Path, PathBuf};

use chime_fuzz_harness::TARGETS;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_and_regressions_replay() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (name, body) in TARGETS {
        let seeds = inputs(&fuzz.join("seeds").join(name));
        let corpus = inputs(&fuzz.join("corpus").join(name));
        let regressions = inputs(&fuzz.join("regressions").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name}/ is empty or missing");
        assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ is empty or missing");
        for path in seeds.iter().chain(&corpus).chain(&regressions) {
            let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            eprintln!("{name}: {}", path.display());
            body(&data);
        }
        println!(
            "{name}: {} seeds, {} corpus inputs, {} regression inputs replayed",
            seeds.len(),
            corpus.len(),
            regressions.len()
        );
    }
}

#[test]
fn key_file_decodes() {
    let ring = chime_fuzz_harness::key_ring();
    assert_eq!(ring.ids().collect::<Vec<_>>(), [0x4655_5A5A]);
}

#[test]
fn captured_nts_seeds_authenticate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../seeds/responder_nts");
    let seeds = inputs(&dir);
    assert!(!seeds.is_empty(), "no captured NTS requests in fuzz/seeds/responder_nts/");
    for path in &seeds {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(chime_fuzz_harness::nts_authenticates(&data), "{} gets no NTS reply", path.display());
    }
}
