//! The dependency graph's checks (deny.toml): licenses, banned crates and
//! sources always; RustSec advisories against the newest copy of the
//! advisory database this machine can get.
//!
//! The database is a git repository on github.com, fetched first; a
//! machine without internet cannot reach it: then `NODEMESH_ADVISORY_DB` (a
//! clone of rustsec/advisory-db, e.g. carried in) is used, else the copy a
//! previous run kept, else the advisories are reported as not checked —
//! loudly, never as passed. A database older than 90 days is checked
//! against and reported as stale.
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
    println!("xtask: cargo deny fetch db (RustSec advisory database, {DB_URL})");
    let fetched = Command::new(&deny)
        .args(["fetch", "db"])
        .current_dir(workspace)
        .env("NODEMESH_ADVISORY_DBS", &root)
        .status()
        .is_ok_and(|s| s.success());
    let source = if fetched {
        if !usable(&db) {
            bail!(
                "cargo deny fetched its database, but not into {}: xtask's DB_DIR does not match this cargo-deny",
                db.display()
            );
        }
        "just fetched".to_string()
    } else if let Some(given) = std::env::var_os("NODEMESH_ADVISORY_DB") {
        copy_db(Path::new(&given), &db)?;
        format!("NODEMESH_ADVISORY_DB ({})", given.to_string_lossy())
    } else if usable(&db) {
        "an earlier copy (github.com is not reachable now)".to_string()
    } else {
        if db.exists() {
            // A clone cut short: not a database.
            let _ = std::fs::remove_dir_all(&db);
        }
        println!(
            "xtask: WARNING: RustSec advisories NOT checked: github.com is not reachable \
             and no copy of the database is here; set NODEMESH_ADVISORY_DB to a clone of \
             {DB_URL} to check them (README, Limits)"
        );
        return Ok(());
    };
    let head = db_head(&db);
    println!(
        "xtask: advisories from {source}, database as of {}",
        head.as_ref().map_or("an unknown date", |(date, _)| date)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(days) = head
        .map(|(_, at)| now.saturating_sub(at) / 86_400)
        .filter(|d| *d > STALE_DAYS)
    {
        println!(
            "xtask: WARNING: the advisory database is {days} days old: advisories published since are NOT checked"
        );
    }
    check(&deny, workspace, &root, &["advisories"])
}

/// The RustSec database's home (cargo-deny's default).
const DB_URL: &str = "https://github.com/RustSec/advisory-db";
/// Past this age the database is reported as stale (cargo-deny's own
/// default limit; deny.toml lifts cargo-deny's check, which cannot tell a
/// fresh clone of an old copy from a fresh fetch).
const STALE_DAYS: u64 = 90;

/// Whether `db` is a working clone cargo-deny can read.
fn usable(db: &Path) -> bool {
    db.join(".git").is_dir()
        && Command::new("git")
            .arg("-C")
            .arg(db)
            .args(["rev-parse", "--verify", "--quiet", "HEAD"])
            .output()
            .is_ok_and(|o| o.status.success())
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
        bail!(
            "cargo deny check {} found problems (above; the rules: deny.toml)",
            which.join(" ")
        );
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
    // Later fetches go to the database's home, not to the copy.
    let ok = Command::new("git")
        .arg("-C")
        .arg(db)
        .args(["remote", "set-url", "origin", DB_URL])
        .status()
        .context("cannot run git")?
        .success();
    if !ok {
        bail!("cannot point {} at {DB_URL}", db.display());
    }
    Ok(())
}

/// The database's newest commit: its date (YYYY-MM-DD) and Unix time.
fn db_head(db: &Path) -> Option<(String, u64)> {
    let out = Command::new("git")
        .arg("-C")
        .arg(db)
        .args(["show", "-s", "--format=%cs %ct", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (date, at) = text.trim().split_once(' ')?;
    Some((date.to_owned(), at.parse().ok()?))
}
