//! `check`'s pure parts: what this machine has, versions.
use super::*;

#[test]
fn a_machine_without_btf_cgroup2_or_bpffs_is_told_so() {
    let root = std::env::temp_dir().join(format!("nodemesh-check-{}", std::process::id()));
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::write(root.join("proc/mounts"), "proc /proc proc rw 0 0\n").unwrap();
    let out = this_machine(&root);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|o| !o.ok), "{out:?}");
    std::fs::create_dir_all(root.join("sys/kernel/btf")).unwrap();
    std::fs::write(root.join("sys/kernel/btf/vmlinux"), "").unwrap();
    std::fs::write(
        root.join("proc/mounts"),
        "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n",
    )
    .unwrap();
    assert!(this_machine(&root).iter().all(|o| o.ok));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn versions_are_read_from_fields_or_git_version() {
    assert_eq!(major_minor("1", "27+", "v1.27.3-eks"), Some((1, 27)));
    assert_eq!(major_minor("", "", "v1.20.2"), Some((1, 20)));
    assert_eq!(major_minor("", "", "unknown"), None);
}

#[test]
fn certificates_are_judged_by_their_days_left() {
    let fresh =
        pki::generate_trust_anchor("cluster.local", Duration::from_secs(400 * 86_400)).unwrap();
    let ok = validity("trust anchors", Some(&fresh.cert_pem));
    assert!(ok.ok && ok.detail.contains("days left"), "{ok:?}");
    let soon =
        pki::generate_trust_anchor("cluster.local", Duration::from_secs(5 * 86_400)).unwrap();
    let o = validity("trust anchors", Some(&soon.cert_pem));
    assert!(!o.ok && o.detail.contains("rotate it soon"), "{o:?}");
    assert!(!validity("issuer", None).ok);
    assert!(!validity("issuer", Some("not a certificate")).ok);
}
