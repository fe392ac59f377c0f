//! Small system helpers: `ip` commands, cgroups, starting a process inside
//! a netns and a cgroup, plain HTTP from inside a netns, polling.
#![allow(unsafe_code)] // entering namespaces and cgroups between fork and exec
use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

/// Runs `ip <args>`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run ip {}: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    });
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`ip`], but ignores failures (for cleanup).
pub fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).stderr(Stdio::null()).output();
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        info.lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mountpoint = left.split_whitespace().nth(4)?;
                (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mountpoint))
            })
            .expect("the test bed needs cgroup v2 mounted")
    })
}

/// Kills every process in a cgroup tree and removes its directories.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // cgroup.kill (5.14+) SIGKILLs the whole subtree at once.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        remove_cgroup_dirs(dir);
        if !dir.exists() || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a cgroup tree's directories, deepest first (its processes must be
/// gone; a v1 hierarchy has no `cgroup.kill`).
pub fn remove_cgroup_dirs(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_dirs(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The calling process's own network namespace, opened once.
fn home_netns() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").expect("open own netns"))
}

/// Runs `f` on a fresh thread inside the netns at `netns`.
pub fn in_netns<R: Send + 'static>(netns: &Path, f: impl FnOnce() -> R + Send + 'static) -> R {
    let _ = home_netns();
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open netns {}: {e}", netns.display()));
    thread::spawn(move || {
        // SAFETY: setns on this (new, short-lived) thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A plain HTTP/1.0 GET from inside `netns`: (status, body).
pub fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_owned();
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad response: {head}")))?;
        Ok((status, body.to_owned()))
    })
}

/// Starts `cmd` with the child already inside `netns` and `cgroup` (moved
/// before `exec`, so even its first socket belongs to them).
pub fn spawn_in(mut cmd: Command, netns: &Path, cgroup: &Path) -> Child {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open netns {}: {e}", netns.display()));
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    let (ns_fd, procs_fd): (RawFd, RawFd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setns, write) between fork and
    // exec; the fds stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Writing "0" to cgroup.procs moves the writing process.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    drop((ns, procs));
    child
}

