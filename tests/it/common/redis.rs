//! A private Redis for the shared-limits tests: one `redis-server` per test binary run on a
//! free port (no persistence), started on first use, and a fresh key prefix for each test.
//! A watcher process stops the server when the test binary exits, however it exits.
//! `scripts/test.sh` installs `redis-server` when it is missing.

use std::net::TcpStream;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static SERVER: OnceLock<u16> = OnceLock::new();

/// The URL of the test run's Redis and a prefix no other test uses.
pub fn fresh_prefix() -> (String, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let port = *SERVER.get_or_init(start);
    let prefix = format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    (format!("redis://127.0.0.1:{port}/0"), prefix)
}

fn start() -> u16 {
    let port = super::postgres::free_port();
    let dir = tempfile::Builder::new()
        .prefix("step3gw-redis-")
        .tempdir()
        .unwrap()
        .keep();
    // Started in the background by a shell that prints its pid and exits.
    let script = format!(
        "setsid redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no \
         --dir '{dir}' </dev/null >'{dir}/log' 2>&1 & echo $!",
        dir = dir.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let pid = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        out.status.success() && !pid.is_empty(),
        "redis-server did not start: run scripts/test.sh, which installs it"
    );
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            super::postgres::watch_for_exit(&format!("kill {pid}; rm -rf '{}'", dir.display()));
            return port;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    panic!("redis-server did not start listening: {log}");
}

/// A `redis-server` of one test's own, for tests that stop it; stopped when dropped.
pub struct OwnRedis {
    child: std::process::Child,
    port: u16,
    pub url: String,
}

impl OwnRedis {
    pub fn start() -> Self {
        let port = super::postgres::free_port();
        OwnRedis {
            child: Self::spawn(port),
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
        }
    }

    /// A new server on the same port, empty (nothing is persisted).
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port);
    }

    fn spawn(port: u16) -> std::process::Child {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
