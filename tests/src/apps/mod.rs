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

use std::{
    collections::BTreeMap,
    marker::PhantomData,
    sync::{Arc, Mutex},
};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::net::TcpListener;

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

/// A request-level protocol (HTTP, gRPC): servers with knobs, client loops
/// reporting every request, and what each server saw.
pub trait Protocol: 'static {
    const ROLE: Role;
    /// A server's defaults.
    type Knobs: Serialize + DeserializeOwned + Send + std::fmt::Debug + 'static;
    /// A client loop.
    type Run: Serialize + DeserializeOwned + Send + std::fmt::Debug + 'static;
    /// What happened to one request.
    type Outcome: Serialize + DeserializeOwned + Send + std::fmt::Debug + 'static;
    /// What a server saw.
    type Seen: Serialize + DeserializeOwned + Clone + Default + Send + std::fmt::Debug + 'static;

    /// Serves on `listener` for as long as the app lives.
    fn serve(
        listener: TcpListener,
        knobs: Self::Knobs,
        seen: Arc<Mutex<Self::Seen>>,
    ) -> BoxFuture<'static, ()>;

    /// Runs a client loop.
    fn run(run: Self::Run) -> BoxFuture<'static, Vec<Self::Outcome>>;
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Ask<K, R> {
    Serve { port: u16, knobs: K },
    Run { run: R },
    Seen { port: u16 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Answer<O, S> {
    Serving { port: u16 },
    Outcomes { outcomes: Vec<O> },
    Seen { seen: S },
    Failed { message: String },
}

/// A running request-level app, seen from the test.
pub struct RequestApp<P: Protocol>(Container, PhantomData<P>);

impl<P: Protocol> std::fmt::Debug for RequestApp<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<P: Protocol> RequestApp<P> {
    pub(crate) fn start(netns: &Path, cgroup: &Path, pod: &str) -> Self {
        Self(Container::start(netns, cgroup, pod, P::ROLE), PhantomData)
    }

    fn ask(&mut self, ask: &Ask<P::Knobs, P::Run>) -> Answer<P::Outcome, P::Seen> {
        self.0.call(ask)
    }

    /// Serves on `port` with `knobs` as the defaults.
    pub fn serve(&mut self, port: u16, knobs: P::Knobs) {
        match self.ask(&Ask::Serve { port, knobs }) {
            Answer::Serving { .. } => {}
            other => panic!("{}: serve {port}: {other:?}", self.0.pod()),
        }
    }

    /// Runs a client loop; every request's outcome, in order.
    pub fn run(&mut self, run: P::Run) -> Vec<P::Outcome> {
        match self.ask(&Ask::Run { run }) {
            Answer::Outcomes { outcomes } => outcomes,
            other => panic!("{}: run: {other:?}", self.0.pod()),
        }
    }

    /// What the server on `port` saw so far.
    pub fn seen(&mut self, port: u16) -> P::Seen {
        match self.ask(&Ask::Seen { port }) {
            Answer::Seen { seen } => seen,
            other => panic!("{}: seen {port}: {other:?}", self.0.pod()),
        }
    }
}

/// A request-level app's main loop, inside the pod.
pub(crate) fn request_app_main<P: Protocol>() -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let servers: Mutex<BTreeMap<u16, Arc<Mutex<P::Seen>>>> = Mutex::default();
    serve_lines(
        |ask: Ask<P::Knobs, P::Run>| match ask {
            Ask::Serve { port, knobs } => match rt.block_on(TcpListener::bind(("0.0.0.0", port))) {
                Ok(listener) => {
                    let seen = Arc::new(Mutex::new(P::Seen::default()));
                    servers.lock().unwrap().insert(port, seen.clone());
                    rt.spawn(P::serve(listener, knobs, seen));
                    Answer::Serving { port }
                }
                Err(e) => Answer::Failed {
                    message: e.to_string(),
                },
            },
            Ask::Run { run } => Answer::Outcomes {
                outcomes: rt.block_on(P::run(run)),
            },
            Ask::Seen { port } => match servers.lock().unwrap().get(&port) {
                Some(seen) => Answer::Seen {
                    seen: seen.lock().unwrap().clone(),
                },
                None => Answer::Failed {
                    message: format!("no server on {port}"),
                },
            },
        },
        |message| Answer::<P::Outcome, P::Seen>::Failed { message },
    )
}

/// Counts one more of `value` in a sorted (value, count) list.
pub(crate) fn count<T: Ord + Copy>(counts: &mut Vec<(T, u64)>, value: T) {
    match counts.binary_search_by_key(&value, |(v, _)| *v) {
        Ok(i) => counts[i].1 += 1,
        Err(i) => counts.insert(i, (value, 1)),
    }
}

/// The pod app's `main`: plays the role named after [`ROLE`].
pub fn main(role: Option<&str>) -> ! {
    match role {
        Some("http") => request_app_main::<http::Http>(),
        Some("grpc") => request_app_main::<grpc::Grpc>(),
        // The sandbox and plain containers.
        _ => tcp::main(),
    }
}
