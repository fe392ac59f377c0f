//! The dependency graph's checks (deny.toml): licenses, banned crates and
//! sources always; RustSec advisories against the newest copy of the
//! advisory database this machine can get.
//!
//! The database is a git repository on github.com, which a machine without
//! internet cannot reach: then `NODEMESH_ADVISORY_DB` (a clone of
//! rustsec/advisory-db, e.g. carried in) is used, else the copy a previous
//! run fetched, else the advisories are reported as not checked — loudly,
//! never as passed.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup::cargo_deny_bin;

/// Where cargo-deny keeps its database copies (deny.toml's `db-path`).
fn db_root() -> PathBuf {
    crate::tools::tools_dir().join("advisory-dbs")
}

/// The directory cargo-deny (the pinned version) names the RustSec
/// database by: `advisory-db-` and a hash of its URL.
const DB_DIR: &str = "advisory-db-3157b0e258782691";

pub fn run(workspace: &Path) -> Result<()> {
    let deny = cargo_deny_bin();
    let root = db_root();
    std::fs::create_dir_all(&root)?;
    // Licenses, bans, sources: from Cargo.lock and the local registry.
    check(&deny, workspace, &root, &["bans", "licenses", "sources"])?;

    let db = root.join(DB_DIR);
    let source = match std::env::var_os("NODEMESH_ADVISORY_DB") {
        Some(given) => {
            copy_db(Path::new(&given), &db)?;
            format!(
                "the copy in NODEMESH_ADVISORY_DB ({})",
                given.to_string_lossy()
            )
        }
        None => {
            println!("xtask: cargo deny fetch db (RustSec advisory database)");
            let fetched = Command::new(&deny)
                .args(["fetch", "db"])
                .current_dir(workspace)
                .env("NODEMESH_ADVISORY_DBS", &root)
                .status()
                .is_ok_and(|s| s.success());
            if fetched {
                "github.com/rustsec/advisory-db, just fetched".to_string()
            } else {
                "an earlier fetch (github.com is not reachable now)".to_string()
            }
        }
    };
    if !db.join(".git").exists() && !db.join("HEAD").exists() {
        println!(
            "xtask: WARNING: RustSec advisories NOT checked: github.com is not reachable \
             and no copy of the database is here; set NODEMESH_ADVISORY_DB to a clone of \
             https://github.com/rustsec/advisory-db to check them (README, Limits)"
        );
        return Ok(());
    }
    println!(
        "xtask: advisories from {source}, database as of {}",
        db_date(&db).unwrap_or_else(|| "an unknown date".into())
    );
    check(&deny, workspace, &root, &["advisories"])
}

fn check(deny: &Path, workspace: &Path, root: &Path, which: &[&str]) -> Result<()> {
    println!("xtask: cargo deny --offline check {}", which.join(" "));
    let ok = Command::new(deny)
        .args(["--offline", "check"])
        .args(which)
        .current_dir(workspace)
        .env("NODEMESH_ADVISORY_DBS", root)
        .status()
        .context("cannot run cargo-deny")?
        .success();
    if !ok {
        bail!("cargo deny check {} failed (deny.toml)", which.join(" "));
    }
    Ok(())
}

/// Make `db` a clone of the given database at its current commit.
fn copy_db(given: &Path, db: &Path) -> Result<()> {
    if !given.join("crates").is_dir() {
        bail!(
            "NODEMESH_ADVISORY_DB={} is not a clone of rustsec/advisory-db (no crates/)",
            given.display()
        );
    }
    if db.exists() {
        std::fs::remove_dir_all(db).with_context(|| format!("cannot replace {}", db.display()))?;
    }
    let ok = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(given)
        .arg(db)
        .status()
        .context("cannot run git")?
        .success();
    if !ok {
        bail!("cannot clone {} into {}", given.display(), db.display());
    }
    Ok(())
}

fn db_date(db: &Path) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(db)
        .args(["show", "-s", "--format=%cs", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
