//! `fwd --check-config`: no root, no kernel, only the configuration file.

use std::process::Command;

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fwd.yaml");
    std::fs::write(&path, text).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_fwd"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .expect("run fwd");
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
            .replace(path.to_str().expect("utf-8"), "fwd.yaml");
    (out.status.success(), said)
}

#[test]
fn check_config_prints_the_effective_settings_with_their_defaults() {
    let (ok, said) = check("source: {url: file:///srv/policies.git}\nhost: {name: web-1}\n");
    assert!(ok, "{said}");
    for want in [
        "fwd.yaml: ok",
        "source file:///srv/policies.git (main, policies) every 30s",
        "host web-1 labels {}",
        "interfaces [\"eth0\"]",
        "bpffs /sys/fs/bpf/fw",
        "state /var/lib/fwd",
        "status /run/fwd/status.sock",
        "metrics 127.0.0.1:9469",
        "drift_interval 60s",
    ] {
        assert!(said.contains(want), "missing {want:?} in\n{said}");
    }
}

#[test]
fn check_config_refuses_unknown_fields_with_file_line_and_column() {
    let (ok, said) = check("source:\n  url: x\ninterface: [eth0]\n");
    assert!(!ok);
    assert!(said.starts_with("fwd.yaml:3:1: unknown field `interface`"), "{said}");
    let (ok, said) = check("source: {ref: main}\n");
    assert!(!ok);
    assert!(said.contains("url"), "{said}");
}

#[test]
fn the_daemon_needs_a_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_fwd")).output().expect("run fwd");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}
