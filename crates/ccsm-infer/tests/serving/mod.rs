//! A real `ccsm-infer serve` process on a free loopback port, and a raw HTTP/1.1 client over
//! `TcpStream` (so tests see exactly what goes over the wire, chunked bodies included).
#![allow(dead_code)] // each test file uses its part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model(name: &str) -> PathBuf {
    workspace().join("models").join(name)
}

pub const TINY_LLAMA: &str = "tiny-llama.gguf";
pub const TINY_CSM: &str = "tiny-csm.gguf";
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ccsm-infer")
}

/// One server at a time per test binary: each computes on two threads, and timing checks need the cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything it wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// The `--api-key` it was started with: requests carry it unless they bring an Authorization of their own.
    pub key: Option<String>,
}

impl Server {
    /// `ccsm-infer serve MODEL --port 0 -t 2 ARGS`, once `/health` answers 200.
    pub fn start(model_name: &str, args: &[&str]) -> Server {
        Self::start_with(Command::new(bin()), model_name, args)
    }

    /// As `start`, with a command prepared by the caller (environment, a shell wrapper).
    pub fn start_with(mut command: Command, model_name: &str, args: &[&str]) -> Server {
        let key = args.windows(2).find(|w| w[0] == "--api-key").map(|w| w[1].to_owned());
        if command.get_program() == bin() {
            command.arg("serve").arg(model(model_name)).args(["--port", "0", "-t", "2"]).args(args);
        }
        let mut child = command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("the server starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(String::new()));
        let mut addr = None;
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap_or(0) > 0 {
            log.lock().unwrap().push_str(&line);
            if let Some(rest) = line.split("ccsm server on http://").nth(1) {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                break;
            }
            line.clear();
        }
        let addr = addr.unwrap_or_else(|| panic!("the server did not start: {}", log.lock().unwrap()));
        let drained = log.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).unwrap_or(0) > 0 {
                drained.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let server = Server { child, addr, log, key };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.get("/health").status != 200 {
            assert!(Instant::now() < deadline, "never healthy: {}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// A request with `Connection: close` and the given extra header lines (and the server's key, when
    /// they bring no Authorization); the whole answer.
    pub fn send(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Answer {
        let mut s = self.connect();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        if let Some(key) = self.key.as_ref().filter(|_| !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("authorization:"))) {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        read_answer(&mut s)
    }

    pub fn get(&self, path: &str) -> Answer {
        self.send("GET", path, &[], b"")
    }

    /// A JSON POST.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Answer {
        self.send("POST", path, &["Content-Type: application/json"], body.to_string().as_bytes())
    }

    /// A metric's value (`name` with its labels, as `/metrics` prints it).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no metric {name}:\n{text}"))
    }

    /// Sends `signal` (a `kill -s` name) to the server.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -s {signal}");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status, headers (lowercase names), body (de-chunked).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }

    /// The error's message, after checking OpenAI's shape.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let e = &self.json()["error"];
        for field in ["message", "type", "code"] {
            assert!(e[field].is_string(), "error without {field}: {}", self.text());
        }
        e["message"].as_str().unwrap().to_owned()
    }

    /// The `data:` payloads of an SSE body, `[DONE]` left out.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = self.text();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
            .collect()
    }
}

/// Reads one answer until the server closes the connection.
pub fn read_answer(s: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_answer(&raw).unwrap_or_else(|| panic!("not an HTTP answer: {:?}", String::from_utf8_lossy(&raw)))
}

pub fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Some(Answer { status, headers, body })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
    out
}

/// Whether the server closes `s` within `limit` (reads return end-of-file or a reset), and when.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}
