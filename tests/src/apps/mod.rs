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
    io::{BufRead, BufReader, Read, Write},
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

/// A running pod app, seen from the test: a process the test started
/// (requests over its stdin), or a container on a real node (requests over
/// its control port).
pub struct Container {
    child: Option<Child>,
    writer: Box<dyn Write + Send>,
    reader: BufReader<Box<dyn Read + Send>>,
    pod: String,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("pod", &self.pod)
            .field("pid", &self.child.as_ref().map(Child::id))
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
        let stdin: ChildStdin = child.stdin.take().expect("piped stdin");
        let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
        Self {
            child: Some(child),
            writer: Box::new(stdin),
            reader: BufReader::new(Box::new(stdout)),
            pod: pod.into(),
        }
    }

    /// Drives an app that serves its control port at `addr` (a container
    /// of `nodemesh-testapp … --control PORT`), connecting from `netns`.
    pub fn connect(netns: &Path, addr: std::net::SocketAddr, pod: &str) -> std::io::Result<Self> {
        let stream = crate::sys::in_netns(netns, move || {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        })?;
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone()?;
        Ok(Self {
            child: None,
            writer: Box::new(stream),
            reader: BufReader::new(Box::new(reader)),
            pod: pod.into(),
        })
    }

    /// The app's process id (a process the test started).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("{} runs on a real node: no pid here", self.pod))
    }

    /// The pod, for messages.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// One request, one answer.
    pub fn call<Req: Serialize, Resp: DeserializeOwned>(&mut self, req: &Req) -> Resp {
        let line = serde_json::to_string(req).expect("encode request");
        writeln!(self.writer, "{line}")
            .and_then(|_| self.writer.flush())
            .unwrap_or_else(|e| panic!("pod app in {} is gone: {e}", self.pod));
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("pod app in {} is gone: {e}", self.pod));
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("pod app in {} answered {answer:?}: {e}", self.pod))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a pod app gets its requests: from the test over stdin (the netns
/// bed), or, as a container image's entrypoint on a real node, from its
/// arguments and then from control connections (see [`standalone`]).
enum Input {
    Stdin,
    Standalone {
        requests: Vec<String>,
        control: Option<u16>,
    },
}

static INPUT: std::sync::OnceLock<Input> = std::sync::OnceLock::new();

/// The pod app's side: one request per line, one answer per line. `handle`
/// answers a request; a line that is not a request gets `bad(message)`.
/// With stdin, it ends when stdin closes; standalone, see [`standalone`].
pub(crate) fn serve_lines<Req, Resp>(
    mut handle: impl FnMut(Req) -> Resp,
    bad: impl Fn(String) -> Resp,
) -> !
where
    Req: DeserializeOwned,
    Resp: Serialize,
{
    let mut answer = |line: &str| -> String {
        let response = match serde_json::from_str::<Req>(line) {
            Ok(req) => handle(req),
            Err(e) => bad(format!("bad request: {e}")),
        };
        serde_json::to_string(&response).expect("encode response")
    };
    match INPUT.get().unwrap_or(&Input::Stdin) {
        Input::Stdin => {
            let stdin = std::io::stdin();
            let mut stdout = std::io::stdout();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                let out = answer(&line);
                if writeln!(stdout, "{out}")
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
            std::process::exit(0)
        }
        Input::Standalone { requests, control } => {
            let mut failed = false;
            for line in requests {
                let out = answer(line);
                failed |= is_failure(&out);
                println!("{out}");
            }
            let Some(port) = control else {
                std::process::exit(i32::from(failed))
            };
            let listener = std::net::TcpListener::bind(("::", *port))
                .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", *port)))
                .unwrap_or_else(|e| panic!("control port {port}: {e}"));
            eprintln!("nodemesh-testapp: control on port {port}");
            // One driver at a time, as over stdin.
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Ok(mut writer) = conn.try_clone() else {
                    continue;
                };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    let out = answer(&line);
                    if writeln!(writer, "{out}").is_err() {
                        break;
                    }
                }
            }
            std::process::exit(0)
        }
    }
}

/// Whether an answer says the request failed (every role's failure is
/// tagged `"result": "failed"`).
fn is_failure(answer: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(answer)
        .is_ok_and(|v| v.get("result").and_then(|r| r.as_str()) == Some("failed"))
}

/// The test apps as a container's entrypoint (`nodemesh-testapp`):
///
/// ```text
/// nodemesh-testapp ROLE [--do REQUEST-JSON]... [--control PORT]
/// ```
///
/// Answers each `--do` request in order on stdout; then, with `--control`,
/// serves request lines on TCP `PORT` (what [`Container::connect`] drives);
/// without, exits, 1 if a request failed. ROLE is `tcp`, `http` or `grpc`.
pub fn standalone(args: &[String]) -> ! {
    let usage = "usage: nodemesh-testapp tcp|http|grpc [--do REQUEST-JSON]... [--control PORT]";
    let mut role = None;
    let mut requests = Vec::new();
    let mut control = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--do" => requests.push(it.next().cloned().unwrap_or_else(|| {
                eprintln!("{usage}");
                std::process::exit(2)
            })),
            "--control" => {
                control = it.next().and_then(|p| p.parse::<u16>().ok());
                if control.is_none() {
                    eprintln!("--control needs a port\n{usage}");
                    std::process::exit(2)
                }
            }
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0)
            }
            r @ ("tcp" | "http" | "grpc") if role.is_none() => role = Some(r.to_owned()),
            other => {
                eprintln!("unexpected {other:?}\n{usage}");
                std::process::exit(2)
            }
        }
    }
    let Some(role) = role else {
        eprintln!("{usage}");
        std::process::exit(2)
    };
    let _ = INPUT.set(Input::Standalone { requests, control });
    main(Some(&role))
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
