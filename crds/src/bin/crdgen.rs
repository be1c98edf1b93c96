//! Writes the CRD YAML into charts/fleetproxy/crds/ (or prints it with `--stdout`).

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let to_stdout = std::env::args().any(|arg| arg == "--stdout");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetproxy/crds");
    for crd in fleetproxy_api::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml = match fleetproxy_api::crd_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(err) => {
                eprintln!("crdgen: cannot serialize {name}: {err}");
                return ExitCode::FAILURE;
            }
        };
        if to_stdout {
            print!("---\n{yaml}");
            continue;
        }
        let path = dir.join(format!("{name}.yaml"));
        if let Err(err) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
