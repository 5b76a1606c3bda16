//! The GPU bundle's library finder (`scripts/gpu-env.sh`), on stand-in folders: a real driver is
//! always preferred to the bundle's link-time stub, the stub is used only where no driver exists,
//! CUDA's libraries come from Python's `nvidia-*` wheels when the system has none, and a missing
//! library is an error naming it. (The bundle itself is built and run by scripts/gpu-bundle.sh.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const NEEDED: &[&str] = &["libcublas.so.13", "libcublasLt.so.13", "libnccl.so.2"];

/// A bundle folder holding the finder, its list of needed libraries and the driver stub.
fn bundle(root: &Path) -> PathBuf {
    let bundle = root.join("kiln-gpu");
    std::fs::create_dir_all(bundle.join("lib/driver-stub")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-env.sh"),
        bundle.join("gpu-env.sh"),
    )
    .unwrap();
    std::fs::write(bundle.join("lib/needed.txt"), NEEDED.join("\n") + "\n").unwrap();
    std::fs::write(bundle.join("lib/driver-stub/libcuda.so.1"), "stub").unwrap();
    bundle
}

fn folder_with(root: &Path, name: &str, files: &[&str]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in files {
        std::fs::write(dir.join(file), "").unwrap();
    }
    dir
}

/// Sources the finder with `KILN_CUDA_LIBS` and no Python wheels or usual folders to find
/// (a Python that is not there), and returns (success, LD_LIBRARY_PATH, stderr).
fn find(bundle: &Path, cuda_libs: &str, python: Option<&Path>) -> (bool, String, String) {
    let output = Command::new(system_tool("bash"))
        .arg("-c")
        .arg(format!(
            "source {}/gpu-env.sh && printf '%s' \"$LD_LIBRARY_PATH\"",
            bundle.display()
        ))
        .env("KILN_CUDA_LIBS", cuda_libs)
        .env_remove("LD_LIBRARY_PATH")
        .env(
            "KILN_PYTHON",
            python.unwrap_or(Path::new("/nonexistent/python")),
        )
        // Keeps the machine's own python3 and its wheels out of the search.
        .env("PATH", tools(bundle))
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A PATH of the few tools the finder calls, without any Python.
fn tools(bundle: &Path) -> PathBuf {
    let bin = bundle.parent().unwrap().join("tools");
    if !bin.exists() {
        std::fs::create_dir_all(&bin).unwrap();
        for tool in ["dirname", "cat", "awk"] {
            std::os::unix::fs::symlink(system_tool(tool), bin.join(tool)).unwrap();
        }
    }
    bin
}

fn system_tool(tool: &str) -> PathBuf {
    ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{tool} is not in /usr/bin or /bin"))
}

fn machine_has_a_driver() -> bool {
    [
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
    ]
    .iter()
    .any(|dir| Path::new(dir).join("libcuda.so.1").exists())
}

#[test]
fn a_real_driver_always_comes_before_the_stub() {
    let root = tempfile::tempdir().unwrap();
    let bundle = bundle(root.path());
    let driver = folder_with(root.path(), "driver", &["libcuda.so.1"]);
    let cuda = folder_with(root.path(), "cuda", NEEDED);
    let (ok, path, stderr) = find(
        &bundle,
        &format!("{}:{}", driver.display(), cuda.display()),
        None,
    );
    assert!(ok, "{stderr}");
    let dirs: Vec<&str> = path.split(':').collect();
    assert_eq!(dirs[0], driver.to_str().unwrap(), "{path}");
    assert!(dirs.contains(&cuda.to_str().unwrap()), "{path}");
    assert!(
        !path.contains("driver-stub"),
        "the stub was put on the path: {path}"
    );
    assert!(
        stderr.contains(&format!("libcuda.so.1: {}", driver.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "libnccl.so.2: {} (KILN_CUDA_LIBS)",
            cuda.display()
        )),
        "{stderr}"
    );
}

#[test]
fn without_a_driver_the_stub_is_used_and_said_so() {
    if machine_has_a_driver() {
        // This machine's own driver is found first, as it must be; the case cannot be staged.
        assert!(
            !common::in_ci(),
            "CI=true on a machine with an NVIDIA driver"
        );
        eprintln!("SKIPPED (not a pass): this machine has an NVIDIA driver");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let bundle = bundle(root.path());
    let cuda = folder_with(root.path(), "cuda", NEEDED);
    let (ok, path, stderr) = find(&bundle, cuda.to_str().unwrap(), None);
    assert!(ok, "{stderr}");
    assert!(
        path.split(':')
            .any(|dir| dir == bundle.join("lib/driver-stub").to_str().unwrap()),
        "{path}"
    );
    assert!(
        stderr.contains("driver: none found (no libcuda.so.1); using the bundle's link-time stub"),
        "{stderr}"
    );
}

#[test]
fn cuda_libraries_come_from_python_wheels_and_a_missing_one_is_named() {
    let root = tempfile::tempdir().unwrap();
    let bundle = bundle(root.path());
    let driver = folder_with(root.path(), "driver", &["libcuda.so.1"]);
    // A stand-in Python whose site-packages holds the wheels' layout.
    let site = root.path().join("site");
    folder_with(
        &site,
        "nvidia/cu13/lib",
        &["libcublas.so.13", "libcublasLt.so.13"],
    );
    folder_with(&site, "nvidia/nccl/lib", &["libnccl.so.2"]);
    let python = root.path().join("python");
    std::fs::write(
        &python,
        format!("#!/bin/sh\necho {} {}\n", site.display(), site.display()),
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ok, path, stderr) = find(&bundle, driver.to_str().unwrap(), Some(&python));
    assert!(ok, "{stderr}");
    for dir in ["nvidia/cu13/lib", "nvidia/nccl/lib"] {
        assert!(
            path.split(':')
                .any(|d| d == site.join(dir).to_str().unwrap()),
            "{dir} not on {path}"
        );
    }
    assert!(
        stderr.contains(&format!(
            "libcublas.so.13: {} (python wheels of {})",
            site.join("nvidia/cu13/lib").display(),
            python.display()
        )),
        "{stderr}"
    );

    std::fs::remove_file(site.join("nvidia/nccl/lib/libnccl.so.2")).unwrap();
    let (ok, _, stderr) = find(&bundle, driver.to_str().unwrap(), Some(&python));
    assert!(!ok, "a missing libnccl.so.2 passed: {stderr}");
    assert!(
        stderr.contains("gpu-env: error: CUDA libraries not found: libnccl.so.2."),
        "{stderr}"
    );
}
