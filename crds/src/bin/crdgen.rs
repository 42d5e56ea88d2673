//! Writes the InferencePool CRD to `charts/parallax/crds/` (or stdout with `--stdout`).

use std::path::Path;

fn main() -> std::process::ExitCode {
    let yaml = parallax_crds::crd_yaml();
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return std::process::ExitCode::SUCCESS;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(parallax_crds::CRD_PATH);
    match std::fs::write(&path, yaml) {
        Ok(()) => {
            println!("wrote {}", parallax_crds::CRD_PATH);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            std::process::ExitCode::FAILURE
        }
    }
}
