//! Every fuzz target's body (`keel::fuzzing`) over its saved corpus
//! (`fuzz/corpus/<target>/`) and its regression inputs
//! (`fuzz/regressions/<target>/`, inputs that once crashed), on the stable
//! toolchain, so CI checks the findings without nightly or cargo-fuzz.

use std::path::Path;

use anyhow::{Context, Result, ensure};

fn inputs(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(found) };
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            found.push((path.display().to_string(), std::fs::read(&path)?));
        }
    }
    found.sort();
    Ok(found)
}

#[test]
fn every_target_passes_its_corpus_and_regressions() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, body) in keel::fuzzing::TARGETS {
        let corpus = inputs(&root.join("corpus").join(target))?;
        ensure!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
        let regressions = inputs(&root.join("regressions").join(target))?;
        for (name, data) in corpus.iter().chain(&regressions) {
            std::panic::catch_unwind(|| body(data)).ok().with_context(|| format!("{target} failed on {name}"))?;
        }
    }
    Ok(())
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    for (target, _) in keel::fuzzing::TARGETS {
        let source = std::fs::read_to_string(root.join("fuzz_targets").join(format!("{target}.rs")))?;
        ensure!(source.contains(&format!("keel::fuzzing::{target}(")), "{target}.rs does not call its body");
        ensure!(manifest.contains(&format!("name = \"{target}\"")), "fuzz/Cargo.toml lacks {target}");
    }
    Ok(())
}
