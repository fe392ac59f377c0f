//! `cargo xtask image`: container images without a container engine. Each
//! image is one layer (the binary, the shared libraries `ldd` names, and
//! whatever else it lists) written as an OCI image layout in a tar archive,
//! the form `ctr images import`, `skopeo copy oci-archive:…` and
//! `podman load` take.
//!
//! - `ghcr.io/nodemesh/nodemesh:<version>`: the `nodemesh` binary (agent,
//!   identity service, CLI), the reference `nodemesh install` prints;
//! - `nodemesh.test/testapp:<version>`: the test bed's apps (tcp, http,
//!   grpc roles) and a static busybox, for the real-node tests;
//! - `nodemesh.test/pause:<version>`: the pod sandbox image (busybox sleep).
use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The version every image is tagged with: the workspace's (the agent's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const NODEMESH: &str = "ghcr.io/nodemesh/nodemesh";
pub const TESTAPP: &str = "nodemesh.test/testapp";
pub const PAUSE: &str = "nodemesh.test/pause";
const BUSYBOX: &str = "/bin/busybox";

/// One image: its reference and what its single layer holds.
pub struct Image {
    reference: String,
    /// Path in the image → what goes there.
    entries: BTreeMap<String, Entry>,
    entrypoint: Vec<String>,
}

enum Entry {
    Dir,
    File {
        from: PathBuf,
        mode: u32,
        /// A binary whose debug info is left out (`strip --strip-debug`).
        strip: bool,
    },
    Symlink {
        target: String,
    },
}

impl Image {
    pub fn new(name: &str) -> Self {
        let mut image = Self {
            reference: format!("{name}:{VERSION}"),
            entries: BTreeMap::new(),
            entrypoint: Vec::new(),
        };
        image.dir("/tmp");
        image
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.trim_matches('/').split('/') {
            at.push('/');
            at.push_str(part);
            self.entries.entry(at.clone()).or_insert(Entry::Dir);
        }
    }

    fn put(&mut self, path: &str, entry: Entry) {
        if let Some((parent, _)) = path.rsplit_once('/')
            && !parent.is_empty()
        {
            self.dir(parent);
        }
        self.entries.insert(path.to_owned(), entry);
    }

    /// A file copied from the host.
    pub fn file(&mut self, from: &Path, to: &str, mode: u32) -> &mut Self {
        self.put(
            to,
            Entry::File {
                from: from.to_owned(),
                mode,
                strip: false,
            },
        );
        self
    }

    pub fn symlink(&mut self, at: &str, target: &str) -> &mut Self {
        self.put(
            at,
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
        self
    }

    /// A dynamically linked binary and every shared library it loads, at
    /// the paths the loader looks for them.
    pub fn binary(&mut self, from: &Path, to: &str) -> Result<&mut Self> {
        self.put(
            to,
            Entry::File {
                from: from.to_owned(),
                mode: 0o755,
                strip: true,
            },
        );
        for lib in shared_libraries(from)? {
            let real = fs::canonicalize(&lib)
                .with_context(|| format!("cannot resolve {}", lib.display()))?;
            let at = lib.to_string_lossy().into_owned();
            self.file(&real, &at, 0o755);
        }
        Ok(self)
    }

    /// The host's static busybox, with `applets` linked to it in /bin.
    pub fn busybox(&mut self, applets: &[&str]) -> Result<&mut Self> {
        let busybox = Path::new(BUSYBOX);
        if !busybox.exists() {
            bail!("{BUSYBOX} is missing: run `cargo xtask setup` (apt package busybox-static)");
        }
        self.file(busybox, BUSYBOX, 0o755);
        for applet in applets {
            self.symlink(&format!("/bin/{applet}"), "busybox");
        }
        Ok(self)
    }

    pub fn entrypoint(&mut self, args: &[&str]) -> &mut Self {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Writes the image as an OCI layout in a tar archive at `out`.
    pub fn write_archive(&self, out: &Path) -> Result<()> {
        let layer = self.layer()?;
        let layer_digest = sha256(&layer);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "cargo xtask image"}],
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))?;
        let tag = self.reference.rsplit_once(':').map_or("latest", |(_, t)| t);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(&manifest),
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": self.reference,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))?;
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = out.with_extension("tmp");
        let file =
            fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
        let mut add = |path: &str, data: &[u8]| -> Result<()> {
            let mut header = regular_header(data.len() as u64, 0o644);
            archive.append_data(&mut header, path, data)?;
            Ok(())
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json", &index)?;
        for blob in [&layer, &config, &manifest] {
            let digest = sha256(blob);
            let hex = digest.trim_start_matches("sha256:");
            add(&format!("blobs/sha256/{hex}"), blob)?;
        }
        archive
            .into_inner()
            .context("cannot finish the archive")?
            .flush()?;
        fs::rename(&tmp, out)?;
        Ok(())
    }

    /// The layer: a tar of every entry, parents before children.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut layer = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let name = path.trim_start_matches('/');
            match entry {
                Entry::Dir => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(if path == "/tmp" { 0o1777 } else { 0o755 });
                    h.set_size(0);
                    h.set_mtime(0);
                    layer.append_data(&mut h, format!("{name}/"), std::io::empty())?;
                }
                Entry::File { from, mode, strip } => {
                    let data = if *strip {
                        stripped(from)?
                    } else {
                        fs::read(from).with_context(|| format!("cannot read {}", from.display()))?
                    };
                    let mut h = regular_header(data.len() as u64, *mode);
                    layer.append_data(&mut h, name, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    h.set_mtime(0);
                    layer.append_link(&mut h, name, target)?;
                }
            }
        }
        Ok(layer.into_inner()?)
    }
}

/// `bin` without its debug info (a debug build is ten times the size).
fn stripped(bin: &Path) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("nodemesh-image-{}.bin", std::process::id()));
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok {
        fs::read(&tmp)?
    } else {
        fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?
    };
    let _ = fs::remove_file(&tmp);
    Ok(data)
}

fn regular_header(size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The shared libraries `ldd` says `bin` loads (the loader included).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: nothing to add.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {text}", bin.display());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {line}", bin.display());
        }
    }
    Ok(libs)
}

/// The three images, from the release binaries in `release`.
pub fn images(release: &Path) -> Result<Vec<Image>> {
    let mut nodemesh = Image::new(NODEMESH);
    nodemesh
        .binary(&release.join("nodemesh"), "/usr/local/bin/nodemesh")?
        .entrypoint(&["/usr/local/bin/nodemesh"]);
    let mut testapp = Image::new(TESTAPP);
    testapp
        .binary(
            &release.join("nodemesh-testapp"),
            "/usr/local/bin/nodemesh-testapp",
        )?
        .busybox(&["sh", "sleep", "cat", "echo", "ls", "nc", "true", "false"])?
        .entrypoint(&["/usr/local/bin/nodemesh-testapp"]);
    let mut pause = Image::new(PAUSE);
    pause
        .busybox(&[])?
        .entrypoint(&[BUSYBOX, "sleep", "2147483647"]);
    Ok(vec![nodemesh, testapp, pause])
}

/// Where an image's archive goes.
pub fn archive_path(images_dir: &Path, image: &Image) -> PathBuf {
    let name = image
        .reference()
        .rsplit('/')
        .next()
        .unwrap_or("image")
        .replace(':', "-");
    images_dir.join(format!("{name}.oci.tar"))
}