/// Spawns processes from one thread that lives as long as the test process,
/// so `PR_SET_PDEATHSIG` kills them when the test process ends, however.
pub fn spawn_kept(cmd: Command, cgroup: PathBuf) -> Child {
    type Job = (Command, PathBuf, mpsc::Sender<Child>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("testbed-keeper".into())
            .spawn(move || {
                for (mut cmd, cgroup, reply) in rx {
                    let procs = fs::OpenOptions::new()
                        .write(true)
                        .open(cgroup.join("cgroup.procs"))
                        .expect("cluster cgroup");
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
                    // SAFETY: only async-signal-safe calls before exec.
                    unsafe {
                        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let child = cmd
                        .spawn()
                        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
                    let _ = reply.send(child);
                }
                // Keep this thread alive: its death would kill the children.
                loop {
                    std::thread::park();
                }
            })
            .expect("keeper thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap()
        .send((cmd, cgroup, tx))
        .expect("keeper alive");
    rx.recv().expect("keeper spawned the process")
}

/// Starts `cmd` in `cgroup` (moved before `exec`), not tied to this
/// process: for what must outlive it (`nodemesh-node up`).
pub fn spawn_in_cgroup(mut cmd: Command, cgroup: &Path) -> Child {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    let fd = procs.as_raw_fd();
    // SAFETY: only async-signal-safe calls (write, setsid) before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            // Its own session: no terminal signal reaches it.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    drop(procs);
    child
}

/// A cgroup v1 memory controller directory with a limit, removed when
/// dropped (once its processes are gone).
#[derive(Debug)]
pub struct MemoryCgroup {
    pub dir: PathBuf,
}

impl MemoryCgroup {
    /// `name` under the v1 memory controller, limited to `bytes`; `None`
    /// where the host has no v1 memory controller.
    pub fn v1(name: &str, bytes: u64) -> Option<Self> {
        let root = fs::read_to_string("/proc/self/mounts")
            .ok()?
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory"))
                    .then(|| PathBuf::from(f[1]))
            })?;
        let dir = root.join(name);
        fs::create_dir_all(&dir).ok()?;
        fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).ok()?;
        Some(Self { dir })
    }

    /// Times the limit was hit, and whether the OOM killer acted in it.
    pub fn pressure(&self) -> (u64, bool) {
        let failcnt = fs::read_to_string(self.dir.join("memory.failcnt"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let killed = fs::read_to_string(self.dir.join("memory.oom_control"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("oom_kill ") && !l.ends_with(" 0"))
            })
            .unwrap_or(false);
        (failcnt, killed)
    }

    /// Peak memory charged to it, in bytes.
    pub fn max_usage(&self) -> u64 {
        fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Makes `cmd` join the cgroup at `dir` (any hierarchy) as it starts.
pub fn join_cgroup_at_exec(cmd: &mut Command, dir: &Path) {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", dir.display()));
    // SAFETY: only an async-signal-safe write before exec; the fd is kept
    // open by the closure, which the Command owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `cmd` with a soft open-file limit of `soft` (the hard one kept).
pub fn limit_open_files(cmd: &mut Command, soft: u64) {
    // SAFETY: only async-signal-safe calls (getrlimit, setrlimit) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = soft.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// This test binary, to be started again in another role.
pub fn self_exe() -> PathBuf {
    std::env::current_exe().expect("current_exe")
}

/// Polls `f` until it returns `Ok`, or panics with its last error after
/// `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not so after {timeout:?}: {e}")
            }
            Err(_) => {
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// `true` if a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Reads a file's text, or "" when it is missing.
pub fn read_or_empty(path: impl AsRef<OsStr>) -> String {
    fs::read_to_string(Path::new(&path)).unwrap_or_default()
}

/// A TCP forwarder from `127.0.0.1:port` inside a netns to `127.0.0.1:port`
/// on the host: traffic stays on the two loopbacks. Stops when dropped.
#[derive(Debug)]
pub struct Forward {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Forward {
    pub fn start(netns: &Path, port: u16) -> Self {
        use std::sync::{Arc, atomic::AtomicBool};
        let listener = in_netns(netns, move || {
            std::net::TcpListener::bind(("127.0.0.1", port))
        })
        .unwrap_or_else(|e| panic!("listen on 127.0.0.1:{port} in the node: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let blocked = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (stopping, blocking, tracked) = (stop.clone(), blocked.clone(), conns.clone());
        let thread = thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        let _ = inside.set_nonblocking(false);
                        let outside = if blocking.load(std::sync::atomic::Ordering::Relaxed) {
                            None
                        } else {
                            TcpStream::connect(("127.0.0.1", port)).ok()
                        };
                        let Some(outside) = outside else {
                            // As the host would answer: refused (a reset).
                            let _ = nix::sys::socket::setsockopt(
                                &inside,
                                nix::sys::socket::sockopt::Linger,
                                &libc::linger {
                                    l_onoff: 1,
                                    l_linger: 0,
                                },
                            );
                            continue;
                        };
                        if let Ok(c) = inside.try_clone() {
                            tracked.lock().unwrap().push(c);
                        }
                        for (mut from, mut to) in [
                            (inside.try_clone(), outside.try_clone()),
                            (outside.try_clone(), inside.try_clone()),
                        ]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                        {
                            thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            port,
            stop,
            blocked,
            conns,
            thread: Some(thread),
        }
    }

    /// Cuts every connection and refuses new ones (a network partition), or
    /// lets them through again.
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked
            .store(blocked, std::sync::atomic::Ordering::Relaxed);
        if blocked {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP forwarder from the host's `127.0.0.1:<port>` (a free one) to
/// `target` inside a netns: how the test API server (on the host's
/// loopback) reaches a service on a node. Stops when dropped.
#[derive(Debug)]
pub struct ReverseForward {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ReverseForward {
    pub fn start(netns: &Path, target: std::net::SocketAddr) -> Self {
        use std::sync::{Arc, atomic::AtomicBool};
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listen on loopback");
        let port = listener.local_addr().expect("local addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let netns = netns.to_owned();
        let thread = thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((outside, _)) => {
                        let _ = outside.set_nonblocking(false);
                        let Ok(inside) = in_netns(&netns, move || TcpStream::connect(target))
                        else {
                            continue;
                        };
                        for (mut from, mut to) in [
                            (inside.try_clone(), outside.try_clone()),
                            (outside.try_clone(), inside.try_clone()),
                        ]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                        {
                            thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ReverseForward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed (and reaped) if the test ends, or fails, first.
#[derive(Debug)]
pub struct Killed(Option<std::process::Child>);

impl Killed {
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// Its process ID.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    pub fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("the child")
    }

    /// The child, no longer killed on drop (its owner waits for it).
    pub fn take(mut self) -> std::process::Child {
        self.0.take().expect("the child")
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Clock ticks of user and system time `pid` has used (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces), 1-based 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
