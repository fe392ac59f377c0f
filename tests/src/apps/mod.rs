//! Pod applications: long-lived processes inside a pod (its netns and a
//! container cgroup) that a test drives with JSON lines on stdin and reads
//! answers from on stdout. One role per protocol, each a server and a
//! client in one process:
//!
//! - [`tcp`]: echo, byte patterns checked both ways, round trips, bulk;
//! - [`http`]: HTTP/1.1 and HTTP/2 (prior knowledge) with status, latency
//!   and body-size knobs; request loops reporting every request;
//! - [`grpc`]: unary and server-streaming calls (tonic), with status,
//!   latency and message knobs; call loops reporting every call.
//!
//! The driver here is the same for all: start the test binary again in the
//! pod under `ROLE <role>`, send a request line, read an answer line.
pub mod grpc;
pub mod http;
pub mod tcp;

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::sys::{self_exe, spawn_in};

/// The role argument under which the test binary runs as a pod app; the
/// protocol follows it.
pub const ROLE: &str = "__nodemesh_pod_app";

/// Which app a container runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Tcp,
    Http,
    Grpc,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

/// A running pod app process, seen from the test.
pub struct Container {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pod: String,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("pod", &self.pod)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Container {
    pub(crate) fn start(netns: &Path, cgroup: &Path, pod: &str, role: Role) -> Self {
        let mut cmd = Command::new(self_exe());
        cmd.arg(ROLE)
            .arg(role.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_in(cmd, netns, cgroup);
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdin,
            stdout,
            pod: pod.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pod, for messages.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// One request, one answer.
    pub fn call<Req: Serialize, Resp: DeserializeOwned>(&mut self, req: &Req) -> Resp {
        let line = serde_json::to_string(req).expect("encode request");
        writeln!(self.stdin, "{line}")
            .and_then(|_| self.stdin.flush())
            .unwrap_or_else(|e| panic!("pod app in {} is gone: {e}", self.pod));
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("pod app in {} is gone: {e}", self.pod));
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("pod app in {} answered {answer:?}: {e}", self.pod))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod app's side: one request per stdin line, one answer per stdout
/// line, until stdin closes. `handle` answers a request; a line that is not
/// a request gets `bad(message)`.
pub(crate) fn serve_lines<Req, Resp>(
    mut handle: impl FnMut(Req) -> Resp,
    bad: impl Fn(String) -> Resp,
) -> !
where
    Req: DeserializeOwned,
    Resp: Serialize,
{
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let response = match serde_json::from_str::<Req>(&line) {
            Ok(req) => handle(req),
            Err(e) => bad(format!("bad request: {e}")),
        };
        let out = serde_json::to_string(&response).expect("encode response");
        if writeln!(stdout, "{out}")
            .and_then(|_| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    std::process::exit(0)
}

/// The pod app's `main`: plays the role named after [`ROLE`].
pub fn main(role: Option<&str>) -> ! {
    match role {
        Some("http") => http::main(),
        Some("grpc") => grpc::main(),
        // The sandbox and plain containers.
        _ => tcp::main(),
    }
}
