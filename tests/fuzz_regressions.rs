//! Every fuzz input kept in the repository, through the same function its fuzz target calls
//! (`whatsapp_relay::fuzzing`, invariants included): the seeds (`fuzz/seeds/<target>/`) and
//! the inputs that once failed (`tests/fixtures/fuzz/<target>/`, each named for what it found).
//! A fixed finding stays fixed; the fuzz runs themselves are `fuzz/run.sh`.

use std::path::Path;

use whatsapp_relay::fuzzing;
use whatsapp_relay::provider::{dialog360, generic, kaleyra, meta, sinch, twilio};

/// Runs `target` on every file of its seed and regression folders; at least one must exist.
fn run(name: &str, target: impl Fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = 0;
    for dir in [root.join("fuzz/seeds").join(name), root.join("tests/fixtures/fuzz").join(name)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            // Say which input a failing assertion came from.
            eprintln!("{name}: {}", file.display());
            target(&data);
            inputs += 1;
        }
    }
    assert!(inputs > 0, "no input for the {name} fuzz target");
}

#[test]
fn provider_twilio() {
    run("provider_twilio", |d| fuzzing::provider(twilio::KIND, d));
}

#[test]
fn provider_meta() {
    run("provider_meta", |d| fuzzing::provider(meta::KIND, d));
}

#[test]
fn provider_dialog360() {
    run("provider_dialog360", |d| fuzzing::provider(dialog360::KIND, d));
}

#[test]
fn provider_sinch() {
    run("provider_sinch", |d| fuzzing::provider(sinch::KIND, d));
}

#[test]
fn provider_kaleyra() {
    run("provider_kaleyra", |d| fuzzing::provider(kaleyra::KIND, d));
}

#[test]
fn provider_generic() {
    run("provider_generic", |d| fuzzing::provider(generic::KIND, d));
}

#[test]
fn routing() {
    run("routing", fuzzing::routing);
}

#[test]
fn meta_app() {
    run("meta_app", fuzzing::meta_app);
}

#[test]
fn config() {
    run("config", fuzzing::config);
}
